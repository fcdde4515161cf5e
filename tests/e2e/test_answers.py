"""The buttons under an answer, and a waiting request's place in line with its cancel button."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.fake_discord.payloads import EVERYONE_PERMISSIONS, MANAGE_MESSAGES
from tests.helpers.e2e import E2E, buttons, click

pytestmark = E2E


@pytest.mark.re_roll
async def test_every_answer_can_be_re_rolled_and_shows_its_full_prompt(scene):
    await scene.ask("manage-tasks create", scene.moderator, name="pets", template="<image>Pet:")
    await scene.ask(
        "manage-tasks add-example", scene.moderator, task="pets", image=scene.photo("chelsea"), text="<image>Pet:a cat"
    )
    answer = (await scene.ask("comprehend", image=scene.photo("coffee"), task="pets", max_new_tokens=6))[0]
    assert list(buttons(answer)) == ["Re-roll", "Prompt", "Delete", "Report"]

    rerolled = await (await click(scene, answer, "Re-roll", scene.moderator)).answered()
    assert len(rerolled) == 1 and not rerolled[0].ephemeral
    embed = rerolled[0].embeds[0]
    assert embed["author"]["name"] == "Moderator re-rolled"
    assert embed["footer"]["text"].startswith("task: pets · ")
    assert embed["fields"][0]["value"] == "<image>Pet:"
    assert rerolled[0].files["image.jpg"].startswith(b"\xff\xd8")
    assert list(buttons(rerolled[0])) == ["Re-roll", "Prompt", "Delete", "Report"]

    shown = await (await click(scene, answer, "Prompt")).answered()
    assert shown[0].ephemeral
    prompt = shown[0].embeds[0]
    assert prompt["description"] == "```\n<image>Pet:a cat<|endofchunk|><image>Pet:\n```"
    fields = {f["name"]: f["value"] for f in prompt["fields"]}
    assert fields["Parameters"] == "greedy · up to 6 new tokens"
    assert fields["Model"] == "llama"


@pytest.mark.re_roll
async def test_only_the_asker_or_a_message_manager_can_delete_an_answer(scene):
    answer = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=3))[0]
    stranger = scene.discord.add_member(scene.guild, "stranger")
    refused = await (await click(scene, answer, "Delete", stranger)).answered()
    assert [(m.content, m.ephemeral) for m in refused] == [
        ("Only the person who asked, or a member with Manage Messages, can delete this answer.", True)
    ]
    assert not answer.deleted
    record = await click(scene, answer, "Delete")
    await record.wait_for(lambda: answer.deleted, timeout=30)
    gone = await (await click(scene, answer, "Re-roll")).answered()
    assert gone[0].ephemeral and gone[0].content.startswith("This answer's request is no longer stored")

    another = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=3))[0]
    janitor = scene.discord.add_member(scene.guild, "janitor", permissions=EVERYONE_PERMISSIONS | MANAGE_MESSAGES)
    record = await click(scene, another, "Delete", janitor)
    await record.wait_for(lambda: another.deleted, timeout=30)
    gone = await (await click(scene, another, "Prompt")).answered()
    assert gone[0].content.startswith("This answer's request is no longer stored")


@pytest.mark.cancel
async def test_a_waiting_request_shows_its_place_and_can_be_cancelled_by_its_asker(scene):
    long = {"max_new_tokens": 256, "min_new_tokens": 256, "num_beams": 5}
    running = [await scene.send("comprehend", image=scene.photo("rocket"), **long) for _ in range(2)]
    await asyncio.sleep(0.3)  # the first has started; the second may be waiting too
    waiting = await scene.send("comprehend", image=scene.photo("coffee"), max_new_tokens=3)
    await waiting.wait_for(lambda: bool(waiting.original and waiting.original.content), timeout=60)
    notice = waiting.original
    assert re.fullmatch(
        r"⏳ Waiting for the model: number [12] in line\. The asker \(or a moderator\) can cancel\.", notice.content
    )
    assert list(buttons(notice)) == ["Cancel"]

    stranger = scene.discord.add_member(scene.guild, "stranger")
    refused = await (await click(scene, notice, "Cancel", stranger)).answered()
    assert refused[0].ephemeral and refused[0].content == (
        "Only the person who asked, or a member with Manage Messages, can cancel this request."
    )
    # A second click made as the first took effect: Discord sends the message as the user saw it.
    second_click = scene.discord.component_payload(notice, buttons(notice)["Cancel"], scene.reader, scene.guild)
    cancel = await click(scene, notice, "Cancel")
    await cancel.wait_for(lambda: notice.content == f"Cancelled by <@{scene.reader.id}>.", timeout=30)
    assert notice.components == []
    again = await (await scene.discord.send_interaction(second_click)).answered()
    assert [(m.content, m.ephemeral) for m in again] == [
        ("That request is no longer waiting: it has been answered or withdrawn.", True)
    ]
    for record in running:  # a place-in-line notice first, perhaps, then the answer in its place
        await record.wait_for(lambda record=record: bool(record.original and record.original.embeds), timeout=120)
        assert record.original.content == ""
    await asyncio.sleep(1)
    assert notice.content == f"Cancelled by <@{scene.reader.id}>." and not notice.embeds
