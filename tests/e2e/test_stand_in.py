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
from tests.fake_discord.incoming import NotSendable
from tests.fake_discord.outgoing import flatten
from tests.fake_discord.payloads import Member
from tests.fake_discord.server import API, FakeDiscord, Message

NO_PINGS = {"parse": []}  # discord.AllowedMentions.none(), as discord.py sends it
PING = {"id": "1", "name": "ping", "type": 1, "options": [{"type": 3, "name": "q", "autocomplete": True}]}


@pytest.fixture
async def stand_in():
    fake = FakeDiscord()
    await fake.start()
    fake.global_commands = [PING]
    try:
        yield fake
    finally:
        await fake.stop()


def _interaction(fake: FakeDiscord) -> dict:
    guild = fake.add_guild()
    return fake.interaction_payload("ping", Member(5, "user"), guild)


async def _post(session: aiohttp.ClientSession, url: str, body: dict, **kwargs) -> aiohttp.ClientResponse:
    return await session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}, **kwargs)


async def _respond(stand_in: FakeDiscord, payload: dict, body: dict, files: dict[str, bytes] | None = None):
    """The interaction's callback answered with ``body`` (and ``files``, as discord.py uploads them): (status, JSON)."""
    url = f"{stand_in.base_url}{API}/interactions/{payload['id']}/{payload['token']}/callback"
    async with aiohttp.ClientSession() as session:
        if files is None:
            response = await _post(session, url, body)
        else:
            form = aiohttp.FormData()
            form.add_field("payload_json", json.dumps(body), content_type="application/json")
            for index, (name, data) in enumerate(files.items()):
                form.add_field(f"files[{index}]", data, filename=name, content_type="application/octet-stream")
            response = await session.post(url, data=form)
        return response.status, await response.json()


def _invalid_form_body(stand_in: FakeDiscord, status: int, body: dict) -> list[str]:
    """The problems a 400 Invalid Form Body names, each also in the one violation the stand-in recorded."""
    assert (status, body["code"], body["message"]) == (400, 50035, "Invalid Form Body")
    problems = flatten(body["errors"])
    [violation] = stand_in.take_violations()
    assert all(problem in violation for problem in problems), (problems, violation)
    return problems


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


def _button(custom_id: str = "b", **fields) -> dict:
    return {"type": 2, "style": 1, "label": "B", "custom_id": custom_id} | fields


def _select(**fields) -> dict:
    return {"type": 3, "custom_id": "s", "options": [{"label": "a", "value": "a"}]} | fields


def _row(*components: dict) -> dict:
    return {"type": 1, "components": list(components)}


