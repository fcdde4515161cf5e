"""``/queue``: anyone sees the line, how long answers take lately, their own places and their quota, privately."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.fake_discord.payloads import Member
from tests.fake_discord.server import Message
from tests.helpers.e2e import E2E, Scene

pytestmark = [E2E, pytest.mark.queue]

LATELY = re.compile(
    r"A request typically waits (under 0\.1|\d+\.\d) s in line and takes (under 0\.1|\d+\.\d) s to answer "
    r"\(the median of (\d+) answers? in the last 10 minutes\)\."
)


def _fields(message: Message) -> dict[str, str]:
    assert message.ephemeral
    [embed] = message.embeds
    assert embed["title"] == "The model's line"
    return {field["name"]: field["value"] for field in embed["fields"]}


async def _queue(scene: Scene, member: Member | None = None) -> dict[str, str]:
    return _fields((await scene.ask("queue", member))[0])


async def _once_quiet(scene: Scene) -> dict[str, str]:
    """``/queue`` once the shared bot has finished what earlier tests left it."""
    async with asyncio.timeout(120):
        while (fields := await _queue(scene))["Line"] != "Empty: a request starts at once.":
            await asyncio.sleep(0.5)
    return fields


async def test_a_busy_line_shows_the_askers_places_and_then_the_typical_times(scene, shared_bot):
    long = {"max_new_tokens": 256, "min_new_tokens": 256, "num_beams": 5}  # a second or so each, one at a time
    records = [await scene.send("comprehend", image=scene.photo("rocket"), **long) for _ in range(6)]
    async with asyncio.timeout(60):  # until one shows its place in line
        while not any(record.original and record.original.content.startswith("⏳") for record in records):
            await asyncio.sleep(0.05)

    mine = await _queue(scene)
    line = re.fullmatch(r"(\d) waiting · 1 being answered", mine["Line"])
    assert line, mine["Line"]
    waiting = int(line[1])
    assert waiting >= 1
    # Only the reader's requests are in line: their places are the whole line's.
    places = ", ".join(str(place) for place in range(1, waiting)) + " and " if waiting > 1 else ""
    assert mine["Your requests"] == f"number {places}{waiting} in line · 1 being answered"
    assert mine["Model"] == f"**{shared_bot.env['FLAMINGO_MODEL__NAME'].rsplit('/', 1)[-1]}**"
    quota = re.fullmatch(
        r"(\d) of 64 answered or waiting at once\n99994 of 100000 left per hour \(one more back in 60 min\)\n"
        r"You can ask now\.",
        mine["This server's quota"],
    )
    assert quota and int(quota[1]) >= waiting + 1, mine["This server's quota"]  # perhaps one just answered
    assert "Asking here" not in mine

    others = await _queue(scene, scene.moderator)  # someone with nothing in line sees the same line
    assert re.fullmatch(r"\d waiting · 1 being answered", others["Line"])
    assert others["Your requests"] == "Nothing in line."

    for record in records:
        await record.wait_for(lambda record=record: bool(record.original and record.original.embeds), timeout=180)
    after = await _once_quiet(scene)
    assert after["Your requests"] == "Nothing in line."
    lately = LATELY.fullmatch(after["Lately"])
    assert lately and int(lately[3]) >= 6, after["Lately"]


async def test_a_quiet_server_sees_an_empty_line_and_its_whole_quota(scene):
    fields = await _once_quiet(scene)
    assert fields["Your requests"] == "Nothing in line."
    assert fields["Lately"] == "No answers lately." or LATELY.fullmatch(fields["Lately"])
    assert fields["This server's quota"] == (
        "0 of 64 answered or waiting at once\n100000 of 100000 left per hour\nYou can ask now."
    )


async def test_the_quota_left_counts_requests_and_looking_spends_none(scene):
    await scene.ask("settings quotas", scene.moderator, cooldown_seconds=30, per_period=3)
    ask = {"image": scene.photo(), "max_new_tokens": 2}
    other = scene.discord.add_member(scene.guild, "other")
    assert (await scene.ask("comprehend", **ask))[0].embeds
    assert (await scene.ask("comprehend", other, **ask))[0].embeds

    for _ in range(3):  # looking, again and again, takes nothing
        fields = await _queue(scene)
    assert re.fullmatch(
        r"0 of 64 answered or waiting at once\n1 of 3 left per hour \(one more back in 60 min\)\n"
        r"You can ask again in (29|30) s\.",
        fields["This server's quota"],
    ), fields["This server's quota"]
    assert (await _queue(scene, scene.discord.add_member(scene.guild, "third")))["This server's quota"].endswith(
        "\nYou can ask now."
    )
    assert (await scene.ask("comprehend", scene.moderator, **ask))[0].embeds  # the third of three is still there
    spent = await _queue(scene, other)
    assert spent["This server's quota"].startswith("0 of 64 answered or waiting at once\n0 of 3 left per hour (")

    # In direct messages the quotas are the person's own, with the bot's limits.
    payload = scene.discord.interaction_payload("queue", scene.reader, None)
    direct = _fields((await (await scene.discord.send_interaction(payload)).answered())[0])
    assert (
        direct["Your quota"] == "0 of 64 answered or waiting at once\n100000 of 100000 left per hour\nYou can ask now."
    )


async def test_a_member_who_cannot_ask_here_still_sees_the_line_and_why(scene):
    bots = await scene.discord.add_channel(scene.guild, "bots")
    await scene.ask("settings channels add", scene.moderator, channel=bots)
    elsewhere = await _queue(scene)
    assert elsewhere["Asking here"] == f"I only answer in <#{bots.id}> on this server."
    assert elsewhere["This server's quota"].startswith("0 of 64 answered or waiting at once\n")
    here = _fields((await scene.ask("queue", in_channel=bots))[0])
    assert "Asking here" not in here
