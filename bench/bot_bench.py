"""A busy public bot: the real bot process against its own model service and upstream ``generate``, in one run.

The bot (``python main.py``) runs on the local Discord stand-in (``tests/fake_discord``) with the
pinned CPU model of ``serve_bench.py`` (LLaMA family, ``bench/workload.py``). Each of its servers
imports, with ``/manage-tasks import``, a task of ``--shots`` examples of distinct photos (the bench
raises ``limits.max_examples_per_task`` to fit, and the quotas and the line's size so that nothing
is refused; both are printed, and a refusal counts as an unanswered request). Members then ask
``/comprehend`` with a fresh photo and exactly 16 new tokens; each request picks a server's task
with Zipf popularity (s = 1.1), the first server's the most asked.

- Start-up: seconds from launching the process to ready (model loaded, commands synced, gateway
  session identified), and the first answer's latency (the model's first request).
- Concurrency levels 1, 8 and 32 over ``--guilds`` servers (requests in flight at once: each of that
  many senders sends its next request once its last is answered), after a warm-up of one request
  per task: p50 and p95 from sending the interaction to the answer being posted, answers per second
  (answered requests over the time taken), and the prefix cache's hit rate over the level (the
  bot's own counters, read from its ``/metrics`` before and after).
- The same requests (tasks and photos) through the model service alone, in this process, with the
  bot's settings (``start_service``: no Discord, no store), so that the bot's overhead, (bot p50 -
  service p50) / service p50 at concurrency 1, comes from one run. The two take turns, by rounds of
  ``4 × concurrency`` requests (at least 8), so that a change in the machine's load weighs on both.
- Upstream ``generate`` (``tests/helpers/reference.py``), one request at a time, before the rest.
  It is slow, so it answers only the first ``--reference-requests`` of the last level's requests;
  its answers per second are every level's reference, and the small cache's.
- The bot restarted with the prefix cache sized for ``--cached-tasks`` of the tasks (from a task's
  prefix size, measured in the service), answering the last level's requests again.
- A soak: ``--soak-requests`` across ``--soak-guilds`` servers at concurrency 8, after one request
  per server: the bot's resident memory after that warm-up and at the end, how much its bounded
  caches grew meanwhile (not a leak), and the database's size against its documented bounds (all
  servers' task images, ``limits.max_all_task_images_mb``, and all stored requests' images,
  ``storage.request_images_mb``).

The stand-in and the senders run in this process, on the same cores as the bot. Upstream's figure
in particular needs a quiet machine: with two torch threads on two cores that something else also
keeps busy, it slows tenfold where the service slows twofold. The last line printed is one JSON object.

Usage: ``.venv/bin/python -m bench.bot_bench`` (CPU, with nothing else running); ``--quick`` runs
every part briefly; ``--device cuda --model DIR --shots N`` runs on a GPU with a full-size model
directory (``flamingo.json`` and its checkpoint, as ``tests/make_tiny_model.py`` writes them).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import psutil
import torch
import transformers
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.bot_harness import (
    bot_process,
    comprehend,
    is_answer,
    jpeg,
    percentiles,
    pinned_model,
    running,
    stand_in,
    timed,
)
from bench.workload import NEW_TOKENS, SIZES, Photos, make_task, upstream_input
from core.config import Settings, load_settings
from core.errors import FlamingoError
from core.generation import GenerationParams
from core.prompts import Task
from core.serving.local import start_service
from core.tasks.archive import ArchivedExample, TaskArchive, write_archive
from tests.fake_discord.payloads import MANAGE_GUILD, Guild
from tests.fake_discord.server import FakeDiscord
from tests.helpers.e2e import BotProcess
from tests.helpers.reference import Reference

ZIPF_S = 1.1
LEVELS = (1, 8, 32)
SOAK_CONCURRENCY = 8
TASK = "photos"  # every server's task is so named
MIB = 2**20
_STARTED = time.monotonic()


@dataclass(frozen=True)
class Request:
    guild: int  # which server asks, and so whose task
    photo: bytes  # a fresh JPEG


Send = Callable[[Request], Awaitable[float | None]]  # seconds to the answer; None: unanswered


@dataclass(frozen=True)
class Run:
    """How requests went: each answered one's seconds, how many were sent, the time taken, the prefix hit rate."""

    seconds: list[float]
    sent: int
    wall_s: float
    hit_rate: float | None = None

    def __add__(self, other: Run) -> Run:
        return Run(self.seconds + other.seconds, self.sent + other.sent, self.wall_s + other.wall_s)

    @property
    def answers_per_s(self) -> float:
        return round(len(self.seconds) / self.wall_s, 3)

    def percentile(self, which: str) -> float | None:
        return percentiles(self.seconds)[which] if self.seconds else None

    def line(self, who: str, concurrency: int) -> str:
        hits = "" if self.hit_rate is None else f", prefix hit rate {self.hit_rate}"
        return (
            f"{who}, {concurrency} in flight: {len(self.seconds)}/{self.sent} answered, p50 "
            f"{self.percentile('p50')} s, p95 {self.percentile('p95')} s, {self.answers_per_s} answers/s{hits}"
        )


