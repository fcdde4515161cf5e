"""The stand-in rejects what Discord rejects, so a lenient fake cannot hide bot bugs."""

from __future__ import annotations

import asyncio
import json
import zlib

import aiohttp
import discord
import pytest
import yarl
from discord import app_commands

from tests.fake_discord.payloads import Member
from tests.fake_discord.server import API, FakeDiscord, Message


@pytest.fixture
async def stand_in():
    fake = FakeDiscord()
    await fake.start()
    fake.global_commands = [{"id": "1", "name": "ping", "type": 1}]
    try:
        yield fake
    finally:
        await fake.stop()


def _interaction(fake: FakeDiscord) -> dict:
    guild = fake.add_guild()
    return fake.interaction_payload("ping", Member(5, "user"), guild)


async def _post(session: aiohttp.ClientSession, url: str, body: dict, **kwargs) -> aiohttp.ClientResponse:
    return await session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}, **kwargs)


async def test_bot_routes_need_the_bot_token(stand_in):
    async with aiohttp.ClientSession() as session:
        missing = await session.get(f"{stand_in.base_url}{API}/users/@me")
        wrong = await session.get(f"{stand_in.base_url}{API}/users/@me", headers={"Authorization": "Bot nope"})
        right = await session.get(
            f"{stand_in.base_url}{API}/users/@me", headers={"Authorization": f"Bot {stand_in.token}"}
        )
    assert (missing.status, wrong.status, right.status) == (401, 401, 200)
    assert right.headers["Content-Type"] == "application/json"


async def test_acknowledging_after_three_seconds_is_an_unknown_interaction(stand_in):
    payload = _interaction(stand_in)
    stand_in.clock.advance(3.5)
    url = f"{stand_in.base_url}{API}/interactions/{payload['id']}/{payload['token']}/callback"
    async with aiohttp.ClientSession() as session:
        response = await _post(session, url, {"type": 4, "data": {"content": "late"}})
        body = await response.json()
    assert response.status == 404
    assert body["code"] == 10062


async def test_a_second_acknowledgement_is_refused(stand_in):
    payload = _interaction(stand_in)
    url = f"{stand_in.base_url}{API}/interactions/{payload['id']}/{payload['token']}/callback"
    async with aiohttp.ClientSession() as session:
        first = await _post(session, url, {"type": 5})
        second = await _post(session, url, {"type": 4, "data": {"content": "again"}})
        body = await second.json()
    assert first.status == 200
    assert (second.status, body["code"]) == (400, 40060)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"content": "x" * 2001}, "content: Must be 2000 or fewer in length."),
        ({"embeds": [{"description": "x" * 4097}]}, "embeds.description: Must be 4096 or fewer in length."),
        ({"embeds": [{"description": "d", "fields": [{"name": "n", "value": "v" * 1025}]}]}, "embeds.fields.value"),
        ({"embeds": [{"title": "t", "description": "x" * 4000}, {"description": "y" * 2500}]}, "Embed size exceeds"),
        ({"embeds": [{"description": "e"}] * 11}, "embeds: Must be 10 or fewer in length."),
        ({"content": ""}, "Cannot send an empty message"),
    ],
    ids=["content", "description", "field", "embed-total", "embed-count", "empty"],
)
async def test_messages_over_discords_limits_are_refused(stand_in, data, problem):
    payload = _interaction(stand_in)
    url = f"{stand_in.base_url}{API}/interactions/{payload['id']}/{payload['token']}/callback"
    async with aiohttp.ClientSession() as session:
        response = await _post(session, url, {"type": 4, "data": data})
        body = await response.json()
    assert response.status == 400
    assert body["code"] == 50035
    assert problem in body["message"]
    assert stand_in.record(payload).original is None


async def test_interaction_tokens_expire_after_fifteen_minutes(stand_in):
    payload = _interaction(stand_in)
    base = f"{stand_in.base_url}{API}"
    async with aiohttp.ClientSession() as session:
        await _post(session, f"{base}/interactions/{payload['id']}/{payload['token']}/callback", {"type": 5})
        stand_in.clock.advance(15 * 60 + 1)
        response = await _post(
            session, f"{base}/webhooks/{stand_in.application_id}/{payload['token']}", {"content": "hi"}
        )
        body = await response.json()
    assert (response.status, body["code"]) == (401, 50027)


async def test_injected_429_looks_like_discords(stand_in):
    stand_in.limits.inject("GET", "/users/@me", retry_after=0.5)
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bot {stand_in.token}"}
        limited = await session.get(f"{stand_in.base_url}{API}/users/@me", headers=headers)
        body = await limited.json()
        after = await session.get(f"{stand_in.base_url}{API}/users/@me", headers=headers)
    assert limited.status == 429
    assert limited.headers["Content-Type"] == "application/json"
    assert limited.headers["Via"] == "1.1 google"
    assert body == {"message": "You are being rate limited.", "retry_after": 0.5, "global": False}
    assert after.status == 200


async def test_rate_limit_buckets_when_switched_on(stand_in):
    stand_in.limits.enabled = True
    stand_in.limits.limit = 2
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bot {stand_in.token}"}
        statuses = [(await session.get(f"{stand_in.base_url}{API}/users/@me", headers=headers)) for _ in range(3)]
    assert [r.status for r in statuses] == [200, 200, 429]
    assert statuses[0].headers["X-RateLimit-Remaining"] == "1"
    assert statuses[2].headers["X-RateLimit-Bucket"] == statuses[0].headers["X-RateLimit-Bucket"]


