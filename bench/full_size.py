"""OpenFlamingo-9B's shapes with random weights: decode speed, latency, throughput and memory per precision.

The model is built in memory with the shapes of ``openflamingo/OpenFlamingo-9B-vitl-mpt7b``
(ViT-L/14, MPT-7B, cross-attention every 4 layers; ``bench/random_model.py``) and served by the
bot's own engine and service. Per precision:

- batch-1 decode tokens/s against the limit set by memory bandwidth (the weights read per token
  divided by the bandwidth measured on the device with a large copy);
- p50 latency of a 4-shot caption (16 new tokens, a fresh query image each time);
- throughput with 32 concurrent 4-shot requests over two tasks;
- peak memory while serving, one request at a time and 32 at once (building random weights makes
  the LM in full precision before quantizing it, which a real load does not, so that peak is
  reported apart). On the CPU, serving peaks are the weights plus the peak of all other live
  tensors, counted op by op (``bench/live_memory.py``, which slows every operation: its times are
  not speeds), and ``--layers`` gives fewer layers, whose figures scale to the full model's;
- greedy agreement with bf16 on a fixed set of prompts (int8 and nf4 quantize the cross-attention
  layers too). With random weights the logits are nearly flat, so agreement here is a lower bound;
- on a GPU, greedy agreement of the CUDA-graphed decode steps with the eager loop.

Usage: ``python bench/serve_bench.py --device cuda [--precisions bf16 nf4 int8]``; ``--scale
full-llama`` builds the v1 OpenFlamingo-9B (LLaMA-7B) instead. On the CPU with small shapes, to try
the code: ``python bench/full_size.py --device cpu --scale small`` (or ``small-llama``). The last
line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.live_memory import LiveTensorBytes
from bench.random_model import SCALES, Shapes, build
from bench.workload import Photos, make_task
from core.config import ModelSettings, ServiceSettings, Settings
from core.generation import GenerationParams
from core.model.engine import FlamingoEngine
from core.model.loading import LoadedModel, tensors_held
from core.serving.local import InferenceService

NEW_TOKENS = 16
DECODE_TOKENS = 128
CONCURRENT = 32
# Nominal peak bandwidth of devices we may be lent, for comparison with the measured copy rate.
NOMINAL_TBS = {"H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H200": 4.8}


def measured_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read plus write)."""
    size = 2**30 if device.type == "cuda" else 2**27
    source, target = (
        torch.empty(size, dtype=torch.uint8, device=device),
        torch.empty(size, dtype=torch.uint8, device=device),
    )
    target.copy_(source)
    _sync(device)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    _sync(device)
    return 2 * size * 10 / (time.perf_counter() - started)


