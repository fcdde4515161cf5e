"""The bot as several gateway shards: Discord's recommended count, every guild answered on its shard."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.e2e import E2E, Scene, new_bot

pytestmark = [E2E, pytest.mark.shard]


async def test_two_shards_each_answer_their_guilds(scene, stand_in, model_dirs, tmp_path):
    stand_in.recommended_shards = 2
    bot = new_bot(stand_in, model_dirs, tmp_path)
    try:
        await bot.start()
        async with asyncio.timeout(60):
            while not {s.shard for s in stand_in.gateway.sessions.values() if s.identified.is_set()} >= {
                (0, 2),
                (1, 2),
            }:
                await asyncio.sleep(0.05)  # discord.py waits 5 s between two shards' identifies
        guilds = []
        while {(g.id >> 22) % 2 for g in guilds} != {0, 1}:
            guilds.append(await stand_in.join(f"Sharded {len(guilds)}"))
            await asyncio.sleep(0.002)  # guild ids are timestamps: the next one may land on the other shard
        for guild in guilds:
            here = Scene(stand_in, guild, stand_in.add_member(guild, "reader"), scene.moderator)
            answer = (await here.ask("comprehend", image=here.photo(), max_new_tokens=2))[0]
            assert answer.embeds and not answer.ephemeral
        owner = stand_in.admin_guild.members[stand_in.owner.id]
        status = (await scene.ask("admin status", owner, stand_in.admin_guild))[0]
        shards = {f["name"]: f["value"] for f in status.embeds[0]["fields"]}["Shards"]
        assert shards.startswith("0: ") and " · 1: " in shards
    finally:
        stand_in.recommended_shards = 1
        assert await bot.stop() == 0
