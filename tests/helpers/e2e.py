"""The real bot process (``python main.py``) and a scene of people on the local Discord stand-in.

Everything talks over 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from core.config import PROJECT_ROOT
from tests.fake_discord.payloads import Attachment, Guild, Member
from tests.fake_discord.records import Edit
from tests.fake_discord.server import FakeDiscord, InteractionRecord, Message
from tests.helpers.settings import IMAGES, free_port

E2E = pytest.mark.asyncio(loop_scope="session")
_START_TIMEOUT = 120


# Scenarios send many requests at once; the quotas and the line's shares have tests of their own.
RELAXED = {
    "FLAMINGO_SERVICE__MAX_QUEUE": "64",
    "FLAMINGO_QUOTAS__USER_COOLDOWN_SECONDS": "0",
    "FLAMINGO_QUOTAS__GUILD_IN_FLIGHT": "64",
    "FLAMINGO_QUOTAS__GUILD_PER_PERIOD": "100000",
    "FLAMINGO_QUOTAS__TASK_UPLOADS_IN_FLIGHT": "64",
    "FLAMINGO_QUOTAS__TASK_UPLOADS_PER_PERIOD": "100000",
}


class BotProcess:
    """One ``python main.py`` with its settings in the environment, as an operator would run it."""

    def __init__(self, discord: FakeDiscord, model_dir: Path, database: Path, admin_guild: Guild, log: Path) -> None:
        self.discord = discord
        self.log_path = log
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HF_HUB_OFFLINE": "1",
            "DISCORD_TOKEN": discord.token,
            "FLAMINGO_MODEL__NAME": str(model_dir),
            "FLAMINGO_MODEL__DEVICE": "cpu",
            "FLAMINGO_MODEL__PRECISION": "fp32",
            "FLAMINGO_DISCORD__API_BASE_URL": f"{discord.base_url}/api/v10",
            "FLAMINGO_DISCORD__GATEWAY_URL": discord.gateway.url,
            # The stand-in's heartbeats come every 5 s (``tests/e2e/conftest.py``): a zombie is noticed sooner.
            "FLAMINGO_DISCORD__HEARTBEAT_TIMEOUT_SECONDS": "20",
            "FLAMINGO_DISCORD__ADMIN_GUILD_ID": str(admin_guild.id),
            "FLAMINGO_STORAGE__DATABASE": str(database),
            "FLAMINGO_METRICS__ENABLED": "true",
            "FLAMINGO_METRICS__PORT": str(free_port()),
        } | RELAXED
        self.process: asyncio.subprocess.Process | None = None

    async def launch(self) -> None:
        """``python main.py``, without waiting for it to connect."""
        with self.log_path.open("a") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "main.py", cwd=PROJECT_ROOT, env=self.env, stdout=log, stderr=log
            )

    async def start(self, timeout: float = _START_TIMEOUT) -> None:
        """Launch it and wait until its gateway session has identified (its model loaded, its commands synced)."""
        sessions_before = len(self.discord.gateway.sessions)
        await self.launch()
        async with asyncio.timeout(timeout):
            while (
                len(self.discord.gateway.sessions) <= sessions_before
                or not self.discord.gateway.session.identified.is_set()
            ):
                if self.process.returncode is not None:
                    raise RuntimeError(f"the bot exited with {self.process.returncode}:\n{self.log()}")
                await asyncio.sleep(0.05)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), 60)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def scrape(self, path: str = "/metrics") -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.env['FLAMINGO_METRICS__PORT']}{path}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.text()


@dataclass
class Scene:
    """A fresh guild with a reader and a moderator, on the shared stand-in."""

    discord: FakeDiscord
    guild: Guild
    reader: Member
    moderator: Member

    async def send(
        self,
        command: str,
        member: Member | None = None,
        guild: Guild | None = None,
        *,
        raw: bool = False,
        **options: Any,
    ) -> InteractionRecord:
        """A slash command, refused before sending if no Discord client would send it (unless ``raw``)."""
        where = guild or self.guild
        payload = self.discord.interaction_payload(command, member or self.reader, where, raw=raw, **options)
        return await self.discord.send_interaction(payload)

    async def ask(
        self,
        command: str,
        member: Member | None = None,
        guild: Guild | None = None,
        *,
        raw: bool = False,
        **options: Any,
    ) -> list[Message]:
        record = await self.send(command, member, guild, raw=raw, **options)
        return await record.answered()

    def photo(self, name: str = "chelsea") -> Attachment:
        return self.discord.upload(f"{name}.jpg", (IMAGES / f"{name}.jpg").read_bytes(), "image/jpeg")


def new_bot(stand_in: FakeDiscord, model_dirs: dict[str, Path], directory: Path) -> BotProcess:
    return BotProcess(
        stand_in, model_dirs["llama"], directory / "tasks.db", stand_in.admin_guild, directory / "bot.log"
    )  # type: ignore[attr-defined]


def buttons(message: Message | Edit) -> dict[str, str]:
    """Label to custom_id, for every button of a message (or of one of its edits)."""
    return {button["label"]: button["custom_id"] for row in message.components for button in row.get("components", [])}


async def click(scene, message: Message, label: str, member: Member | None = None) -> InteractionRecord:
    custom_id = buttons(message)[label]
    payload = scene.discord.component_payload(message, custom_id, member or scene.reader, scene.guild)
    return await scene.discord.send_interaction(payload)