def bytes_read_per_token(loaded: LoadedModel) -> int:
    """The weights each decode step reads (with their quantization scales): the LM with its
    cross-attention, less the embedding table."""
    lm = loaded.model.lang_encoder
    tensors = {id(t): t for p in (*lm.parameters(), *lm.buffers()) for t in tensors_held(p)}
    embedding = lm.get_input_embeddings().weight
    tensors.pop(id(embedding), None)
    return sum(t.nelement() * t.element_size() for t in tensors.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Run:
    def __init__(self, loaded: LoadedModel) -> None:
        settings = Settings(
            model=ModelSettings(precision=loaded.precision.name, device=str(loaded.device)),
            service=ServiceSettings(max_queue=4 * CONCURRENT, max_batch=CONCURRENT),
        )
        self.loaded = loaded
        self.engine = FlamingoEngine(loaded, settings)
        self.photos = Photos()
        rng = random.Random(0)
        self.tasks = [make_task(f"four-{n}", 4, self.photos, rng) for n in "ab"]
        self.zero_shot = make_task("zero", 0, self.photos, rng)

    def _seconds(self, tokens: int) -> float:
        params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
        request = self.engine.prepare([self.photos.fresh()], "<image>Output:", self.zero_shot, params)
        _sync(self.loaded.device)
        started = time.perf_counter()
        self.engine.run(request)
        _sync(self.loaded.device)
        return time.perf_counter() - started

    def decode_tokens_per_second(self) -> float:
        self._seconds(DECODE_TOKENS)  # warm-up
        long = statistics.median(self._seconds(DECODE_TOKENS) for _ in range(3))
        short = statistics.median(self._seconds(1) for _ in range(3))
        return (DECODE_TOKENS - 1) / (long - short)

    async def _answers(self, count: int) -> list[tuple[int, ...]]:
        service = InferenceService(self.engine, max_queue=4 * CONCURRENT, max_batch=CONCURRENT)
        params = GenerationParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        try:
            requests = [(self.tasks[i % 2], self.photos.fresh()) for i in range(count)]
            answers = await asyncio.gather(
                *(service.answer([image], task.prompt_template, task, params) for task, image in requests)
            )
        finally:
            await asyncio.to_thread(service.close)
        return [answer.token_ids for answer in answers]

    def beam_seconds(self, beams: int = 3) -> float:
        """Median time of a 4-shot caption with beam search (the engine's own search on the cached prefix)."""
        params = GenerationParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, num_beams=beams)

        def once() -> float:
            request = self.engine.prepare([self.photos.fresh()], "<image>Output:", self.tasks[0], params)
            _sync(self.loaded.device)
            started = time.perf_counter()
            self.engine.run(request)
            _sync(self.loaded.device)
            return time.perf_counter() - started

        once()
        return statistics.median(once() for _ in range(3))

    def caption_latencies(self, repeats: int) -> list[float]:
        asyncio.run(self._answers(1))  # warm-up: the two tasks' prefixes are cached from here on
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            asyncio.run(self._answers(1))
            times.append(time.perf_counter() - started)
        return times

    def throughput(self) -> dict:
        asyncio.run(self._answers(CONCURRENT))  # warm-up at this batch size
        started = time.perf_counter()
        answers = asyncio.run(self._answers(CONCURRENT))
        seconds = time.perf_counter() - started
        tokens = sum(len(a) for a in answers)
        return {"requests_per_s": round(CONCURRENT / seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}

    def greedy_without_graphs(self) -> list[tuple[int, ...]]:
        """The same prompts through the eager decode loop, for agreement with the CUDA-graphed steps."""
        static_steps, self.engine.decoder.static_steps = self.engine.decoder.static_steps, None
        try:
            return self.greedy()
        finally:
            self.engine.decoder.static_steps = static_steps

    def graphs(self) -> dict:
        static_steps = self.engine.decoder.static_steps
        if static_steps is None:
            return {"used": False}
        return {"used": not static_steps.failed, "batches": static_steps.used, **static_steps.steps.stats()}

    def greedy(self) -> list[tuple[int, ...]]:
        """A fixed set of prompts (fixed images), for agreement between precisions."""
        photos, rng = Photos(), random.Random(7)
        task = make_task("fixed", 4, photos, rng)
        params = GenerationParams(max_new_tokens=NEW_TOKENS)
        return [
            self.engine.run(self.engine.prepare([photos.fresh()], prompt, chosen, params)).token_ids
            for chosen in (task, self.zero_shot)
            for prompt in ("<image>Output:", "<image>Question: What is in the picture? Short answer:")
        ]


def agreement(ours: list[tuple[int, ...]], reference: list[tuple[int, ...]]) -> float:
    """Share of reference tokens matched position by position."""
    matched = sum(sum(a == b for a, b in zip(x, y, strict=False)) for x, y in zip(ours, reference, strict=True))
    return round(matched / max(1, sum(len(y) for y in reference)), 3)


def _build_peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's, on the CPU


class PeakMemory:
    """Peak bytes since the last reset: the CUDA allocator's, or on the CPU the weights (parameters
    and buffers) plus the peak of all other live tensors, counted op by op in every call the engine
    answers, on whichever thread the service runs it."""

    def __init__(self, engine: FlamingoEngine) -> None:
        loaded = engine.loaded
        self.device = loaded.device
        self.weights = loaded.total_bytes
        self.live: LiveTensorBytes | None = None
        if self.device.type != "cuda":
            self.live = LiveTensorBytes(exclude=(*loaded.model.parameters(), *loaded.model.buffers()))
            engine.run_many = self._counting(engine.run_many)  # type: ignore[method-assign]
        self.reset()

    def _counting(self, run_many: Callable[..., None]) -> Callable[..., None]:
        def counted(*args: Any, **kwargs: Any) -> None:
            with self.live:  # type: ignore[union-attr]
                run_many(*args, **kwargs)

        return counted

    def reset(self) -> None:
        if self.live is None:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.live.reset_peak()

    def gib(self) -> float:
        peak = torch.cuda.max_memory_allocated(self.device) if self.live is None else self.weights + self.live.peak
        return round(peak / 2**30, 2)


def measure(shapes: Shapes, device: torch.device, precisions: list[str], repeats: int) -> dict:
    bandwidth = measured_bandwidth(device)
    results: dict[str, dict] = {}
    baseline: list[tuple[int, ...]] | None = None
    for precision in precisions:
        gc.collect()  # the previous precision's model and caches, before its memory is counted again
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        loaded = build(shapes, precision, device)
        build_peak = _build_peak_bytes(device)  # random weights made in full precision first: not a real load's peak
        run = Run(loaded)
        peak = PeakMemory(run.engine)
        per_token = bytes_read_per_token(loaded)
        tokens_per_s = run.decode_tokens_per_second()
        limit = bandwidth / per_token
        latencies = run.caption_latencies(repeats)
        greedy = run.greedy()
        baseline = baseline or greedy
        results[precision] = {
            "model_gib": round(loaded.total_bytes / 2**30, 2),
            "decode_tokens_per_s": round(tokens_per_s, 1),
            "bandwidth_limit_tokens_per_s": round(limit, 1),
            "of_limit": round(tokens_per_s / limit, 3),
            "caption_4shot_p50_s": round(statistics.median(latencies), 4),
            "caption_4shot_p90_s": round(statistics.quantiles(latencies, n=10)[-1], 4),
            f"greedy_agreement_with_{precisions[0]}": agreement(greedy, baseline),
            "greedy_agreement_without_graphs": agreement(greedy, run.greedy_without_graphs()),
        }
        if precision == precisions[0]:
            results[precision]["caption_4shot_3_beams_s"] = round(run.beam_seconds(), 4)
        results[precision]["peak_gib_one_at_a_time"] = peak.gib()
        peak.reset()
        results[precision][f"throughput_{CONCURRENT}"] = run.throughput()
        results[precision][f"peak_gib_{CONCURRENT}_at_once"] = peak.gib()
        results[precision]["build_peak_gib"] = round(build_peak / 2**30, 2)
        results[precision]["graphs"] = run.graphs()
        print(f"{precision}: {json.dumps(results[precision])}", flush=True)
        del run, loaded
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = next((tbs for key, tbs in NOMINAL_TBS.items() if key in name), None)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": name,
        "model": f"{shapes.model} shapes ({shapes.describe()}), random weights",
        "measured_bandwidth_gbs": round(bandwidth / 1e9, 1),
        "nominal_bandwidth_tbs": nominal,
        "precisions": results,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--layers", type=int, help="fewer decoder layers than the scale's (memory figures on the CPU)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "nf4", "int8"])  # slowest last
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2: the p90 latency needs two")
    shapes = SCALES[args.scale]
    if args.layers:
        shapes = replace(shapes, layers=args.layers)
    print(json.dumps(measure(shapes, torch.device(args.device), args.precisions, args.repeats)))


if __name__ == "__main__":
    main()