async def drive(requests: Sequence[Request], concurrency: int, send: Send) -> Run:
    """``concurrency`` senders, each sending its next request once its last is answered."""
    queue = iter(requests)
    seconds: list[float] = []

    async def sender() -> None:
        for request in queue:
            took = await send(request)
            if took is not None:
                seconds.append(took)

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return Run(seconds, len(requests), time.perf_counter() - started)


async def in_turns(requests: Sequence[Request], concurrency: int, first: Send, second: Send) -> tuple[Run, Run]:
    """The same requests through both, taking turns by rounds of ``4 × concurrency`` (at least 8)."""
    size = max(8, 4 * concurrency)
    runs = Run([], 0, 0.0), Run([], 0, 0.0)
    for start in range(0, len(requests), size):
        chunk = requests[start : start + size]
        runs = runs[0] + await drive(chunk, concurrency, first), runs[1] + await drive(chunk, concurrency, second)
    return runs


def say(line: str) -> None:
    """A progress line, with the seconds the run has taken so far."""
    print(f"[{time.monotonic() - _STARTED:6.0f} s] {line}", flush=True)


@dataclass(frozen=True)
class Workload:
    """Every request of the run, made before anything is timed, and the servers' tasks."""

    tasks: list[Task]  # the first ``--guilds`` serve the levels, all of them the soak
    warm_up: list[Request]  # one per level server
    levels: dict[int, list[Request]]
    reference: list[Request]  # upstream's sample: the first of the last level's
    soak_warm_up: list[Request]  # one per soak server
    soak: list[Request]

    @classmethod
    def make(cls, args: argparse.Namespace) -> Workload:
        photos, rng = Photos(), random.Random(0)

        def zipf(servers: int, count: int) -> list[Request]:
            weights = [1 / rank**ZIPF_S for rank in range(1, servers + 1)]
            return [Request(guild, jpeg(photos.fresh())) for guild in rng.choices(range(servers), weights, k=count)]

        def one_each(servers: int) -> list[Request]:
            return [Request(guild, jpeg(photos.fresh())) for guild in range(servers)]

        servers = max(args.guilds, args.soak_guilds)
        tasks = [make_task(f"server{n}", args.shots, photos, rng) for n in range(servers)]
        levels = {level: zipf(args.guilds, args.requests) for level in LEVELS}
        reference = levels[LEVELS[-1]][: args.reference_requests]
        soak = zipf(args.soak_guilds, args.soak_requests)
        return cls(tasks, one_each(args.guilds), levels, reference, one_each(args.soak_guilds), soak)

    @property
    def sent_to_bots(self) -> int:
        """Requests the bots are sent in the run (the small cache's bot: the warm-up and the last level)."""
        first_bot = [self.warm_up, *self.levels.values(), self.soak_warm_up, self.soak]
        return sum(map(len, first_bot)) + len(self.warm_up) + len(self.levels[LEVELS[-1]])


