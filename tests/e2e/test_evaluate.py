"""``/manage-tasks evaluate``: a moderator scores the model on a server task, privately, behind members' requests."""

from __future__ import annotations

import csv
import io
import re

import pytest

from tests.fake_discord.server import InteractionRecord, Message
from tests.helpers.e2e import E2E, Scene, buttons, click

pytestmark = [E2E, pytest.mark.evaluate]

# A text the template's "Pet:" is not in: left out of the scores, saying why.
UNSPLIT = "<image>Question:What is it? Short answer:a rocket"
# Beam searches go before a task's evaluation, whose requests yield to them: about a second each.
BEAMS = {"max_new_tokens": 256, "min_new_tokens": 256, "num_beams": 5}


async def _pets(scene: Scene, *texts: str) -> None:
    await scene.ask("manage-tasks create", scene.moderator, name="pets", template="<image>Pet:", description="Pets")
    for photo, text in zip(("chelsea", "coffee", "astronaut", "rocket"), texts, strict=False):
        [added] = await scene.ask(
            "manage-tasks add-example", scene.moderator, task="pets", image=scene.photo(photo), text=text
        )
        assert added.content.startswith("Added example"), added.content


def _fields(message: Message) -> dict[str, str]:
    [embed] = message.embeds
    return {field["name"]: field["value"] for field in embed["fields"]}


def _rows(message: Message) -> list[dict[str, str]]:
    [(filename, data)] = message.files.items()
    assert filename == "pets-evaluation.csv"
    return list(csv.DictReader(io.StringIO(data.decode())))


async def _progress_shown(record: InteractionRecord) -> Message:
    await record.wait_for(lambda: bool(record.original and record.original.content.startswith("⏳ Evaluating")))
    assert record.original is not None
    return record.original


async def test_a_moderator_gets_the_scores_and_every_example_privately(scene, shared_bot):
    await _pets(scene, "<image>Pet:a cat", "<image>Pet:a cup of coffee", UNSPLIT)
    model = shared_bot.env["FLAMINGO_MODEL__NAME"].rsplit("/", 1)[-1]
    [result] = await scene.ask("manage-tasks evaluate", scene.moderator, task="pets", model=model)
    assert result.ephemeral and not result.content and not result.components
    [embed] = result.embeds
    assert embed["title"] == "Evaluation of pets"
    fields = _fields(result)
    assert fields["Model"] == model
    assert re.fullmatch(r"\d+\.\d%", fields["Exact match"]) and re.fullmatch(r"\d+\.\d%", fields["F1"])
    assert fields["Examples"] == "2 scored · 1 left out (no answer found in the text)"
    assert re.fullmatch(r"\d+\.\d s \(\d+\.\d s each\)", fields["Time"]), fields["Time"]
    rows = _rows(result)
    assert [(row["position"], row["expected"]) for row in rows] == [("1", "a cat"), ("2", "a cup of coffee"), ("3", "")]
    assert all(row["exact_match"] in ("0", "1") and row["note"] == "" for row in rows[:2])
    assert rows[2]["note"] == "not scored: no ending of the template “<image>Pet:” follows its <image>"


async def test_who_may_evaluate_and_what_cannot_be(scene):
    [refused] = await scene.ask("manage-tasks evaluate", scene.reader, task="caption")
    assert refused.ephemeral and refused.content == "You need the Manage Server permission in this server to do that."
    await _pets(scene, "<image>Pet:a cat")
    [alone] = await scene.ask("manage-tasks evaluate", scene.moderator, task="pets")
    assert alone.content == "Task “pets” has 1 example; leaving one out needs at least 2."
    [unknown] = await scene.ask("manage-tasks evaluate", scene.moderator, task="dogs")
    assert unknown.content.startswith("There is no task called “dogs” here")
    payload = scene.discord.autocomplete_payload(
        "manage-tasks evaluate", scene.moderator, scene.guild, "model", model=""
    )
    record = await scene.discord.send_interaction(payload)
    await record.wait_for(lambda: record.choices is not None, timeout=30)
    assert record.choices[0]["name"] == "llama (the default, always loaded)"  # as /settings model offers them
    [other] = await scene.ask("manage-tasks evaluate", scene.moderator, task="pets", model="OpenFlamingo-9B-vitl-mpt7b")
    assert other.content.startswith("This bot runs one model in its own process (llama), so it cannot switch.")
    await scene.ask("settings quotas", scene.moderator, per_period=3)
    [costly] = await scene.ask("manage-tasks evaluate", scene.moderator, task="caption")  # 4 examples
    assert costly.content == "That needs 4 requests, more than this server's 3 requests per hour."
    assert not costly.embeds and not costly.files


async def test_a_second_evaluation_waits_and_a_cancel_keeps_what_was_answered_while_members_are_answered(scene):
    """The evaluation waits behind members' beam searches (it runs only beside members' requests, and
    yields to a beam search), so it is still under way when the second one and the cancels come."""
    await _pets(scene, *(f"<image>Pet:{answer}" for answer in ("a cat", "a cup", "an astronaut", "a rocket")))
    members = [await scene.send("comprehend", image=scene.photo("rocket"), **BEAMS) for _ in range(3)]
    evaluating = await scene.send("manage-tasks evaluate", scene.moderator, task="pets")
    progress = await _progress_shown(evaluating)
    assert progress.ephemeral and list(buttons(progress)) == ["Cancel"]
    assert re.fullmatch(r"⏳ Evaluating task \*\*pets\*\* with .+: 0 of 4 examples answered\. .+", progress.content)

    [second] = await scene.ask("manage-tasks evaluate", scene.moderator, task="caption")
    assert second.content.startswith(f"<@{scene.moderator.id}> is already evaluating task “pets” on this server")
    assert second.content.endswith("You can also cancel it with this button.") and list(buttons(second)) == ["Cancel"]

    [refused] = await (await click(scene, progress, "Cancel", scene.reader)).answered()
    assert refused.content == "Only the member who started this evaluation, or one with Manage Server, can cancel it."
    await click(scene, second, "Cancel", scene.moderator)  # the refusal's button stops the one under way
    [result] = await evaluating.answered()
    assert result.embeds[0]["description"].startswith(f"**Stopped early:** Cancelled by <@{scene.moderator.id}>.")
    scored = int(_fields(result)["Examples"].split(" of 4 scored")[0])
    assert scored < 4 and len(_rows(result)) == scored
    for member in members:  # each answered in public, once
        [answered] = await member.answered()
        assert answered.embeds and not answered.ephemeral

    [again] = await scene.ask("manage-tasks evaluate", scene.moderator, task="pets")  # the server's turn is free
    assert _fields(again)["Examples"] == "4 scored"