def _options(count: int, **fields) -> list[dict]:
    return [{"label": f"o{i}", "value": f"o{i}"} | fields for i in range(count)]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"content": "x" * 2001}, "content: Must be 2000 or fewer in length."),
        ({"embeds": [{"title": "t" * 257}]}, "embeds.0.title: Must be 256 or fewer in length."),
        ({"embeds": [{"description": "x" * 4097}]}, "embeds.0.description: Must be 4096 or fewer in length."),
        ({"embeds": [{"fields": [{"name": "n", "value": "v"}] * 26}]}, "embeds.0.fields: Must be 25 or fewer in"),
        ({"embeds": [{"fields": [{"name": "", "value": "v"}]}]}, "fields.0.name: Must be between 1 and 256 in"),
        ({"embeds": [{"fields": [{"name": "n" * 257, "value": "v"}]}]}, "fields.0.name: Must be between 1 and 256"),
        ({"embeds": [{"fields": [{"name": "n", "value": "v" * 1025}]}]}, "fields.0.value: Must be between 1 and 1024"),
        ({"embeds": [{"footer": {"text": "f" * 2049}}]}, "embeds.0.footer.text: Must be between 1 and 2048 in"),
        ({"embeds": [{"author": {"name": "a" * 257}}]}, "embeds.0.author.name: Must be between 1 and 256 in"),
        ({"embeds": [{"title": "t", "description": "x" * 4000}, {"description": "y" * 2000}]}, "Embed size exceeds"),
        ({"embeds": [{"description": "e"}] * 11}, "embeds: Must be 10 or fewer in length."),
        ({"components": [_row(_button(f"b{i}")) for i in range(6)]}, "components: Must be 5 or fewer in length."),
        (
            {"components": [_row(*(_button(f"b{i}") for i in range(6)))]},
            "components.0.components: Must be between 1 and 5",
        ),
        ({"components": [_row(_button("c" * 101))]}, "components.0.components.0.custom_id: Must be between 1 and 100"),
        ({"components": [_row(_button(label="l" * 81))]}, "components.0.components.0.label: Must be 80 or fewer"),
        ({"components": [_row(_button(), _button())]}, "components: Component custom id cannot be duplicated"),
        ({"components": [_row(_select(), _button())]}, "The specified component exceeds the maximum width"),
        ({"components": [_row(_select(placeholder="p" * 151))]}, "0.placeholder: Must be 150 or fewer in length."),
        ({"components": [_row(_select(options=_options(26)))]}, "0.options: Must be between 1 and 25 in length."),
        ({"components": [_row(_select(options=[{"label": "l" * 101, "value": "v"}]))]}, "options.0.label: Must be"),
        ({"components": [_row(_select(options=[{"label": "l", "value": "v" * 101}]))]}, "options.0.value: Must be"),
        ({"components": [_row(_select(options=_options(1, description="d" * 101)))]}, "options.0.description"),
        ({"content": "x", "allowed_mentions": {"parse": ["users"], "users": ["5"]}}, "are mutually exclusive"),
    ],
    ids=[
        "content",
        "title",
        "description",
        "field-count",
        "field-name-empty",
        "field-name",
        "field-value",
        "footer",
        "author",
        "embed-total",
        "embed-count",
        "rows",
        "buttons-per-row",
        "custom-id",
        "button-label",
        "same-custom-id",
        "select-beside-button",
        "placeholder",
        "option-count",
        "option-label",
        "option-value",
        "option-description",
        "allowed-mentions",
    ],
)
async def test_messages_over_discords_limits_are_refused_and_recorded(stand_in, data, problem):
    payload = _interaction(stand_in)
    status, body = await _respond(stand_in, payload, {"type": 4, "data": data})
    [found] = _invalid_form_body(stand_in, status, body)
    assert found.startswith("data.") and problem in found
    assert stand_in.record(payload).original is None


async def test_the_refusal_has_discords_shape_on_every_route_that_posts_or_edits_a_message(stand_in):
    payload = _interaction(stand_in)
    assert (await _respond(stand_in, payload, {"type": 5}))[0] == 200
    channel = stand_in.add_guild().channels[0]
    too_long = {"content": "x" * 2001}
    webhook = f"{stand_in.base_url}{API}/webhooks/{stand_in.application_id}/{payload['token']}"
    channel_messages = f"{stand_in.base_url}{API}/channels/{channel.id}/messages"
    bot = {"Authorization": f"Bot {stand_in.token}"}
    async with aiohttp.ClientSession() as session:
        posted = await session.post(channel_messages, json={"content": "fine"}, headers=bot)
        message_id = (await posted.json())["id"]
        answers = [
            await session.patch(f"{webhook}/messages/@original", json=too_long),
            await session.post(webhook, json=too_long),
            await session.post(channel_messages, json=too_long, headers=bot),
            await session.patch(f"{channel_messages}/{message_id}", json=too_long, headers=bot),
        ]
        bodies = [await answer.json() for answer in answers]
    assert [answer.status for answer in answers] == [400] * 4
    assert bodies[0] == {
        "message": "Invalid Form Body",
        "code": 50035,
        "errors": {
            "content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}
        },
    }
    assert all(b == bodies[0] for b in bodies)
    violations = stand_in.take_violations()
    assert [v.split(" (")[0] for v in violations] == [
        f"PATCH {API}/webhooks/{{app}}/{{token}}/messages/@original",
        f"POST {API}/webhooks/{{app}}/{{token}}",
        f"POST {API}/channels/{{channel_id}}/messages",
        f"PATCH {API}/channels/{{channel_id}}/messages/{{message_id}}",
    ]
    assert stand_in.channel_messages[channel.id][0].content == "fine"  # a refused edit changes nothing


