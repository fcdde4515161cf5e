"""The stand-in rejects what Discord rejects, so a lenient fake cannot hide bot bugs."""

from __future__ import annotations

import asyncio
import io
import json
import zlib

import aiohttp
import discord
import pytest
from discord import app_commands

from tests.fake_discord.client import connected, new_client
from tests.fake_discord.payloads import Member
from tests.fake_discord.server import API, FakeDiscord, Message

NO_PINGS = {"parse": []}  # discord.AllowedMentions.none(), as discord.py sends it


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
    client = new_client()
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

    async with connected(stand_in, client):
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


async def test_channels_nsfw_flags_and_the_channel_an_interaction_comes_from(stand_in):
    client = new_client()
    tree = app_commands.CommandTree(client)

    @tree.command(description="where am I")
    async def where(interaction: discord.Interaction) -> None:
        channel = interaction.channel
        await interaction.response.send_message(f"{channel.name} {channel.is_nsfw()} {channel.id}")

    early = stand_in.add_guild("Early")
    lounge = await stand_in.add_channel(early, "lounge", nsfw=True)  # before the bot connects: in GUILD_CREATE
    async with connected(stand_in, client):
        await tree.sync()
        assert client.get_channel(lounge.id).is_nsfw()
        guild = await stand_in.join("Late")
        created, night = await asyncio.gather(
            client.wait_for("guild_channel_create", timeout=5), stand_in.add_channel(guild, "night", nsfw=True)
        )
        assert (created.id, created.name, created.is_nsfw()) == (night.id, "night", True)
        assert [c.name for c in client.get_guild(guild.id).text_channels] == ["general", "night"]

        user = Member(77, "user")
        record = await stand_in.send_interaction(stand_in.interaction_payload("where", user, guild, in_channel=night))
        answer = (await record.answered())[0]
        assert answer.content == f"night True {night.id}"
        assert answer.channel_id == night.id == record.channel_id
        assert stand_in.message_json(answer)["channel_id"] == str(night.id)

        usual = await stand_in.send_interaction(stand_in.interaction_payload("where", user, guild))
        assert (await usual.answered())[0].content == f"general False {guild.channels[0].id}"

    # A click on a button comes from the channel of the message it is on.
    click = stand_in.component_payload(answer, "x", user, guild)
    assert click["channel_id"] == click["message"]["channel_id"] == str(night.id)
    with pytest.raises(ValueError, match="not in"):
        stand_in.interaction_payload("where", user, guild, in_channel=lounge)


async def test_roles_reach_discord_py_members(stand_in):
    client = new_client()
    tree = app_commands.CommandTree(client)

    @tree.command(description="roles")
    async def roles(interaction: discord.Interaction) -> None:
        names = [role.name for role in interaction.user.roles]  # a discord.Member: @everyone first
        await interaction.response.send_message(", ".join(names))

    guild = stand_in.add_guild()
    helpers = await stand_in.add_role(guild, "helpers")  # before the bot connects: in GUILD_CREATE
    async with connected(stand_in, client):
        await tree.sync()
        created, mods = await asyncio.gather(
            client.wait_for("guild_role_create", timeout=5), stand_in.add_role(guild, "mods", permissions=1 << 5)
        )
        assert (created.id, created.permissions.manage_guild) == (mods.id, True)
        member = stand_in.add_member(guild, "helper")
        member.roles += [helpers.id, mods.id]
        record = await stand_in.send_interaction(stand_in.interaction_payload("roles", member, guild))
        assert (await record.answered())[0].content == "@everyone, helpers, mods"


async def test_discord_py_posts_and_deletes_channel_messages(stand_in):
    client = new_client(allowed_mentions=discord.AllowedMentions.none())
    async with connected(stand_in, client):
        guild = await stand_in.join()
        _, channel = await asyncio.gather(
            client.wait_for("guild_channel_create", timeout=5), stand_in.add_channel(guild, "announcements")
        )
        sent = await client.get_channel(channel.id).send("hello <@5>")
        picture = await client.get_channel(channel.id).send(file=discord.File(io.BytesIO(b"png"), "a.png"))
        posted = await stand_in.wait_for_channel_messages(channel, 2)
        assert [(m.id, m.content, m.files, m.channel_id, m.type) for m in posted] == [
            (sent.id, "hello <@5>", {}, channel.id, 0),
            (picture.id, "", {"a.png": b"png"}, channel.id, 0),
        ]
        assert (sent.channel.id, posted[0].allowed_mentions, posted[0].silent) == (channel.id, NO_PINGS, True)

        await sent.delete()
        assert posted[0].deleted
        assert await stand_in.wait_for_channel_messages(channel) == [posted[1]]
        with pytest.raises(discord.NotFound) as gone:
            await sent.delete()
        assert gone.value.code == 10008
        with pytest.raises(discord.NotFound) as unknown:
            await client.get_partial_messageable(12345).send("anyone?")
        assert unknown.value.code == 10003
    async with aiohttp.ClientSession() as session:
        anonymous = await _post(session, f"{stand_in.base_url}{API}/channels/{channel.id}/messages", {"content": "x"})
    assert anonymous.status == 401


