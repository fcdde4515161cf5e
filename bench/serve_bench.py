"""Our service against upstream open_flamingo ``generate``, on fixed models, in one run (CPU).

The reference is called as the prototype called it: every example image encoded per request, the
whole prompt run, the model's own cache setting (MPT ships with ``use_cache: false``). The service
is the bot's: prefix cache, image cache, lean decode loop. Both generate exactly 16 new tokens
(``min_new_tokens``, stopping at the same tokens), on fresh query images every time, so neither
is helped by having seen the request before. Times are medians over repetitions after a warm-up.

Usage: ``python bench/serve_bench.py [--repeats N] [--families llama mpt] [--stream]``. The last
line printed is one JSON object; its top-level figures are the LLaMA family's. ``--stream`` runs
only the cost of following answers as they decode: the same requests with every one followed and
with none, in the same run. With ``--device cuda`` it runs ``bench/full_size.py`` instead:
OpenFlamingo-9B's shapes with random weights, in bf16, int8 and nf4.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
import transformers
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.workload import NEW_TOKENS, SIZES, Photos, make_task, upstream_input
from core.config import ModelSettings, ServiceSettings, Settings
from core.generation import GenerationParams
from core.model.decode.decoder import image_key
from core.model.engine import FlamingoEngine
from core.model.loading import load_model
from core.prompts import Task
from core.serving.local import InferenceService, Ticket
from tests.helpers.reference import Reference
from tests.make_tiny_model import TinyModelSpec, write_model

SHOTS = (0, 4, 8, 16)
CONCURRENCY = (1, 4, 16)
BEAMS = 3
BEAM_REQUESTS = 4  # beam requests sent at once
LONG_TOKENS = 128  # a long answer that a short request arrives during
ARRIVAL_SECONDS = 0.2  # after the long answer started
STREAM_TOKENS = 48  # a followed answer long enough for many words
STREAM_CONCURRENCY = (1, 4)
Requests = list[tuple[Task, Image.Image]]


def _row(label: str, value: int, reference_s: float, service_s: float) -> dict:
    return {
        label: value,
        "reference_s": round(reference_s, 4),
        "service_s": round(service_s, 4),
        "speedup": round(reference_s / service_s, 2),
    }


class Bench:
    def __init__(self, family: str, model_dir: Path, repeats: int) -> None:
        self.family, self.repeats = family, repeats
        settings = Settings(
            model=ModelSettings(name=str(model_dir), precision="fp32", device="cpu"),
            service=ServiceSettings(max_queue=64),
        )
        with contextlib.redirect_stdout(io.StringIO()):
            self.reference = Reference(model_dir)
        self.engine = FlamingoEngine(load_model(settings.model), settings)
        self.service = InferenceService(self.engine, max_queue=64)
        self.stops = sorted(self.reference.stop_ids)
        self.params = GenerationParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        self.photos = Photos()
        self.identical = True

    def reference_answer(self, task: Task, image: Image.Image, num_beams: int = 1) -> tuple[int, ...]:
        images, prompt = upstream_input(task, image)
        length = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
        if num_beams > 1:  # upstream's own stop, as the bot's beam search keeps it
            return self.reference.generate(images, prompt, num_beams=num_beams, **length)
        return self.reference.generate(images, prompt, eos_token_id=self.stops, **length)

    async def service_answers(
        self, requests: list[tuple[Task, Image.Image]], num_beams: int = 1
    ) -> list[tuple[int, ...]]:
        params = self.params.replace(num_beams=num_beams)
        answers = await asyncio.gather(
            *(self.service.answer([image], t.prompt_template, t, params) for t, image in requests)
        )
        return [answer.token_ids for answer in answers]

    def timed(
        self, requests_for_run: Callable[[], list[tuple[Task, Image.Image]]], repeats: int, num_beams: int = 1
    ) -> tuple[float, float]:
        """Median seconds for the reference and for the service over the same fresh requests."""
        reference_times, service_times = [], []
        for run in range(repeats + 1):  # the first run warms up
            requests = requests_for_run()
            started = time.perf_counter()
            expected = [self.reference_answer(task, image, num_beams) for task, image in requests]
            reference_s = time.perf_counter() - started
            started = time.perf_counter()
            got = asyncio.run(self.service_answers(requests, num_beams))
            service_s = time.perf_counter() - started
            self.identical &= got == expected
            if run:
                reference_times.append(reference_s)
                service_times.append(service_s)
        return statistics.median(reference_times), statistics.median(service_times)

    def shots(self) -> list[dict]:
        rows = []
        rng = random.Random(0)
        for shots in SHOTS:
            task = make_task(f"{shots}-shot", shots, self.photos, rng)
            timing = self.timed(lambda task=task: [(task, self.photos.fresh())], self.repeats)
            rows.append(_row("shots", shots, *timing))
        return rows

    def concurrency(self) -> list[dict]:
        rows = []
        rng = random.Random(1)
        tasks = [make_task("four-a", 4, self.photos, rng), make_task("four-b", 4, self.photos, rng)]
        for count in CONCURRENCY:

            def requests(count: int = count) -> list[tuple[Task, Image.Image]]:
                return [(tasks[i % 2], self.photos.fresh()) for i in range(count)]

            rows.append(_row("requests", count, *self.timed(requests, max(1, self.repeats // 2))))
        return rows

    def beams(self) -> list[dict]:
        """Beam search (3 beams) on 0 and 8 examples, then 4 concurrent 4-shot requests (searched together).

        Upstream runs each request's whole prompt; the bot runs its prefix cache.
        """
        rows = []
        rng = random.Random(3)
        for shots in (0, 8):
            task = make_task(f"{shots}-shot-beams", shots, self.photos, rng)
            timing = self.timed(lambda task=task: [(task, self.photos.fresh())], self.repeats, num_beams=BEAMS)
            rows.append(_row("shots", shots, *timing))
        tasks = [make_task("four-beams-a", 4, self.photos, rng), make_task("four-beams-b", 4, self.photos, rng)]

        def together() -> list[tuple[Task, Image.Image]]:
            return [(tasks[i % 2], self.photos.fresh()) for i in range(BEAM_REQUESTS)]

        rows.append(_row("requests", BEAM_REQUESTS, *self.timed(together, max(1, self.repeats // 2), BEAMS)))
        return rows

    def late_arrival(self) -> dict:
        """A short request sent while a long answer runs, against the same request alone.

        It joins the running batch (continuous batching); were it to wait for the batch instead, it
        would take about the long answer's time less the head start, plus its own.
        """
        task = make_task("four-late", 4, self.photos, random.Random(2))
        long_params = GenerationParams(max_new_tokens=LONG_TOKENS, min_new_tokens=LONG_TOKENS)

        async def short() -> float:
            started = time.perf_counter()
            await self.service.answer([self.photos.fresh()], task.prompt_template, task, self.params)
            return time.perf_counter() - started

        async def during_long() -> tuple[float, float]:
            long = asyncio.create_task(
                self.service.answer([self.photos.fresh()], task.prompt_template, task, long_params)
            )
            await asyncio.sleep(ARRIVAL_SECONDS)
            waited = await short()
            return waited, (await long).seconds

        alone, during, long_s = [], [], []
        for run in range(self.repeats + 1):  # the first run warms up
            alone_s = asyncio.run(short())
            during_s, long_answer_s = asyncio.run(during_long())
            if run:
                alone.append(alone_s)
                during.append(during_s)
                long_s.append(long_answer_s)
        return {
            "long_tokens": LONG_TOKENS,
            "long_s": round(statistics.median(long_s), 4),
            "short_alone_s": round(statistics.median(alone), 4),
            "short_during_long_s": round(statistics.median(during), 4),
            "short_if_it_waited_s": round(statistics.median(long_s) - ARRIVAL_SECONDS + statistics.median(alone), 4),
        }

    def streaming(self) -> list[dict]:
        """The same 4-shot requests with every one followed (its text read as soon as it grows) and
        with none, alternately first, the query images' features forgotten in between so that both
        encode them: following must not change an answer, nor slow the decode loop."""
        rng = random.Random(4)
        tasks = [make_task("four-stream-a", 4, self.photos, rng), make_task("four-stream-b", 4, self.photos, rng)]
        params = GenerationParams(max_new_tokens=STREAM_TOKENS, min_new_tokens=STREAM_TOKENS)

        async def texts_read(ticket: Ticket) -> int:
            return len([text async for text in ticket.partial_texts()])

        async def run(requests: Requests, follow: bool) -> tuple[list[tuple[int, ...]], int]:
            tickets = [self.service.submit([image], t.prompt_template, t, params) for t, image in requests]
            texts = await asyncio.gather(*(texts_read(ticket) for ticket in tickets)) if follow else []
            return [(await ticket.answer()).token_ids for ticket in tickets], sum(texts)

        rows = []
        for count in STREAM_CONCURRENCY:
            seconds: dict[bool, list[float]] = {True: [], False: []}
            identical, texts = True, 0
            for repeat in range(self.repeats + 1):  # the first warms up
                requests = [(tasks[i % 2], self.photos.fresh()) for i in range(count)]
                answers = {}
                for follow in (True, False) if repeat % 2 else (False, True):
                    started = time.perf_counter()
                    answers[follow], read = asyncio.run(run(requests, follow))
                    if repeat:
                        seconds[follow].append(time.perf_counter() - started)
                        texts += read
                    for _, image in requests:
                        self.engine.decoder.images.discard(image_key(image))
                identical &= answers[True] == answers[False]
            followed_s, plain_s = statistics.median(seconds[True]), statistics.median(seconds[False])
            self.identical &= identical
            rows.append(
                {
                    "requests": count,
                    "plain_s": round(plain_s, 4),
                    "followed_s": round(followed_s, 4),
                    "ratio": round(followed_s / plain_s, 3),
                    "texts_per_request": round(texts / (count * self.repeats), 1),
                    "identical": identical,
                }
            )
        return rows

    def memory(self) -> dict:
        decoder = self.engine.decoder
        return {
            "model_bytes": self.engine.loaded.total_bytes,
            "prefix_cache": decoder.prefixes.stats(),
            "image_cache": decoder.images.stats(),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }


def _section(label: str, rows: list[dict], note: str = "") -> list[str]:
    heading = f"  {label:>8} {'reference':>10} {'service':>9} {'speedup':>8}" + (f"   ({note})" if note else "")
    return [heading] + [
        f"  {r[label]:>8} {r['reference_s']:>10.3f} {r['service_s']:>9.3f} {r['speedup']:>7.1f}x" for r in rows
    ]


def _table(family: str, shots: list[dict], concurrency: list[dict], beams: list[dict], late: dict) -> str:
    lines = [f"{family}: {NEW_TOKENS} new tokens per request, medians (s)"]
    lines += _section("shots", shots)
    lines += _section("requests", concurrency, "4-shot, two tasks, all at once")
    lines += _section("shots", [r for r in beams if "shots" in r], f"{BEAMS} beams")
    lines += _section("requests", [r for r in beams if "requests" in r], f"{BEAMS} beams, 4-shot, two tasks, at once")
    lines.append(
        f"  a {NEW_TOKENS}-token request sent {ARRIVAL_SECONDS} s into a {late['long_tokens']}-token answer "
        f"({late['long_s']:.2f} s): {late['short_during_long_s']:.2f} s; alone {late['short_alone_s']:.2f} s; "
        f"waiting for the batch would take about {late['short_if_it_waited_s']:.2f} s"
    )
    return "\n".join(lines)


def _streaming_table(family: str, rows: list[dict]) -> str:
    lines = [f"{family}: {STREAM_TOKENS} new tokens per 4-shot request, every one followed or none, medians (s)"]
    lines.append(f"  {'requests':>8} {'none':>8} {'followed':>9} {'ratio':>6} {'texts':>6} identical")
    lines += [
        f"  {r['requests']:>8} {r['plain_s']:>8.3f} {r['followed_s']:>9.3f} {r['ratio']:>6.3f} "
        f"{r['texts_per_request']:>6} {str(r['identical']).lower()}"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cuda: full-size shapes (bench/full_size.py)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=["llama", "mpt"], choices=["llama", "mpt"])
    parser.add_argument("--stream", action="store_true", help="only the cost of following answers as they decode")
    args, rest = parser.parse_known_args()
    transformers.logging.set_verbosity_error()  # upstream generate warns about pad_token_id on every call
    if args.device != "cpu":
        from bench.full_size import main as full_size

        full_size(["--device", args.device, "--repeats", str(max(args.repeats, 10)), *rest])
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    identical = True
    with tempfile.TemporaryDirectory() as root:
        for family in args.families:
            model_dir = write_model(Path(root) / family, TinyModelSpec(family=family, **SIZES))
            bench = Bench(family, model_dir, args.repeats)
            if args.stream:
                results[family] = {"streaming": bench.streaming()}
                bench.service.close()
                identical &= bench.identical
                print(_streaming_table(family, results[family]["streaming"]), flush=True)
                continue
            shots, concurrency, beams = bench.shots(), bench.concurrency(), bench.beams()
            late = bench.late_arrival()
            bench.service.close()
            identical &= bench.identical
            results[family] = {
                "shots": shots,
                "concurrency": concurrency,
                "beams": beams,
                "late_arrival": late,
                "memory": bench.memory(),
            }
            print(_table(family, shots, concurrency, beams, late), flush=True)
    first = results[args.families[0]]
    if args.stream:
        print(json.dumps({"identical": identical, "streaming": results}))
        return
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": f"{args.families[0]} family: " + ", ".join(f"{k}={v}" for k, v in SIZES.items()),
        "identical": identical,
        "shots": first["shots"],
        "concurrency": first["concurrency"],
        "beams": first["beams"],
        "late_arrival": first["late_arrival"],
        "memory": first["memory"],
        "families": {family: results[family] for family in args.families[1:]},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