async def test_an_empty_message_is_refused(stand_in):
    payload = _interaction(stand_in)
    status, body = await _respond(stand_in, payload, {"type": 4, "data": {"content": ""}})
    assert (status, body) == (400, {"message": "Cannot send an empty message", "code": 50006})
    assert len(stand_in.take_violations()) == 1


async def test_attachments_over_ten_or_over_the_size_limit_are_refused(stand_in):
    stand_in.attachment_size_limit = 1000  # what the next interactions tell the bot it may attach
    files = {f"{i}.bin": b"x" for i in range(11)}
    status, body = await _respond(stand_in, _interaction(stand_in), {"type": 4, "data": {}}, files)
    assert _invalid_form_body(stand_in, status, body) == ["data.attachments: Must be 10 or fewer in length."]

    payload = _interaction(stand_in)
    assert payload["attachment_size_limit"] == 1000
    status, body = await _respond(stand_in, payload, {"type": 4, "data": {}}, {"big.bin": b"x" * 1001})
    assert (status, body) == (413, {"message": "Request entity too large", "code": 40005})
    assert len(stand_in.take_violations()) == 1
    status, _ = await _respond(stand_in, payload, {"type": 4, "data": {}}, {"fits.bin": b"x" * 1000})
    assert status == 200 and stand_in.record(payload).original.files == {"fits.bin": b"x" * 1000}


def test_guilds_tell_discord_py_the_limit_a_test_raises():
    """discord.py reads a guild's upload limit from its boost level only."""
    fake = FakeDiscord()
    guild = fake.add_guild()
    assert discord.Guild._PREMIUM_GUILD_LIMITS[fake.guild_payload(guild)["premium_tier"]].filesize == 10 * 1024**2
    fake.attachment_size_limit = 50 * 1024**2
    assert discord.Guild._PREMIUM_GUILD_LIMITS[fake.guild_payload(guild)["premium_tier"]].filesize == 50 * 1024**2


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


@pytest.mark.parametrize(
    ("choices", "problem"),
    [
        ([{"name": f"task {i}", "value": str(i)} for i in range(26)], "data.choices: Must be 25 or fewer in length."),
        ([{"name": "", "value": "v"}], "data.choices.0.name: Must be between 1 and 100 in length."),
        ([{"name": "n" * 101, "value": "v"}], "data.choices.0.name: Must be between 1 and 100 in length."),
        ([{"name": "n", "value": "v" * 101}], "data.choices.0.value: Must be 100 or fewer in length."),
    ],
    ids=["count", "empty-name", "name", "value"],
)
async def test_autocomplete_choices_over_discords_limits_are_refused(stand_in, choices, problem):
    payload = stand_in.autocomplete_payload("ping", Member(5, "user"), stand_in.add_guild(), focused="q", q="ca")
    status, body = await _respond(stand_in, payload, {"type": 8, "data": {"choices": choices}})
    assert _invalid_form_body(stand_in, status, body) == [problem]
    assert stand_in.record(payload).choices is None


def _text_input(**fields) -> dict:
    return {"type": 4, "custom_id": "t", "style": 1, "label": "Name"} | fields


@pytest.mark.parametrize(
    ("modal", "problem"),
    [
        ({"title": "t" * 46}, "data.title: Must be between 1 and 45 in length."),
        ({"custom_id": "m" * 101}, "data.custom_id: Must be between 1 and 100 in length."),
        (
            {"components": [_row(_text_input(custom_id=f"t{i}")) for i in range(6)]},
            "data.components: Must be between 1 and 5 in length.",
        ),
        (
            {"components": [_row(_text_input(label="l" * 46))]},
            "data.components.0.components.0.label: Must be between 1 and 45 in length.",
        ),
        (
            {"components": [_row(_text_input(placeholder="p" * 101))]},
            "data.components.0.components.0.placeholder: Must be 100 or fewer in length.",
        ),
    ],
    ids=["title", "custom-id", "rows", "label", "placeholder"],
)
async def test_modals_over_discords_limits_are_refused(stand_in, modal, problem):
    payload = _interaction(stand_in)
    data = {"title": "Ask", "custom_id": "m", "components": [_row(_text_input())]} | modal
    status, body = await _respond(stand_in, payload, {"type": 9, "data": data})
    assert _invalid_form_body(stand_in, status, body) == [problem]


