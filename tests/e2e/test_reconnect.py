"""The real bot through the gateway's disruptions: each time it reconnects and still answers.

Discord asks for reconnects (op 7), times sessions out (close 4009, after which a RESUME is
refused and the bot must identify anew), and connections turn into zombies; a bot that failed to
come back would stay online but deaf to every command.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.fake_discord.gateway import Gateway, Session
from tests.helpers.e2e import E2E, Scene

pytestmark = E2E


async def _answers(scene: Scene) -> None:
    [answer] = await scene.ask("comprehend", image=scene.photo(), max_new_tokens=3)
    assert answer.embeds and not answer.ephemeral


async def _reconnected(gateway: Gateway, since: int, before: Session, *, resumed: bool) -> None:
    """The bot's next connection resumed ``before`` or, when it could not (it ended), identified a new session."""
    if resumed:
        await gateway.wait_for_reconnect(since, resumed=before, timeout=120)
    else:
        assert await gateway.wait_for_reconnect(since) is not before
        assert before.ended


@pytest_asyncio.fixture(loop_scope="session")
async def quick_heartbeats(stand_in, shared_bot) -> AsyncIterator[Gateway]:
    """The bot's connection made anew (op 7) to heartbeat every 0.2 s and time out after 2 s without one;
    after the test, anew again with the usual interval, so later tests are not timed out by a slow moment."""
    gateway = stand_in.gateway
    usual = gateway.heartbeat_interval_ms, gateway.heartbeat_timeout

    async def reconnect(interval_ms: int, timeout: float) -> None:
        gateway.heartbeat_interval_ms, gateway.heartbeat_timeout = interval_ms, timeout
        since = gateway.connections
        await gateway.reconnect()
        await gateway.wait_for_reconnect(since)

    await reconnect(200, 2.0)
    try:
        yield gateway
    finally:
        await reconnect(*usual)


async def test_after_a_reconnect_request_the_bot_resumes_and_misses_nothing(scene, stand_in):
    gateway = stand_in.gateway
    before, since = gateway.session_for(scene.guild.id), gateway.connections
    await gateway.reconnect()
    asked_meanwhile = await scene.send("comprehend", image=scene.photo(), max_new_tokens=3)  # replayed on resume
    await _reconnected(gateway, since, before, resumed=True)
    assert (await asked_meanwhile.answered())[0].embeds
    await _answers(scene)


async def test_after_a_session_timeout_the_bot_identifies_anew_and_answers(scene, stand_in):
    gateway = stand_in.gateway
    before, since, refused = gateway.session_for(scene.guild.id), gateway.connections, gateway.refused_resumes
    await gateway.drop(code=4009)
    await _reconnected(gateway, since, before, resumed=False)
    assert gateway.refused_resumes > refused  # it tried to resume and was told to identify
    await _answers(scene)


async def test_when_its_heartbeats_are_lost_the_gateway_times_the_bot_out_and_it_identifies_anew(
    scene, quick_heartbeats
):
    gateway = quick_heartbeats
    before, since, refused = gateway.session_for(scene.guild.id), gateway.connections, gateway.refused_resumes
    assert gateway.go_deaf() >= 1
    await _reconnected(gateway, since, before, resumed=False)
    assert gateway.refused_resumes > refused  # closed with 4009 by the stand-in's heartbeat check
    await _answers(scene)


async def test_when_the_gateway_goes_silent_the_bot_notices_and_resumes(scene, stand_in):
    """A zombie connection: open, but Discord sends nothing, heartbeat ACKs included. discord.py notices
    only when nothing at all has arrived for its ``heartbeat_timeout`` (``discord.heartbeat_timeout_seconds``,
    20 s here)."""
    gateway = stand_in.gateway
    before, since = gateway.session_for(scene.guild.id), gateway.connections
    assert gateway.go_silent() >= 1
    await _reconnected(gateway, since, before, resumed=True)
    await _answers(scene)
