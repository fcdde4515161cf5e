"""The ray backend on a local Ray head: prefix-cache hit rate by router, and throughput by replica count.

Workload: four 4-shot tasks, requests in a fixed random order, 16 new tokens each, on the fixed
LLaMA-family model of ``serve_bench.py``. The hit rate is measured on the replicas' own prefix
caches: with one replica it is the best possible; with two, Serve's default router spreads each
task over both replicas, while task affinity keeps each task on one. Throughput is for 16
concurrent requests. On a 2-core machine two replicas share the same cores, so their throughput
says little about GPUs, where each replica has its own.

Usage: ``python bench/ray_bench.py [--stream]``. The last line printed is one JSON object.
``--stream`` runs only the cost of following answers as a replica streams them: 16 concurrent
requests on one replica, every answer followed or none, alternately first, compared in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})  # loopback only

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from PIL import Image
from ray import serve

from bench.workload import NEW_TOKENS, SIZES, Photos, make_task
from core.config import ModelSettings, RaySettings, Settings
from core.generation import GenerationParams
from core.prompts import Task
from core.serving.ray.backend import RayInferenceService
from tests.make_tiny_model import TinyModelSpec, write_model

RAY = Path(sys.executable).parent / "ray"
PORT = 6399
SEQUENTIAL = 32
CONCURRENT = 16


def start_head(temp_dir: Path) -> str:
    command = [str(RAY), "start", "--head", f"--port={PORT}", "--num-cpus=2", "--include-dashboard=false"]
    command += ["--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    return f"127.0.0.1:{PORT}"


def hit_rate(statuses: list[dict]) -> tuple[int, int]:
    return sum(s["caches"]["prefix"]["hits"] for s in statuses), sum(s["caches"]["prefix"]["misses"] for s in statuses)


async def run(service: RayInferenceService, photos: Photos, tasks: list, order: list[int]) -> dict:
    params = GenerationParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    await service.answer([photos.fresh()], "<image>Output:", tasks[0], params)  # warm-up (counted below)
    hits_before, misses_before = hit_rate(await asyncio.to_thread(service.replica_status))
    for index in order:
        await service.answer([photos.fresh()], "<image>Output:", tasks[index], params)
    hits, misses = hit_rate(await asyncio.to_thread(service.replica_status))
    hits, misses = hits - hits_before, misses - misses_before
    started = time.perf_counter()
    await asyncio.gather(
        *(service.answer([photos.fresh()], "<image>Output:", tasks[n % len(tasks)], params) for n in range(CONCURRENT))
    )
    seconds = time.perf_counter() - started
    return {
        "prefix_hit_rate": round(hits / max(1, hits + misses), 3),
        "prefix_misses": misses,
        f"requests_per_s_{CONCURRENT}": round(CONCURRENT / seconds, 2),
    }


STREAM_TOKENS = 64
STREAM_REPEATS = 4


async def streaming(service: RayInferenceService, photos: Photos, tasks: list) -> dict:
    """The same concurrent requests with every answer followed (streamed from the replica) and with
    none (sent whole), alternately first: following must not change an answer, nor slow it much."""
    params = GenerationParams(max_new_tokens=STREAM_TOKENS, min_new_tokens=STREAM_TOKENS)

    async def answered(image: Image.Image, task: Task, follow: bool) -> tuple[tuple[int, ...], int]:
        ticket = service.submit([image], "<image>Output:", task, params)
        read = asyncio.ensure_future(_count(ticket.partial_texts())) if follow else None
        answer = await ticket.answer()
        return answer.token_ids, (await read if read is not None else 0)

    seconds: dict[bool, list[float]] = {True: [], False: []}
    identical, texts = True, 0
    for repeat in range(STREAM_REPEATS + 1):  # the first warms up
        requests = [(photos.fresh(), tasks[n % len(tasks)]) for n in range(CONCURRENT)]
        answers = {}
        for follow in (True, False) if repeat % 2 else (False, True):
            started = time.perf_counter()
            results = await asyncio.gather(*(answered(image, task, follow) for image, task in requests))
            if repeat:
                seconds[follow].append(time.perf_counter() - started)
                texts += sum(read for _, read in results)
            answers[follow] = [tokens for tokens, _ in results]
        identical &= answers[True] == answers[False]
    followed, plain = statistics.median(seconds[True]), statistics.median(seconds[False])
    return {
        "requests": CONCURRENT,
        "new_tokens": STREAM_TOKENS,
        "plain_s": round(plain, 3),
        "followed_s": round(followed, 3),
        "ratio": round(followed / plain, 3),
        "texts_per_request": round(texts / (CONCURRENT * STREAM_REPEATS), 1),
        "identical": identical,
    }


async def _count(texts: AsyncIterator[str]) -> int:
    return len([text async for text in texts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stream", action="store_true", help="only the cost of following answers as replicas stream them"
    )
    args = parser.parse_args()
    rng = random.Random(3)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        model_dir = write_model(Path(root) / "llama", TinyModelSpec(family="llama", **SIZES))
        address = start_head(Path(root) / "ray")
        try:
            photos = Photos()
            tasks = [make_task(f"task-{n}", 4, photos, rng) for n in range(4)]
            order = [rng.randrange(len(tasks)) for _ in range(SEQUENTIAL)]
            configurations = [
                ("1 replica", 1, "task_affinity"),
                ("2 replicas, default router", 2, "default"),
                ("2 replicas, task affinity", 2, "task_affinity"),
            ]
            for label, replicas, routing in configurations[:1] if args.stream else configurations:
                ray = RaySettings(
                    address=address, app_name=f"bench-{replicas}-{routing}", replicas=replicas, routing=routing
                )
                settings = Settings(model=ModelSettings(name=str(model_dir), precision="fp32", device="cpu"), ray=ray)
                service = RayInferenceService.connect(settings)
                try:
                    measure = streaming(service, photos, tasks) if args.stream else run(service, photos, tasks, order)
                    results[label] = asyncio.run(measure)
                finally:
                    serve.delete(ray.app_name)  # frees its CPUs for the next configuration
                    service.close()
                print(f"{label:<28} {json.dumps(results[label])}", flush=True)
        finally:
            subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)
    print(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "device": "cpu (replicas share the machine's cores)",
                "workload": (
                    f"4 tasks x 4 shots, {CONCURRENT} concurrent requests, followed and not, alternately first"
                    if args.stream
                    else f"4 tasks x 4 shots, {SEQUENTIAL} sequential then {CONCURRENT} concurrent requests"
                ),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