def _command(**fields) -> dict:
    return {"type": 1, "name": "ok", "description": "fine"} | fields


def _option(**fields) -> dict:
    return {"type": 3, "name": "text", "description": "fine"} | fields


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        (_command(name="Ping"), "0.name: Command name is invalid"),
        (_command(name="two words"), "0.name: Command name is invalid"),
        (_command(name="n" * 33), "0.name: Command name is invalid"),
        (_command(description=""), "0.description: Must be between 1 and 100 in length."),
        (_command(description="d" * 101), "0.description: Must be between 1 and 100 in length."),
        (_command(options=[_option(name=f"o{i}") for i in range(26)]), "0.options: Must be 25 or fewer in length."),
        (_command(options=[_option(name="Text")]), "0.options.0.name: Command name is invalid"),
        (
            _command(options=[_option(description="d" * 101)]),
            "0.options.0.description: Must be between 1 and 100 in length.",
        ),
        (
            _command(options=[_option(required=False), _option(name="b", required=True)]),
            "0.options: Required options must be before optional ones",
        ),
        (
            _command(options=[_option(choices=[{"name": "c", "value": f"{i}"} for i in range(26)])]),
            "0.options.0.choices: Must be 25 or fewer in length.",
        ),
        (
            _command(options=[_option(choices=[{"name": "c" * 101, "value": "v"}])]),
            "0.options.0.choices.0.name: Must be between 1 and 100 in length.",
        ),
        (
            _command(options=[_option(choices=[{"name": "c", "value": "v" * 101}])]),
            "0.options.0.choices.0.value: Must be 100 or fewer in length.",
        ),
        (_command(options=[_option(max_length=6001)]), "0.options.0.max_length: Must be between 1 and 6000."),
        ({"type": 3, "name": "Describe image", "description": "no"}, "0.description: Must be empty."),
        (
            _command(
                options=[
                    _option(name=f"o{i}", choices=[{"name": "c" * 100, "value": f"{j}"} for j in range(25)])
                    for i in range(2)
                ]
            ),
            "0: Command exceeds maximum size (4000)",
        ),
    ],
    ids=[
        "uppercase",
        "space",
        "long-name",
        "no-description",
        "long-description",
        "options",
        "option-name",
        "option-description",
        "required-after-optional",
        "choices",
        "choice-name",
        "choice-value",
        "max-length",
        "menu-description",
        "total-size",
    ],
)
async def test_commands_over_discords_limits_are_refused_at_registration(stand_in, command, problem):
    url = f"{stand_in.base_url}{API}/applications/{stand_in.application_id}/commands"
    async with aiohttp.ClientSession() as session:
        response = await session.put(url, json=[command], headers={"Authorization": f"Bot {stand_in.token}"})
        body = await response.json()
    assert _invalid_form_body(stand_in, response.status, body) == [problem]
    assert stand_in.global_commands == [PING]  # nothing registered