def bot_env(args: argparse.Namespace, work: Workload) -> dict[str, str]:
    """The bot's settings: the model and device, tasks of ``--shots`` examples, and quotas and a line that
    refuse nothing (any server may have every request in flight, and a share of the line that holds them)."""
    most = max(*LEVELS, SOAK_CONCURRENCY)
    return {
        "FLAMINGO_MODEL__NAME": str(args.model),
        "FLAMINGO_MODEL__DEVICE": args.device,
        "FLAMINGO_MODEL__PRECISION": "fp32" if args.device == "cpu" else "bf16",
        "FLAMINGO_LIMITS__MAX_EXAMPLES_PER_TASK": str(max(args.shots, 8)),
        "FLAMINGO_QUOTAS__USER_COOLDOWN_SECONDS": "0",
        "FLAMINGO_QUOTAS__GUILD_IN_FLIGHT": str(most),
        "FLAMINGO_QUOTAS__GUILD_PER_PERIOD": str(work.sent_to_bots),
        "FLAMINGO_SERVICE__MAX_QUEUE": str(most * (len(work.tasks) + 1)),
    }


def settings_for(env: dict[str, str]) -> Settings:
    """What the bot reads: ``config.toml`` with these ``FLAMINGO_`` variables over it."""
    with mock.patch.dict(os.environ, env):
        return load_settings()


def described(settings: Settings) -> dict[str, Any]:
    """The limits, quotas and line the bot runs with."""
    limits, quotas, service = settings.limits, settings.quotas, settings.service
    return {
        "limits.max_examples_per_task": limits.max_examples_per_task,
        "quotas.user_cooldown_seconds": quotas.user_cooldown_seconds,
        "quotas.guild_in_flight": quotas.guild_in_flight,
        "quotas.guild_per_period": quotas.guild_per_period,
        "quotas.period_seconds": quotas.period_seconds,
        "quotas.task_uploads_in_flight": quotas.task_uploads_in_flight,
        "quotas.task_uploads_per_period": quotas.task_uploads_per_period,
        "service.max_queue": service.max_queue,
        "service.max_batch": service.max_batch,
        "service.prefix_cache_mb": service.prefix_cache_mb,
        "service.image_cache_mb": service.image_cache_mb,
    }


