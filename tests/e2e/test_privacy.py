"""What the bot keeps about people, and how they make it forget."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import E2E
from tests.e2e.test_answers import buttons, click

pytestmark = E2E


@pytest.mark.privacy
async def test_forget_me_deletes_requests_at_once_and_examples_after_confirmation(scene):
    await scene.ask("manage-tasks create", scene.moderator, name="pets", template="<image>Pet:")
    for photo in ("chelsea", "coffee"):
        await scene.ask(
            "manage-tasks add-example", scene.moderator, task="pets", image=scene.photo(photo), text="<image>Pet:x"
        )
    answer = (await scene.ask("comprehend", scene.moderator, image=scene.photo(), max_new_tokens=2))[0]
    kept = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2))[0]

    asked = (await scene.ask("forget-me", scene.moderator))[0]
    assert asked.ephemeral
    assert asked.content == (
        "Deleted 1 stored request (the inputs behind your answers' buttons). You also added 2 examples to "
        "servers' tasks; deleting them changes those tasks for everyone. Delete them?"
    )
    gone = await (await click(scene, answer, "Re-roll", scene.moderator)).answered()
    assert gone[0].content.startswith("This answer's request is no longer stored")
    assert (await (await click(scene, kept, "Prompt")).answered())[0].embeds  # other people's stay

    refused = await (await click(scene, asked, "Delete my examples", scene.reader)).answered()
    assert refused[0].content == "Only the person who asked to be forgotten can confirm it."
    confirm = await click(scene, asked, "Delete my examples", scene.moderator)
    await confirm.wait_for(lambda: asked.content == "Deleted 2 examples.", timeout=30)
    assert buttons(asked) == {}
    listing = (await scene.ask("tasks list"))[0].embeds[0]["description"]
    assert "**pets** (this server, 0 examples)" in listing
    again = (await scene.ask("forget-me", scene.moderator))[0]
    assert again.content == (
        "Deleted 0 stored requests (the inputs behind your answers' buttons). Nothing else is stored about you."
    )
