"""A plain discord.py client logged in to the stand-in, for tests of the stand-in itself."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import discord
import yarl

from tests.fake_discord.messages import API
from tests.fake_discord.server import FakeDiscord


def new_client(**options: Any) -> discord.Client:
    """A guilds-only client that is 'ready' 50 ms after the last GUILD_CREATE (discord.py waits 2 s by default)."""
    return discord.Client(intents=discord.Intents(guilds=True), guild_ready_timeout=0.05, **options)


@contextlib.asynccontextmanager
async def connected(stand_in: FakeDiscord, client: discord.Client) -> AsyncIterator[discord.Client]:
    """``client`` logged in to the stand-in and ready until the block ends; discord.py's URLs restored after.

    discord.py keeps its REST base and gateway URL in class attributes, so two clients in one
    process cannot talk to different servers at once.
    """
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = f"{stand_in.base_url}{API}"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(stand_in.gateway.url)
    runner = asyncio.create_task(client.start(stand_in.token))
    try:
        await stand_in.gateway.wait_for_session()
        await asyncio.wait_for(client.wait_until_ready(), 10)
        yield client
    finally:
        await client.close()
        await runner
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway
