"""Uploads read from Discord's CDN: a link gone, refused, failing or stalled is explained, never generic."""

from __future__ import annotations

import pytest

from tests.helpers.task_commands import create
from tests.helpers.world import photo, private

GONE = "Discord no longer has “chelsea.jpg” (its link may have expired); send the file again."


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("expired", GONE),
        (403, GONE),
        (502, "Discord's file server failed while I downloaded “chelsea.jpg” (HTTP 502); send it again in a moment."),
    ],
)
async def test_a_download_that_fails_says_why_and_to_send_it_again(world, fault, message):
    upload = photo(world)
    if fault == "expired":
        del world.discord.attachments[upload.id]
    else:
        world.discord.cdn_statuses[upload.id] = fault
    assert await private(world, "comprehend", image=upload) == message


async def test_a_stalled_download_is_refused_at_its_bound_and_a_slow_one_is_answered(world, monkeypatch):
    monkeypatch.setattr(world.bot.settings.images, "download_seconds", 1.0)
    stalled = photo(world)
    world.discord.cdn_delays[stalled.id] = 3600
    message = await private(world, "comprehend", image=stalled, max_new_tokens=2)
    assert message == "Downloading “chelsea.jpg” from Discord took over 1 s; send it again."

    slow = photo(world)
    world.discord.cdn_delays[slow.id] = 0.3
    [answer] = await world.reply("comprehend", image=slow, max_new_tokens=2)
    assert answer.embeds and not answer.ephemeral


async def test_a_task_example_whose_download_failed_says_why(world):
    await create(world)
    upload = photo(world)
    del world.discord.attachments[upload.id]
    message = await private(
        world, "manage-tasks add-example", world.moderator, task="pets", image=upload, text="<image>Pet:A cat."
    )
    assert message == GONE
