"""A server tightens the bot's quotas for itself; refusals are private and say when to try again."""

from __future__ import annotations

import re

import pytest

from tests.helpers.e2e import E2E

pytestmark = E2E


@pytest.mark.cooldown
async def test_a_server_can_tighten_its_quotas_and_refusals_say_when_to_retry(scene):
    changed = (await scene.ask("settings quotas", scene.moderator, cooldown_seconds=30, per_period=3))[0]
    assert changed.ephemeral and changed.content == "Quotas updated."
    fields = {field["name"]: field["value"] for field in changed.embeds[0]["fields"]}
    assert fields["Quotas (this server's)"] == (
        "30 s between a member's requests · up to 64 answered or waiting at once · 3 per hour"
    )

    ask = {"image": scene.photo(), "max_new_tokens": 2}
    typo = await scene.ask("comprehend", task="captoin", **ask)  # refused: it costs neither cooldown nor quota
    assert typo[0].ephemeral and "captoin" in typo[0].content
    assert (await scene.ask("comprehend", **ask))[0].embeds
    again = await scene.ask("comprehend", **ask)
    assert len(again) == 1 and again[0].ephemeral
    assert re.fullmatch(r"You are asking too fast; you can ask again in (29|30) s\.", again[0].content)

    others = [scene.discord.add_member(scene.guild, f"member{i}") for i in range(3)]
    assert (await scene.ask("comprehend", others[0], **ask))[0].embeds
    assert (await scene.ask("comprehend", others[1], **ask))[0].embeds
    spent = await scene.ask("comprehend", others[2], **ask)
    assert [(m.content, m.ephemeral) for m in spent] == [
        ("This server has used its 3 requests for now; more in 60 min.", True)
    ]

    looser = await scene.ask("settings quotas", scene.moderator, in_flight=1000, raw=True)  # beyond the range
    assert looser[0].ephemeral and looser[0].content == "in_flight must be between 1 and 64."
    nothing = await scene.ask("settings quotas", scene.moderator)
    assert nothing[0].content == "Give cooldown_seconds, in_flight or per_period to change, or reset to go back."
    reset = await scene.ask("settings quotas", scene.moderator, reset=True)
    assert reset[0].content == "Quotas are back to the bot's defaults."
    assert (await scene.ask("comprehend", others[2], **ask))[0].embeds