async def test_a_violation_the_bot_swallows_still_fails_the_test(stand_in):
    """The 400 reaches discord.py as an exception any bot may catch; the recorded violation does not go away."""
    client = new_client()
    tree = app_commands.CommandTree(client)
    caught = []

    @tree.command(description="too long")
    async def ramble(interaction: discord.Interaction) -> None:
        try:
            await interaction.response.send_message("x" * 2001)
        except discord.HTTPException as error:
            caught.append(error)
            await interaction.response.send_message("short")

    async with connected(stand_in, client):
        await tree.sync()
        record = await stand_in.send_interaction(stand_in.interaction_payload("ramble", Member(77, "user"), None))
        assert (await record.answered())[0].content == "short"
    assert [(e.status, e.code, e.text) for e in caught] == [
        (400, 50035, "Invalid Form Body\nIn data.content: Must be 2000 or fewer in length.")
    ]
    with pytest.raises(AssertionError, match=r"Must be 2000 or fewer in length"):
        stand_in.check_violations()
    stand_in.check_violations()  # reported once


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

        asked = await stand_in.send_interaction(stand_in.component_payload(picked, "name", user, guild))
        await asked.wait_for(lambda: asked.modal is not None)
        modal = asked.modal
        text_input = modal["components"][0]["components"][0]["custom_id"]
        submitted = await stand_in.send_interaction(
            stand_in.modal_payload(modal["custom_id"], {text_input: "Ada"}, user, guild)
        )
        assert [(m.content, m.ephemeral) for m in await submitted.answered()] == [("Hello Ada", True)]

        clicked = await stand_in.send_interaction(stand_in.component_payload(picked, "again", user, guild))
        await clicked.answered()
        assert (picked.content, picked.components) == ("clicked", [])

        target = stand_in.message_json(Message(123, content="quiet please"))
        shouted = await stand_in.send_interaction(stand_in.context_menu_payload("Shout", user, guild, target))
        assert [(m.content, m.ephemeral) for m in await shouted.answered()] == [("QUIET PLEASE", True)]


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
    click = stand_in.component_payload(answer, "x", user, guild, raw=True)  # the answer has no buttons
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
    assert len(stand_in.take_violations()) == 1


# What a Discord client sends: checked against what the bot registered, unless raw.

ASK = {
    "id": "10",
    "name": "ask",
    "type": 1,
    "description": "d",
    "options": [
        {"type": 4, "name": "count", "description": "d", "required": True, "min_value": 1, "max_value": 5},
        {"type": 10, "name": "ratio", "description": "d", "min_value": 0.5, "max_value": 1.0},
        {"type": 3, "name": "text", "description": "d", "min_length": 2, "max_length": 4},
        {"type": 3, "name": "mood", "description": "d", "choices": [{"name": "Happy", "value": "happy"}]},
        {"type": 3, "name": "topic", "description": "d", "autocomplete": True},
        {"type": 7, "name": "where", "description": "d", "channel_types": [5]},  # announcement channels
    ],
}
GROUP = {"id": "11", "name": "admin", "type": 1, "description": "d", "contexts": [0], "options": [_option(type=1)]}
LEGACY = {"id": "12", "name": "legacy", "type": 1, "description": "d", "dm_permission": False}


@pytest.mark.parametrize(
    ("command", "in_dm", "options", "refusal"),
    [
        ("ask", False, {"count": 0}, r"/ask count: 0, where 1 to 5 are registered"),
        ("ask", False, {"count": 6}, r"/ask count: 6, where 1 to 5"),
        ("ask", False, {"count": 2, "ratio": 1.5}, r"/ask ratio: 1\.5, where 0\.5 to 1\.0 are registered"),
        ("ask", False, {"count": 2, "text": "x"}, r"/ask text: 1 characters, where 2 to 4 are registered"),
        ("ask", False, {"count": 2, "text": "xxxxx"}, r"/ask text: 5 characters, where 2 to 4"),
        ("ask", False, {"count": 2, "mood": "sad"}, r"/ask mood offers only \['happy'\], not 'sad'"),
        ("ask", False, {"count": "2"}, r"/ask count takes integer values, not text"),
        ("ask", False, {"count": 2.5}, r"/ask count takes integer values, not number"),
        ("ask", False, {"count": 2, "extra": 1}, r"/ask has no option 'extra'"),
        ("ask", False, {"ratio": 0.7}, r"/ask needs count"),
        ("ask", False, {"count": 2, "where": "channel"}, r"/ask where offers channels of types \[5\], not 0"),
        ("admin text", True, {}, r"/admin is registered for servers only"),
        ("legacy", True, {}, r"/legacy is registered for servers only"),
        ("admin", False, {}, r"/admin is a group"),
        ("admin stop", False, {}, r"/admin has no subcommand 'stop'"),
    ],
    ids=[
        "below-min",
        "above-max",
        "number",
        "too-short",
        "too-long",
        "not-a-choice",
        "text-for-integer",
        "float-for-integer",
        "unknown",
        "missing-required",
        "channel-type",
        "contexts-guild-only",
        "dm-permission-false",
        "group",
        "unknown-subcommand",
    ],
)
def test_interactions_no_discord_client_sends_are_refused_unless_raw(stand_in, command, in_dm, options, refusal):
    stand_in.global_commands = [ASK, GROUP, LEGACY]
    guild = stand_in.add_guild()
    if options.get("where") == "channel":
        options["where"] = guild.channels[0]  # a text channel
    where = None if in_dm else guild
    with pytest.raises(NotSendable, match=refusal):
        stand_in.interaction_payload(command, Member(5, "user"), where, **options)
    sent = stand_in.interaction_payload(command, Member(5, "user"), where, raw=True, **options)
    assert sent["data"]["name"] == command.split()[0]


