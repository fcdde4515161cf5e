"""The real bot process on the local Discord stand-in, and the time it takes to answer.

What the benchmarks that drive ``python main.py`` share (``flood_bench.py``, ``bot_bench.py``): the
pinned CPU model, the stand-in with the owner's server, a bot process with the settings a benchmark
chooses, and members' ``/comprehend`` timed from sending the interaction to the answer being posted.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from bench.workload import SIZES
from tests.fake_discord.payloads import Guild, Member
from tests.fake_discord.server import FakeDiscord, Message
from tests.helpers.e2e import RELAXED, BotProcess
from tests.make_tiny_model import TinyModelSpec, write_model

ANSWER_TIMEOUT = 900  # seconds: an interaction's token lives 15 minutes


def pinned_model(directory: Path) -> Path:
    """The CPU benchmarks' LLaMA-family model (``bench/workload.py: SIZES``), written under ``directory``."""
    return write_model(directory / "model", TinyModelSpec(family="llama", **SIZES))


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p95": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))], 3),
    }


@asynccontextmanager
async def stand_in() -> AsyncIterator[tuple[FakeDiscord, Guild]]:
    """The local Discord stand-in, and the owner's server where the bot's ``/admin`` lives."""
    discord = FakeDiscord()
    await discord.start()
    try:
        yield discord, discord.add_guild("Bot HQ")
    finally:
        await discord.stop()


def bot_process(
    discord: FakeDiscord, admin: Guild, model: Path, directory: Path, settings: Mapping[str, str]
) -> BotProcess:
    """``python main.py`` with its database and log in ``directory``: the quotas and line as shipped
    (not the end-to-end tests' relaxed ones), with ``settings`` (``FLAMINGO_...`` variables) on top."""
    bot = BotProcess(discord, model, directory / "tasks.db", admin, directory / "bot.log")
    bot.env = {key: value for key, value in bot.env.items() if key not in RELAXED} | dict(settings)
    return bot


@asynccontextmanager
async def running(bot: BotProcess, start_timeout: float = 120) -> AsyncIterator[float]:
    """The bot started (its model loaded and its gateway session identified), and stopped after.

    Yields the seconds from launching the process to that point."""
    started = time.perf_counter()
    await bot.start(start_timeout)
    try:
        yield time.perf_counter() - started
    finally:
        await bot.stop()


def comprehend(discord: FakeDiscord, member: Member, guild: Guild | None, photo: bytes, **options: Any) -> dict:
    """A member's ``/comprehend`` of a freshly uploaded JPEG."""
    upload = discord.upload("photo.jpg", photo, "image/jpeg")
    return discord.interaction_payload("comprehend", member, guild, image=upload, **options)


async def timed(discord: FakeDiscord, payload: dict) -> tuple[float, list[Message]]:
    """Seconds from sending an interaction to its reply being posted (past 'thinking' and any place in
    line), and what the user then sees."""
    started = time.perf_counter()
    record = await discord.send_interaction(payload)
    messages = await record.answered(timeout=ANSWER_TIMEOUT)
    return time.perf_counter() - started, messages


def is_answer(messages: list[Message]) -> bool:
    """An answer is posted as an embed; a refusal is a plain message."""
    return any(message.embeds for message in messages)