async def _receive(ws: aiohttp.ClientWebSocketResponse, inflator) -> dict:
    message = await ws.receive(timeout=5)
    return json.loads(inflator.decompress(message.data))


async def test_gateway_refuses_a_bad_token_and_replays_missed_events_on_resume(stand_in):
    url = f"{stand_in.gateway.url}?v=10&encoding=json&compress=zlib-stream"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            inflator = zlib.decompressobj()
            assert (await _receive(ws, inflator))["op"] == 10
            await ws.send_json({"op": 2, "d": {"token": "wrong", "intents": 1}})
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4004

        async with session.ws_connect(url) as ws:
            inflator = zlib.decompressobj()
            await _receive(ws, inflator)
            await ws.send_json({"op": 2, "d": {"token": stand_in.token, "intents": 1}})
            ready = await _receive(ws, inflator)
            assert ready["t"] == "READY" and ready["d"]["resume_gateway_url"] == stand_in.gateway.url
            session_id, seq = ready["d"]["session_id"], ready["s"]
        await stand_in.gateway.session.dispatch("INTERACTION_CREATE", {"id": "missed"})

        async with session.ws_connect(url) as ws:
            inflator = zlib.decompressobj()
            await _receive(ws, inflator)
            await ws.send_json({"op": 6, "d": {"token": stand_in.token, "session_id": session_id, "seq": seq}})
            replayed = await _receive(ws, inflator)
            resumed = await _receive(ws, inflator)
    assert (replayed["t"], replayed["d"]["id"]) == ("INTERACTION_CREATE", "missed")
    assert resumed["t"] == "RESUMED"


async def test_autocomplete_with_too_many_choices_is_refused(stand_in):
    payload = stand_in.autocomplete_payload("ping", Member(5, "user"), stand_in.add_guild(), focused="q", q="ca")
    url = f"{stand_in.base_url}{API}/interactions/{payload['id']}/{payload['token']}/callback"
    choices = [{"name": f"task {i}", "value": str(i)} for i in range(26)]
    async with aiohttp.ClientSession() as session:
        response = await _post(session, url, {"type": 8, "data": {"choices": choices}})
        body = await response.json()
    assert (response.status, body["code"]) == (400, 50035)
    assert "Must be 25 or fewer" in body["message"]


async def test_discord_py_handles_every_interaction_kind_through_the_stand_in(stand_in):
    """A plain discord.py client: context menu, autocomplete, a button and a modal round-trip."""
    discord.http.Route.BASE = f"{stand_in.base_url}{API}"
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(stand_in.gateway.url)
    client = discord.Client(intents=discord.Intents(guilds=True))
    tree = app_commands.CommandTree(client)

    class Name(discord.ui.Modal, title="Your name"):
        name = discord.ui.TextInput(label="Name")

        async def on_submit(self, interaction: discord.Interaction) -> None:
            await interaction.response.send_message(f"Hello {self.name.value}", ephemeral=True)

    class Buttons(discord.ui.View):
        @discord.ui.button(label="Again", custom_id="again")
        async def again(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            await interaction.response.edit_message(content="clicked", view=None)

        @discord.ui.button(label="Name", custom_id="name")
        async def ask_name(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            await interaction.response.send_modal(Name())

    @tree.command(description="pick")
    async def pick(interaction: discord.Interaction, fruit: str) -> None:
        await interaction.response.send_message(f"picked {fruit}", view=Buttons())

    @pick.autocomplete("fruit")
    async def fruits(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=f, value=f) for f in ("apple", "apricot", "banana") if f.startswith(current)]

    @tree.context_menu(name="Shout")
    async def shout(interaction: discord.Interaction, message: discord.Message) -> None:
        await interaction.response.send_message(message.content.upper(), ephemeral=True)

    runner = asyncio.create_task(client.start(stand_in.token))
    try:
        await stand_in.gateway.wait_for_session()
        await tree.sync()
        guild, user = stand_in.add_guild(), Member(77, "user")

        typing = await stand_in.send_interaction(
            stand_in.autocomplete_payload("pick", user, guild, "fruit", fruit="ap")
        )
        await typing.wait_for(lambda: typing.choices is not None)
        assert [c["name"] for c in typing.choices] == ["apple", "apricot"]

        picking = await stand_in.send_interaction(stand_in.interaction_payload("pick", user, guild, fruit="apple"))
        picked = (await picking.answered())[0]
        assert picked.content == "picked apple"
        assert [c["custom_id"] for c in picked.components[0]["components"]] == ["again", "name"]

        clicked = await stand_in.send_interaction(stand_in.component_payload(picked, "again", user, guild))
        await clicked.answered()
        assert (picked.content, picked.components) == ("clicked", [])

        target = stand_in.message_json(Message(123, content="quiet please"))
        shouted = await stand_in.send_interaction(stand_in.context_menu_payload("Shout", user, guild, target))
        assert [(m.content, m.ephemeral) for m in await shouted.answered()] == [("QUIET PLEASE", True)]

        asked = await stand_in.send_interaction(stand_in.component_payload(picked, "name", user, guild))
        await asked.wait_for(lambda: asked.modal is not None)
        modal = asked.modal
        text_input = modal["components"][0]["components"][0]["custom_id"]
        submitted = await stand_in.send_interaction(
            stand_in.modal_payload(modal["custom_id"], {text_input: "Ada"}, user, guild)
        )
        assert [(m.content, m.ephemeral) for m in await submitted.answered()] == [("Hello Ada", True)]
    finally:
        await client.close()
        await runner