def test_autocomplete_comes_only_from_options_registered_with_it(stand_in):
    stand_in.global_commands = [ASK]
    guild, user = stand_in.add_guild(), Member(5, "user")
    typing = stand_in.autocomplete_payload("ask", user, guild, "topic", topic="ca", count=99)  # still being typed
    assert [o for o in typing["data"]["options"] if o.get("focused")] == [
        {"name": "topic", "type": 3, "value": "ca", "focused": True}
    ]
    with pytest.raises(NotSendable, match="/ask text is not registered with autocomplete"):
        stand_in.autocomplete_payload("ask", user, guild, "text", text="ca")
    assert stand_in.autocomplete_payload("ask", user, guild, "text", text="ca", raw=True)["type"] == 4


def test_clicks_and_modals_come_only_from_what_the_bot_showed(stand_in):
    guild, user = stand_in.add_guild(), Member(5, "user")
    shown = Message(1, content="pick", components=[_row(_button("on"), _button("off", disabled=True))])
    assert stand_in.component_payload(shown, "on", user, guild)["data"]["custom_id"] == "on"
    for custom_id, refusal in (("gone", "has no component 'gone'"), ("off", "'off' is disabled")):
        with pytest.raises(NotSendable, match=refusal):
            stand_in.component_payload(shown, custom_id, user, guild)
        assert stand_in.component_payload(shown, custom_id, user, guild, raw=True)["data"]["custom_id"] == custom_id
    with pytest.raises(NotSendable, match="never showed a modal 'form'"):
        stand_in.modal_payload("form", {"t": "Ada"}, user, guild)
    assert stand_in.modal_payload("form", {"t": "Ada"}, user, guild, raw=True)["data"]["custom_id"] == "form"
    stand_in.record(_interaction(stand_in)).modal = {
        "custom_id": "form",
        "components": [_row(_text_input(max_length=3))],
    }
    assert stand_in.modal_payload("form", {"t": "Ada"}, user, guild)["type"] == 5
    with pytest.raises(NotSendable, match="requires 't'"):
        stand_in.modal_payload("form", {}, user, guild)
    with pytest.raises(NotSendable, match="input 't': 4 characters, where at most 3 are registered"):
        stand_in.modal_payload("form", {"t": "Adam"}, user, guild)


def test_a_context_menu_is_sent_only_for_a_message_command(stand_in):
    with pytest.raises(NotSendable, match="ping is not registered as a command of type 3"):
        stand_in.context_menu_payload("ping", Member(5, "user"), None, stand_in.message_json(Message(1, "hi")))


# The gateway: reconnects Discord asks for, sessions that time out, and zombie connections.


