"""/settings usage: a server's requests by outcome and task, in words and in a chart, and only its own."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from tests.fake_discord.payloads import MANAGE_GUILD, Guild, Member
from tests.fake_discord.server import Message
from tests.helpers.e2e import E2E, Scene

pytestmark = E2E


async def ask_many(
    scene: Scene, answered: int, refused: int, guild: Guild | None = None, reader: Member | None = None
) -> None:
    """Answers with the default task, and refusals for a file that is no image (counted under that task too)."""
    for _ in range(answered):
        reply = (await scene.ask("comprehend", reader, guild, image=scene.photo(), max_new_tokens=2))[0]
        assert reply.embeds and not reply.ephemeral
    for _ in range(refused):
        text = scene.discord.upload("notes.png", b"just some text", "image/png")
        reply = (await scene.ask("comprehend", reader, guild, image=text))[0]
        assert reply.ephemeral and not reply.embeds


def fields(message: Message) -> dict[str, str]:
    return {field["name"]: field["value"] for field in message.embeds[0]["fields"]}


def chart(message: Message) -> tuple[int, int]:
    data = message.files["usage.png"]
    assert len(data) > 10_000  # bars, axes and labels, not an empty image
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


@pytest.mark.usage
async def test_each_server_sees_only_its_own_counts_with_a_chart(scene: Scene) -> None:
    stand_in = scene.discord
    other = await stand_in.join("Others")
    other_reader = stand_in.add_member(other, "reader")
    other_moderator = stand_in.add_member(other, "moderator", permissions=MANAGE_GUILD | (1 << 31))
    await ask_many(scene, answered=2, refused=1)
    await ask_many(scene, answered=1, refused=2, guild=other, reader=other_reader)

    week = (await scene.ask("settings usage", scene.moderator))[0]
    assert week.ephemeral and week.embeds[0]["title"] == "Use of the bot on this server: the last 7 days"
    assert week.embeds[0]["image"]["url"] == "attachment://usage.png"
    summary = week.embeds[0]["description"]
    assert re.fullmatch(
        r"\*\*3 requests\*\* from \d+ \w+ to today, \d+ \w+ \d{4} \(UTC\): 2 answered, 1 refused\.\n"
        r"\*\*[1-4]\*\* tokens generated\.",
        summary,
    ), summary
    shown = fields(week)
    assert re.fullmatch(r"\*\*caption\*\*: 3 requests \(2 answered, 1 refused, [1-4] tokens\)", shown["By task"])
    assert re.fullmatch(r"\w+ \d+ \w+: 3 requests", shown["Busiest day"])
    assert re.fullmatch(r"\d\d:00 \(3\)", shown["Busiest hours (UTC)"])
    assert chart(week) == (800, 600)

    theirs = (await scene.ask("settings usage", other_moderator, other, days=30))[0]
    assert theirs.embeds[0]["title"] == "Use of the bot on this server: the last 30 days"
    assert "**3 requests**" in theirs.embeds[0]["description"]
    assert ": 1 answered, 2 refused." in theirs.embeds[0]["description"]
    assert fields(theirs)["By task"].startswith("**caption**: 3 requests (1 answered, 2 refused, ")
    assert chart(theirs) == (800, 600)


@pytest.mark.usage
async def test_a_new_server_has_an_empty_report_and_members_cannot_see_it(scene: Scene) -> None:
    empty = (await scene.ask("settings usage", scene.moderator))[0]
    assert re.fullmatch(r"No requests from \d+ \w+ to today, \d+ \w+ \d{4} \(UTC\)\.", empty.embeds[0]["description"])
    assert "fields" not in empty.embeds[0] or not empty.embeds[0]["fields"]
    assert chart(empty) == (800, 600)
    denied = await scene.ask("settings usage")
    assert [(m.content, m.ephemeral) for m in denied] == [
        ("You need the Manage Server permission in this server to do that.", True)
    ]