async def test_interaction_responses_are_channel_messages_too(stand_in):
    """``interaction.message.delete()`` goes through the channel route; ephemeral messages are not there."""
    client = new_client()
    tree = app_commands.CommandTree(client)

    class Remove(discord.ui.View):
        @discord.ui.button(label="Remove", custom_id="remove")
        async def remove(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            await interaction.response.defer()
            try:
                await interaction.message.delete()
            except discord.NotFound as error:
                await interaction.followup.send(f"cannot: {error.code}", ephemeral=True)

    @tree.command(description="post")
    async def post(interaction: discord.Interaction, secret: bool) -> None:
        await interaction.response.send_message("removable", view=Remove(), ephemeral=secret)

    async with connected(stand_in, client):
        await tree.sync()
        guild, user = await stand_in.join(), Member(77, "user")
        public = await stand_in.send_interaction(stand_in.interaction_payload("post", user, guild, secret=False))
        message = (await public.answered())[0]
        await stand_in.send_interaction(stand_in.component_payload(message, "remove", user, guild))
        await public.wait_for(lambda: message.deleted)
        assert public.visible == []

        private = await stand_in.send_interaction(stand_in.interaction_payload("post", user, guild, secret=True))
        message = (await private.answered())[0]
        click = await stand_in.send_interaction(stand_in.component_payload(message, "remove", user, guild))
        await click.wait_for(lambda: bool(click.followups))
        assert (message.deleted, click.followups[0].content) == (False, "cannot: 10008")


async def test_removing_the_bot_sends_guild_delete_and_forgets_its_commands(stand_in):
    client = new_client()
    tree = app_commands.CommandTree(client)

    @tree.command(description="local")
    async def local(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("here")

    async with connected(stand_in, client):
        guild = await stand_in.join("Leaving")
        tree.copy_global_to(guild=discord.Object(guild.id))
        await tree.sync(guild=discord.Object(guild.id))
        assert stand_in.command("local", guild)
        removed, _ = await asyncio.gather(client.wait_for("guild_remove", timeout=5), stand_in.remove_bot(guild))
        assert removed.id == guild.id
        assert client.get_guild(guild.id) is None
        assert guild.id not in stand_in.guild_commands
        with pytest.raises(LookupError):
            stand_in.command("local", guild)
        with pytest.raises(discord.Forbidden) as refused:
            await client.get_partial_messageable(guild.channels[0].id).send("still here?")
        assert refused.value.code == 50001
    assert stand_in.gateway.session.events[-1]["d"] == {"id": str(guild.id)}  # no "unavailable": removed


async def test_allowed_mentions_are_recorded_on_every_message_the_bot_sends(stand_in):
    client = new_client(allowed_mentions=discord.AllowedMentions.none())
    tree = app_commands.CommandTree(client)

    class Poke(discord.ui.View):
        @discord.ui.button(label="Poke", custom_id="poke")
        async def poke(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            await interaction.response.edit_message(content="poked <@5>", view=None)

    @tree.command(description="chatty")
    async def chatty(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await interaction.followup.send("@everyone first")
        await interaction.followup.send("<@5> second")
        await interaction.edit_original_response(content="@here edited")

    @tree.command(description="ping one user on purpose")
    async def ping(interaction: discord.Interaction) -> None:
        mentions = discord.AllowedMentions(users=[discord.Object(5)])
        await interaction.response.send_message("<@5>", allowed_mentions=mentions, view=Poke())

    async with connected(stand_in, client):
        await tree.sync()
        guild, user = await stand_in.join(), Member(77, "user")
        talk = await stand_in.send_interaction(stand_in.interaction_payload("chatty", user, guild))
        await talk.wait_for(lambda: len(talk.visible) == 2 and talk.visible[0].content == "@here edited")
        assert [(m.allowed_mentions, m.silent) for m in talk.visible] == [(NO_PINGS, True)] * 2

        pinged = await stand_in.send_interaction(stand_in.interaction_payload("ping", user, guild))
        message = (await pinged.answered())[0]
        assert (message.allowed_mentions, message.silent) == ({"parse": [], "users": [5]}, False)  # ints, not strings
        poked = await stand_in.send_interaction(stand_in.component_payload(message, "poke", user, guild))
        await poked.answered()
        assert (message.content, message.allowed_mentions) == ("poked <@5>", NO_PINGS)

    # Without allowed_mentions, Discord's default lets every mention in new content ping.
    payload = _interaction(stand_in)
    url = f"{stand_in.base_url}{API}/interactions/{payload['id']}/{payload['token']}/callback"
    async with aiohttp.ClientSession() as session:
        await _post(session, url, {"type": 4, "data": {"content": "<@5>"}})
        bad = {"content": "x", "allowed_mentions": {"parse": ["users"], "users": ["5"]}}
        refused = await _post(session, f"{stand_in.base_url}{API}/webhooks/1/{payload['token']}", bad)
    assert (stand_in.record(payload).original.allowed_mentions, refused.status) == (None, 400)
