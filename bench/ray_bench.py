"""The ray backend on a local Ray head: prefix-cache hit rate by router, and throughput by replica count.

Workload: four 4-shot tasks, requests in a fixed random order, 16 new tokens each, on the fixed
LLaMA-family model of ``serve_bench.py``. The hit rate is measured on the replicas' own prefix
caches: with one replica it is the best possible; with two, Serve's default router spreads each
task over both replicas, while task affinity keeps each task on one. Throughput is for 16
concurrent requests. On a 2-core machine two replicas share the same cores, so their throughput
says little about GPUs, where each replica has its own.

Usage: ``python bench/ray_bench.py``. The last line printed is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})  # loopback only

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ray import serve

from bench.workload import NEW_TOKENS, SIZES, Photos, make_task
from core.config import ModelSettings, RaySettings, Settings
from core.generation import GenerationParams
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


def main() -> None:
    rng = random.Random(3)
    results = {}
    with tempfile.TemporaryDirectory() as root:
        model_dir = write_model(Path(root) / "llama", TinyModelSpec(family="llama", **SIZES))
        address = start_head(Path(root) / "ray")
        try:
            photos = Photos()
            tasks = [make_task(f"task-{n}", 4, photos, rng) for n in range(4)]
            order = [rng.randrange(len(tasks)) for _ in range(SEQUENTIAL)]
            for label, replicas, routing in (
                ("1 replica", 1, "task_affinity"),
                ("2 replicas, default router", 2, "default"),
                ("2 replicas, task affinity", 2, "task_affinity"),
            ):
                ray = RaySettings(
                    address=address, app_name=f"bench-{replicas}-{routing}", replicas=replicas, routing=routing
                )
                settings = Settings(model=ModelSettings(name=str(model_dir), precision="fp32", device="cpu"), ray=ray)
                service = RayInferenceService.connect(settings)
                try:
                    results[label] = asyncio.run(run(service, photos, tasks, order))
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
                "workload": f"4 tasks x 4 shots, {SEQUENTIAL} sequential then {CONCURRENT} concurrent requests",
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
