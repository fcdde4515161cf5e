"""The real bot process (``python main.py``) connected to the local Discord stand-in.

Importing the model stack takes seconds, so most tests share one bot process and isolate
themselves with a guild of their own; tests about restarts and kills start their own process.
Everything talks over 127.0.0.1 only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from tests.fake_discord.payloads import MANAGE_GUILD
from tests.fake_discord.server import FakeDiscord
from tests.helpers.e2e import BotProcess, Scene, new_bot


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def stand_in() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    # Heartbeats every 5 s (Discord: 41.25 s), so that the bot can notice a silent connection in 20 s; a
    # late heartbeat (the bot's loop busy on a loaded machine) is forgiven for 30 s.
    fake.gateway.heartbeat_interval_ms, fake.gateway.heartbeat_timeout = 5000, 30.0
    await fake.start()
    fake.admin_guild = fake.add_guild("Bot HQ")  # type: ignore[attr-defined]
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture(autouse=True)
def discord_limits_kept(stand_in: FakeDiscord) -> Iterator[None]:
    """Fails the test if the bot sent anything over Discord's limits, even if it swallowed the 400."""
    stand_in.check_violations(" after the previous test ended")  # the shared bot may still be at work
    yield
    stand_in.check_violations()


@pytest_asyncio.fixture(loop_scope="session", scope="session")
async def shared_bot(stand_in, model_dirs, tmp_path_factory) -> AsyncIterator[BotProcess]:
    bot = new_bot(stand_in, model_dirs, tmp_path_factory.mktemp("shared-bot"))
    await bot.start()
    try:
        yield bot
    finally:
        await bot.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def scene(stand_in, shared_bot) -> Scene:
    guild = await stand_in.join("Readers")
    reader = stand_in.add_member(guild, "reader")
    moderator = stand_in.add_member(guild, "moderator", permissions=MANAGE_GUILD | (1 << 31))
    return Scene(stand_in, guild, reader, moderator)
