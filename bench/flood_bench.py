"""One server's /comprehend while another server floods task changes and 20 accounts ask in DMs.

The real bot process (``python main.py``) on the local Discord stand-in, with the shipped quotas
and line (``config.toml``), the pinned CPU benchmark model (LLaMA family, ``bench/workload.py``)
and the shipped image limits. A quiet server asks ``--requests`` times, one at a time, each from a
member of its own (so the per-user cooldown never applies), first with the bot otherwise idle and
then while:

- four moderators of a second server send task changes that read images: ``add-example`` with a
  JPEG whose header Pillow reads byte by byte (25 MiB of it took 17.7 s before task uploads were
  read in a worker process killed at ``images.decode_seconds``), and ``import`` of task files
  whose directory lists 282,707 entries or whose every example is a 36-megapixel PNG;
- ``--accounts`` accounts ask in direct messages.

Each flooding account sends its next command once it has the reply to its last, and at most one
every ``--interval`` seconds (a person, or a script driving Discord's client, does not send much
faster; ``--interval 0`` floods as fast as the bot replies), refused or not.

It prints the quiet server's p50 and p95, idle and flooded, their ratio (the target: the flooded
p50 within 2x of the idle one), and what the flood got done and had refused. Run it with nothing
else on the machine: ``.venv/bin/python -m bench.flood_bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import sys
import tempfile
import time
import zipfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
from bench.workload import Photos
from core.tasks.archive import ArchivedExample, TaskArchive, write_archive
from tests.fake_discord.payloads import MANAGE_GUILD, Guild, Member
from tests.fake_discord.server import FakeDiscord
from tests.helpers.heavy_images import slow_header_jpeg


def directory_bomb(entries: int = 282_707) -> bytes:
    """A task file whose central directory lists ``entries`` empty files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for n in range(entries):
            archive.writestr(f"examples/{n}.jpg", b"")
    return buffer.getvalue()


def large_pictures_task(examples: int = 8, side: int = 6000) -> bytes:
    """A valid task file of ``examples`` PNGs of ``side``² pixels: each costs a full decode to check."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)), np.full((side, side), 90, np.uint8)]
    )
    buffer = io.BytesIO()
    Image.fromarray(np.moveaxis(pixels, 0, -1)).save(buffer, format="PNG", compress_level=9)
    picture = buffer.getvalue()
    archived = tuple(ArchivedExample(picture, f"<image>Output:picture {n}.") for n in range(examples))
    return write_archive(TaskArchive("large", "", "<image>Output:", archived), datetime.now(UTC))


class Flood:
    """The noisy server's moderators and the direct-message accounts, until stopped."""

    def __init__(self, discord: FakeDiscord, accounts: int, photos: Photos, interval: float) -> None:
        self.discord = discord
        self.photos = photos
        self.interval = interval
        self.accounts = [Member(9_000_000 + n, f"dm{n}") for n in range(accounts)]
        self.outcomes: Counter[str] = Counter()
        self.stopped = asyncio.Event()

    async def ask(self, payload: dict) -> str:
        """Send, wait for the reply, and let at least ``interval`` pass between one account's commands."""
        seconds, messages = await timed(self.discord, payload)
        await asyncio.sleep(max(0.0, self.interval - seconds))
        return "answered" if is_answer(messages) else messages[-1].content

    async def direct_messages(self, member: Member) -> None:
        while not self.stopped.is_set():
            outcome = await self.ask(comprehend(self.discord, member, None, jpeg(self.photos.fresh())))
            self.outcomes["dm " + ("answered" if outcome == "answered" else "refused")] += 1

    async def task_changes(self, guild: Guild, moderator: Member, files: list[tuple[str, str, bytes]]) -> None:
        rng = random.Random(moderator.id)
        while not self.stopped.is_set():
            kind, filename, data = rng.choice(files)
            upload = self.discord.upload(filename, data, "application/octet-stream")
            options: dict[str, Any]
            if kind == "add-example":
                options = {"task": "noisy", "image": upload, "text": "<image>Output:a picture."}
            else:
                options = {"file": upload}
            payload = self.discord.interaction_payload(f"manage-tasks {kind}", moderator, guild, **options)
            outcome = await self.ask(payload)
            self.outcomes[f"{kind} {'done' if outcome.startswith(('Added', 'Imported')) else 'refused'}"] += 1


async def measure(discord: FakeDiscord, guild: Guild, photos: Photos, requests: int) -> list[float]:
    """Seconds from each interaction to its posted answer, one request at a time."""
    seconds = []
    for n in range(requests):
        member = discord.add_member(guild, f"reader{time.monotonic_ns()}-{n}")
        took, messages = await timed(discord, comprehend(discord, member, guild, jpeg(photos.fresh())))
        if not is_answer(messages):
            raise RuntimeError(f"the quiet server's request was not answered: {messages[-1].content}")
        seconds.append(took)
    return seconds


async def run(args: argparse.Namespace, directory: Path) -> dict:
    model = pinned_model(directory)
    async with stand_in() as (discord, admin), running(bot_process(discord, admin, model, directory, {})):
        return await scenario(args, discord)


async def scenario(args: argparse.Namespace, discord: FakeDiscord) -> dict:
    photos = Photos()
    quiet = await discord.join("Quiet")
    noisy = await discord.join("Noisy")
    moderators = [discord.add_member(noisy, f"moderator{n}", permissions=MANAGE_GUILD) for n in range(4)]
    create = discord.interaction_payload(
        "manage-tasks create", moderators[0], noisy, name="noisy", template="<image>Output:"
    )
    await (await discord.send_interaction(create)).answered()
    files = [
        ("add-example", "slow.jpg", slow_header_jpeg()),
        ("import", "directory.zip", directory_bomb()),
        ("import", "large.zip", large_pictures_task()),
    ]
    await measure(discord, quiet, photos, 2)  # warm-up: first requests load caches and code paths
    idle = await measure(discord, quiet, photos, args.requests)

    flood = Flood(discord, args.accounts, photos, args.interval)
    tasks = [asyncio.create_task(flood.direct_messages(member)) for member in flood.accounts]
    tasks += [asyncio.create_task(flood.task_changes(noisy, moderator, files)) for moderator in moderators]
    await asyncio.sleep(args.ramp_seconds)  # the flood fills the line before the quiet server asks
    flooded = await measure(discord, quiet, photos, args.requests)
    flood.stopped.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    idle_summary, flooded_summary = percentiles(idle), percentiles(flooded)
    return {
        "requests": args.requests,
        "accounts": args.accounts,
        "idle": idle_summary,
        "flooded": flooded_summary,
        "p50_ratio": round(flooded_summary["p50"] / idle_summary["p50"], 2),
        "flood": dict(sorted(flood.outcomes.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="the quiet server's, idle and flooded")
    parser.add_argument("--accounts", type=int, default=20, help="direct-message accounts asking meanwhile")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="least seconds between two commands of one flooding account"
    )
    parser.add_argument("--ramp-seconds", type=float, default=15.0, help="flooding before the quiet server asks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        result = asyncio.run(run(args, Path(directory)))
    print(json.dumps(result, indent=2))
    target = "within" if result["p50_ratio"] <= 2 else "NOT within"
    print(f"flooded p50 {result['p50_ratio']}x the idle p50: {target} the 2x target", file=sys.stderr)


if __name__ == "__main__":
    main()
