"""The real bot, logged in to the local Discord stand-in, with a tiny model behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from cogs.utils.bot import FlamingoBot
from core.config import DiscordSettings, QuotaSettings, StorageSettings
from core.serving.local import InferenceService
from tests.fake_discord.payloads import MANAGE_GUILD, Guild, Member
from tests.fake_discord.server import FakeDiscord, InteractionRecord, Message
from tests.helpers.settings import tiny_settings


@dataclass
class BotWorld:
    discord: FakeDiscord
    bot: FlamingoBot
    guild: Guild
    admin_guild: Guild
    member: Member
    moderator: Member

    def invoke(
        self,
        command: str,
        member: Member | None = None,
        guild: Guild | str | None = "default",
        *,
        raw: bool = False,
        **options: Any,
    ) -> InteractionRecord:
        """Send a slash command the way the gateway would deliver it (``raw``: even what no client sends)."""
        where = self.guild if guild == "default" else guild
        payload = self.discord.interaction_payload(command, member or self.member, where, raw=raw, **options)
        self.bot._connection.parse_interaction_create(payload)
        return self.discord.record(payload)

    async def reply(
        self,
        command: str,
        member: Member | None = None,
        guild: Guild | str | None = "default",
        *,
        raw: bool = False,
        **options: Any,
    ) -> list[Message]:
        return await self.invoke(command, member, guild, raw=raw, **options).answered()


@pytest.fixture
async def world(model_dirs, llama_engine, tmp_path) -> AsyncIterator[BotWorld]:
    fake = FakeDiscord()
    api = await fake.start()
    guild, admin_guild = fake.add_guild("Readers"), fake.add_guild("Bot HQ")
    settings = tiny_settings(model_dirs["llama"]).model_copy(
        update={
            "discord": DiscordSettings(api_base_url=api, admin_guild_id=admin_guild.id),
            "storage": StorageSettings(database=tmp_path / "tasks.db"),
            # Tests send many requests at once; the quotas have tests of their own.
            "quotas": QuotaSettings(user_cooldown_seconds=0, guild_in_flight=64, guild_per_period=10_000),
        }
    )
    bot = FlamingoBot(settings, service=InferenceService(llama_engine, max_queue=8))
    await bot.login(fake.token)
    world = BotWorld(
        fake,
        bot,
        guild,
        admin_guild,
        fake.add_member(guild, "reader"),
        fake.add_member(guild, "moderator", permissions=MANAGE_GUILD | (1 << 31)),
    )
    try:
        yield world
    finally:
        await bot.close()
        await fake.stop()
    fake.check_violations()  # the bot sent nothing over Discord's limits, even if it swallowed the 400