def reference_answers_per_s(settings: Settings, tasks: list[Task], requests: Sequence[Request]) -> float:
    """Upstream ``generate`` on each request in turn (every example encoded every time), after one to warm up."""
    dtype = torch.bfloat16 if settings.model.precision == "bf16" else torch.float32
    reference = Reference(Path(settings.model.name), settings.model.device, dtype)
    stops = sorted(reference.stop_ids)

    def answer(request: Request) -> None:
        images, prompt = upstream_input(tasks[request.guild], Image.open(io.BytesIO(request.photo)).convert("RGB"))
        reference.generate(images, prompt, eos_token_id=stops, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    answer(requests[0])
    started = time.perf_counter()
    for request in requests:
        answer(request)
    return round(len(requests) / (time.perf_counter() - started), 3)


class Service:
    """The bot's model service in this process, with the bot's settings: no Discord, no store."""

    def __init__(self, settings: Settings, tasks: list[Task]) -> None:
        self.service = start_service(settings)
        self.tasks = tasks
        self.params = GenerationParams(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    async def send(self, request: Request) -> float | None:
        task = self.tasks[request.guild]
        image = Image.open(io.BytesIO(request.photo)).convert("RGB")
        started = time.perf_counter()
        try:
            await self.service.answer([image], task.prompt_template, task, self.params)
        except FlamingoError:
            return None
        return time.perf_counter() - started

    def prefix_bytes(self) -> float:
        """A task's prefix (its examples' keys and values), on average over those cached."""
        prefix = self.service.engine.status().caches["prefix"]
        return prefix["bytes"] / prefix["entries"]

    def close(self) -> None:
        """Let the model go: the small cache's bot comes next."""
        self.service.close()
        del self.service
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Bot:
    """One bot process: its servers' members' requests, and what it tells of itself."""

    def __init__(self, discord: FakeDiscord, guilds: list[Guild], process: BotProcess) -> None:
        self.discord = discord
        self.guilds = guilds
        self.process = process

    async def import_tasks(self, tasks: list[Task]) -> None:
        """Each server's moderator imports its task, as another server's export."""
        for guild, task in zip(self.guilds, tasks, strict=True):
            examples = tuple(ArchivedExample(jpeg(e.image), e.text) for e in task.examples)
            archive = write_archive(TaskArchive(TASK, "", task.prompt_template, examples), datetime.now(UTC))
            moderator = self.discord.add_member(guild, "moderator", permissions=MANAGE_GUILD)
            upload = self.discord.upload("photos.flamingo-task.zip", archive, "application/zip")
            payload = self.discord.interaction_payload("manage-tasks import", moderator, guild, file=upload)
            _, messages = await timed(self.discord, payload)
            if not messages[-1].content.startswith("Imported"):
                raise RuntimeError(f"{guild.name} could not import its task: {messages[-1].content}")

    async def send(self, request: Request) -> float | None:
        guild = self.guilds[request.guild]
        member = self.discord.add_member(guild, f"member{len(guild.members)}")
        options = {"task": TASK, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}
        payload = comprehend(self.discord, member, guild, request.photo, **options)
        seconds, messages = await timed(self.discord, payload)
        return seconds if is_answer(messages) else None

    async def caches(self) -> dict[str, dict[str, float]]:
        """The model's caches' counters (entries, bytes, hits, misses) by cache, from the bot's ``/metrics``."""
        _, text = await self.process.scrape()
        caches: dict[str, dict[str, float]] = {}
        for family in text_string_to_metric_families(text):
            counter = family.name.removeprefix("flamingo_cache_")
            if counter != family.name:
                for sample in family.samples:
                    caches.setdefault(sample.labels["cache"], {})[counter] = sample.value
        return caches

    async def prefix_counts(self) -> tuple[float, float]:
        """The prefix cache's hits and misses so far."""
        prefix = (await self.caches())["prefix"]
        return prefix["hits"], prefix["misses"]

    async def hit_rate_since(self, counts: tuple[float, float]) -> float | None:
        """The prefix cache's hit rate since it had ``counts``; None: not asked since."""
        hits, misses = (now - then for now, then in zip(await self.prefix_counts(), counts, strict=True))
        return round(hits / (hits + misses), 3) if hits + misses else None

    def rss_mb(self) -> float:
        assert self.process.process is not None
        return round(psutil.Process(self.process.process.pid).memory_info().rss / MIB, 1)


async def soak(bot: Bot, work: Workload, directory: Path, settings: Settings) -> dict[str, Any]:
    """Many requests across many servers: the bot's memory after warm-up and at the end, and the database's size."""
    await drive(work.soak_warm_up, SOAK_CONCURRENCY, bot.send)
    rss_warm, caches_warm = bot.rss_mb(), await bot.caches()
    run = await drive(work.soak, SOAK_CONCURRENCY, bot.send)
    rss_end, caches_end = bot.rss_mb(), await bot.caches()
    say(run.line("soak", SOAK_CONCURRENCY))
    grown = sum(caches_end[name]["bytes"] - caches_warm[name]["bytes"] for name in caches_end) / MIB
    database = sum(path.stat().st_size for path in directory.glob("tasks.db*")) / MIB  # with its WAL
    return {
        "requests": run.sent,
        "answered": len(run.seconds),
        "servers": len(work.soak_warm_up),
        "concurrency": SOAK_CONCURRENCY,
        "answers_per_s": run.answers_per_s,
        "rss_warm_mb": rss_warm,
        "rss_end_mb": rss_end,
        "rss_growth": round(rss_end / rss_warm - 1, 4),
        "cache_growth_mb": round(grown, 1),
        "database_mb": round(database, 1),
        "database_bound_mb": settings.limits.max_all_task_images_mb + settings.storage.request_images_mb,
    }


@dataclass(frozen=True)
class Measured:
    startup_s: float
    first_answer_s: float | None
    levels: dict[int, tuple[Run, Run]]  # the service's and the bot's
    prefix_bytes: float
    small_cache_mb: int
    small_cache: Run
    soak: dict[str, Any]


async def measure(args: argparse.Namespace, directory: Path, env: dict[str, str], work: Workload) -> Measured:
    """Start-up, the levels (the service and the bot in turns) and the soak on one bot process; then the
    small cache's run on another."""
    service = Service(settings_for(env), work.tasks[: args.guilds])
    async with stand_in() as (discord, admin):
        guilds = [discord.add_guild(f"Server {n}") for n in range(len(work.tasks))]
        bot = Bot(discord, guilds, bot_process(discord, admin, args.model, directory, env))
        async with running(bot.process, args.start_timeout) as startup_s:
            say(f"bot ready {startup_s:.1f} s after it was launched")
            await bot.import_tasks(work.tasks)
            first = await bot.send(work.warm_up[0])
            say(f"its first answer: {first and round(first, 3)} s")
            await drive(work.warm_up[1:], SOAK_CONCURRENCY, bot.send)
            await drive(work.warm_up, SOAK_CONCURRENCY, service.send)
            levels = {}
            for level in LEVELS:
                counts = await bot.prefix_counts()
                served, answered = await in_turns(work.levels[level], level, service.send, bot.send)
                levels[level] = served, replace(answered, hit_rate=await bot.hit_rate_since(counts))
                say(served.line("service", level))
                say(levels[level][1].line("bot", level))
            prefix_bytes = service.prefix_bytes()
            service.close()
            soaked = await soak(bot, work, directory, settings_for(env))
        cache_mb = max(1, round((args.cached_tasks + 0.5) * prefix_bytes / MIB))
        say(f"a task's prefix: {prefix_bytes / MIB:.2f} MiB; the small prefix cache: {cache_mb} MiB")
        small_env = env | {"FLAMINGO_SERVICE__PREFIX_CACHE_MB": str(cache_mb)}
        bot = Bot(discord, guilds, bot_process(discord, admin, args.model, directory, small_env))
        async with running(bot.process, args.start_timeout):
            await drive(work.warm_up, SOAK_CONCURRENCY, bot.send)
            counts = await bot.prefix_counts()
            small = await drive(work.levels[LEVELS[-1]], LEVELS[-1], bot.send)
            small = replace(small, hit_rate=await bot.hit_rate_since(counts))
            say(small.line(f"bot, prefix cache of {cache_mb} MiB", LEVELS[-1]))
        discord.check_violations(" during the benchmark")
    return Measured(round(startup_s, 2), first and round(first, 3), levels, prefix_bytes, cache_mb, small, soaked)


def summary(
    args: argparse.Namespace, settings: Settings, reference_sample: list[Request], reference: float, measured: Measured
) -> dict[str, Any]:
    levels = []
    for level, (service, bot) in measured.levels.items():
        levels.append(
            {
                "concurrency": level,
                "requests": bot.sent,
                "answered": len(bot.seconds),
                "p50_s": bot.percentile("p50"),
                "p95_s": bot.percentile("p95"),
                "answers_per_s": bot.answers_per_s,
                "service_p50_s": service.percentile("p50"),
                "service_p95_s": service.percentile("p95"),
                "service_answers_per_s": service.answers_per_s,
                "reference_answers_per_s": reference,
                "speedup": round(bot.answers_per_s / reference, 2),
                "hit_rate": bot.hit_rate,
            }
        )
    bot_p50, service_p50 = levels[0]["p50_s"], levels[0]["service_p50_s"]
    small = measured.small_cache
    if args.device == "cpu":
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    else:
        device = torch.cuda.get_device_name(args.device)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "model": args.model_name,
        "shots": args.shots,
        "guilds": args.guilds,
        "new_tokens": NEW_TOKENS,
        "settings": described(settings),
        "overhead_ratio": round((bot_p50 - service_p50) / service_p50, 3) if bot_p50 and service_p50 else None,
        "levels": levels,
        "reference_requests": len(reference_sample),
        "small_cache": {
            "prefix_cache_mb": measured.small_cache_mb,
            "tasks_held": int(measured.small_cache_mb * MIB // measured.prefix_bytes),
            "concurrency": LEVELS[-1],
            "answered": len(small.seconds),
            "hit_rate": small.hit_rate,
            "answers_per_s": small.answers_per_s,
            "reference_answers_per_s": reference,
            "speedup": round(small.answers_per_s / reference, 2),
        },
        "startup_s": measured.startup_s,
        "first_answer_s": measured.first_answer_s,
        "soak": measured.soak,
    }


def targets(result: dict[str, Any]) -> list[str]:
    """The issue's targets (CPU, pinned model), each met or not."""
    overhead, last, small, soak = result["overhead_ratio"], result["levels"][-1], result["small_cache"], result["soak"]
    checks = [
        (
            f"the bot's overhead at 1 in flight: {overhead} of the service's p50",
            "at most 0.1",
            overhead is not None and overhead <= 0.1,
        ),
        (f"{last['speedup']}x upstream's answers/s at {last['concurrency']} in flight", "4x", last["speedup"] >= 4),
        (f"{small['speedup']}x upstream's answers/s with the small prefix cache", "1x", small["speedup"] >= 1),
        (f"resident memory {soak['rss_growth']:+.1%} over the soak", "at most +5%", soak["rss_growth"] <= 0.05),
        (
            f"the database {soak['database_mb']} MiB",
            f"within {soak['database_bound_mb']} MiB",
            soak["database_mb"] <= soak["database_bound_mb"],
        ),
    ]
    return [f"{what}: {'met' if met else 'NOT met'} (target {target})" for what, target, met in checks]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guilds", type=int, default=20, help="servers the levels' requests come from")
    parser.add_argument("--shots", type=int, default=16, help="examples in each server's task")
    parser.add_argument("--requests", type=int, default=96, help="requests at each concurrency level")
    parser.add_argument("--reference-requests", type=int, default=8, help="of those, answered by upstream")
    parser.add_argument("--cached-tasks", type=int, default=5, help="tasks the small prefix cache holds")
    parser.add_argument("--soak-guilds", type=int, default=50)
    parser.add_argument("--soak-requests", type=int, default=2000)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--model", type=Path, help="a model directory (default: the pinned CPU model)")
    parser.add_argument("--start-timeout", type=float, default=120, help="seconds the bot may take to be ready")
    parser.add_argument("--quick", action="store_true", help="every part, briefly (for the test suite)")
    args = parser.parse_args()
    if args.quick:
        args.guilds, args.shots, args.requests, args.reference_requests = 3, 2, 8, 1
        args.cached_tasks, args.soak_guilds, args.soak_requests = 1, 4, 16
    return args


def main() -> None:
    args = arguments()
    transformers.logging.set_verbosity_error()  # upstream generate warns about pad_token_id on every call
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        directory = Path(root)
        if args.model is None:
            args.model = pinned_model(directory)
            args.model_name = "llama family: " + ", ".join(f"{k}={v}" for k, v in SIZES.items())
        else:
            args.model_name = str(args.model)
        work = Workload.make(args)
        env = bot_env(args, work)
        settings = settings_for(env)
        say(f"{len(work.tasks)} servers, {args.shots}-shot tasks; the bot's settings: {described(settings)}")
        reference = reference_answers_per_s(settings, work.tasks, work.reference)
        say(f"upstream generate, one at a time: {reference} answers/s over {len(work.reference)} requests")
        gc.collect()
        measured = asyncio.run(measure(args, directory, env, work))
    result = summary(args, settings, work.reference, reference, measured)
    for line in targets(result):
        say(line)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