@pytest.mark.parametrize("ending", ["no heartbeat", "closed with 4009"])
async def test_a_session_that_timed_out_cannot_be_resumed(stand_in, ending):
    gateway = stand_in.gateway
    gateway.heartbeat_timeout = 0.3 if ending == "no heartbeat" else 60
    url = f"{gateway.url}?v=10&encoding=json"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            assert (await ws.receive_json(timeout=5))["op"] == 10
            await ws.send_json({"op": 2, "d": {"token": stand_in.token, "intents": 1}})
            ready = await ws.receive_json(timeout=5)
            if ending == "closed with 4009":
                await gateway.drop(code=4009)
            closing = await ws.receive(timeout=5)  # without a heartbeat, the stand-in closes it after 0.3 s
            assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 4009)
        async with session.ws_connect(url) as ws:
            await ws.receive_json(timeout=5)
            resume = {"token": stand_in.token, "session_id": ready["d"]["session_id"], "seq": ready["s"]}
            await ws.send_json({"op": 6, "d": resume})
            assert await ws.receive_json(timeout=5) == {"op": 9, "d": False}
    assert (gateway.resumes, gateway.refused_resumes, gateway.session.ended) == (0, 1, True)


@pytest.mark.parametrize(
    ("disruption", "resumed"),
    [("op 7 reconnect", True), ("silent zombie", True), ("lost heartbeats", False), ("close 4009", False)],
)
async def test_discord_py_reconnects_after_every_gateway_disruption(stand_in, disruption, resumed):
    """op 7 and a silent connection are resumed; a timed-out session (4009) needs a new IDENTIFY."""
    gateway = stand_in.gateway
    gateway.heartbeat_interval_ms, gateway.heartbeat_timeout = 200, 1.0
    # How long discord.py waits for any message before it reconnects: short to notice the silent zombie
    # soon; else the default, as it reads nothing in the 5 s it waits before each new IDENTIFY.
    client = new_client(heartbeat_timeout=1.0 if disruption == "silent zombie" else 60)
    tree = app_commands.CommandTree(client)

    @tree.command(description="pong")
    async def pong(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong")

    async with connected(stand_in, client):
        await tree.sync()
        guild, before, since = await stand_in.join(), gateway.session, gateway.connections
        if disruption == "op 7 reconnect":
            await gateway.reconnect()
        elif disruption == "silent zombie":
            assert gateway.go_silent() == 1  # no ACK, nothing at all: discord.py must notice by itself
        elif disruption == "lost heartbeats":
            assert gateway.go_deaf() == 1  # the stand-in closes it with 4009 when heartbeat_timeout passes
        else:
            await gateway.drop(code=4009)
        after = await gateway.wait_for_reconnect(since, timeout=30)
        assert (after is before, gateway.refused_resumes) == (resumed, 0 if resumed else 1)
        record = await stand_in.send_interaction(stand_in.interaction_payload("pong", Member(77, "user"), guild))
        assert (await record.answered())[0].content == "pong"


# Discord's CDN: signed links that expire, and injected faults.


async def test_cdn_links_are_signed_and_expire(stand_in):
    fresh, expired, later = (stand_in.upload(f"{name}.png", name.encode()) for name in ("fresh", "expired", "later"))
    stand_in.expire(expired)
    async with aiohttp.ClientSession() as session:

        async def get(url: str) -> tuple[int, bytes]:
            async with session.get(url) as response:
                return response.status, await response.read()

        assert await get(fresh.url) == (200, b"fresh")
        gone = (404, b"This content is no longer available.")
        assert await get(expired.url) == gone
        assert await get(fresh.url.replace("ex=", "ex=f")) == gone  # a later expiry the signature does not cover
        assert await get(fresh.url.split("?")[0]) == gone
        stand_in.clock.advance(24 * 3600 + 1)
        assert await get(later.url) == gone


async def test_injected_cdn_faults(stand_in):
    refused, missing, cut_off = (stand_in.upload(f"{name}.png", b"x" * 1000) for name in ("a", "b", "c"))
    stand_in.cdn_statuses |= {refused.id: 403, missing.id: 404}
    stand_in.cdn_stalls.add(cut_off.id)
    async with aiohttp.ClientSession() as session:
        assert [(await session.get(u.url)).status for u in (refused, missing)] == [403, 404]
        async with session.get(cut_off.url) as response:
            assert (response.status, response.content_length) == (200, 1000)
            assert await response.content.readexactly(500) == b"x" * 500
            with pytest.raises(TimeoutError):  # the rest never comes
                await asyncio.wait_for(response.read(), 0.3)
