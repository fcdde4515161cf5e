"""An answer shown as it is written: the reply edited with its text so far, then the answer in its place."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from cogs.utils.answering import WRITING
from core.asking import WITHHELD
from core.moderation import WordListFilter
from tests.fake_discord.payloads import Channel
from tests.fake_discord.records import Edit
from tests.fake_discord.server import Message
from tests.helpers.e2e import E2E, Scene, buttons, click, new_bot

pytestmark = [E2E, pytest.mark.streaming]

EDIT_SECONDS = 0.1
# The tiny random models repeat one spaceless "word" forever unless kept from repeating themselves.
LONG = {"max_new_tokens": 256, "min_new_tokens": 256, "repetition_penalty": 2.0, "no_repeat_ngram_size": 1}


@dataclass
class Streaming:
    """A bot of its own that shows an answer being written after 0.05 s, then at most every 0.1 s
    (the tiny model writes 256 tokens in about a second); ``said`` its long answer about the rocket,
    and ``blocked`` a word late in it, that the bot's word filter withholds outside ``nsfw``."""

    scene: Scene
    said: str
    blocked: str
    nsfw: Channel  # where the filter lets the answer through


def _late_word(said: str) -> str:
    """A word in the last quarter of the answer that nothing before it matches."""
    words = said.split()
    start = len(words) * 3 // 4
    return next(
        word
        for index, word in enumerate(words[start:], start)
        if not WordListFilter([word]).blocks(" ".join(words[:index]))
    )


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def streaming(stand_in, shared_bot, model_dirs, tmp_path_factory) -> AsyncIterator[Streaming]:
    learning = await stand_in.join("Learning")  # the shared bot says what the model writes, to block a word of it
    reader = stand_in.add_member(learning, "reader")
    scene = Scene(stand_in, learning, reader, reader)
    said = (await scene.ask("comprehend", image=scene.photo("rocket"), **LONG))[0].embeds[0]["description"]
    blocked = _late_word(said)
    bot = new_bot(stand_in, model_dirs, tmp_path_factory.mktemp("streaming-bot"))
    bot.env |= {
        "FLAMINGO_ANSWERS__STREAM_EDIT_SECONDS": str(EDIT_SECONDS),
        "FLAMINGO_ANSWERS__STREAM_AFTER_SECONDS": "0.05",
        "FLAMINGO_PRIVACY__BLOCKED_WORDS": json.dumps([blocked]),
    }
    await bot.start()
    try:
        guild = await stand_in.join("Streaming")
        moderator = stand_in.add_member(guild, "moderator")
        nsfw = await stand_in.add_channel(guild, "after-dark", nsfw=True)
        here = Scene(stand_in, guild, stand_in.add_member(guild, "reader"), moderator)
        yield Streaming(here, said, blocked, nsfw)
    finally:
        await bot.stop()


def written(message: Message) -> list[Edit]:
    """The edits that showed the answer while it was written."""
    return [edit for edit in message.edits if edit.content == WRITING]


async def test_a_long_answer_is_shown_as_it_grows_then_posted_whole_with_its_buttons(streaming):
    here = streaming.scene
    answer = (await here.ask("comprehend", in_channel=streaming.nsfw, image=here.photo("rocket"), **LONG))[0]
    final = answer.embeds[0]["description"]
    stream = written(answer)
    assert len(stream) >= 2, [edit.content for edit in answer.edits]
    texts = [edit.embeds[0]["description"] for edit in stream]
    assert all(len(later) > len(earlier) for earlier, later in itertools.pairwise(texts))
    assert all(final.startswith(text) for text in texts)
    assert all(edit.embeds[0]["footer"]["text"] == "writing…" for edit in stream)
    assert all(list(buttons(edit)) == ["Cancel"] for edit in stream)
    for earlier, later in itertools.pairwise(stream):  # never closer than the setting, counted from the last edit
        assert later.at - earlier.at >= EDIT_SECONDS
    assert answer.edits[-1].content == "" and answer.content == ""
    assert list(buttons(answer)) == ["Re-roll", "Prompt", "Delete", "Report"]
    assert answer.files["image.jpg"].startswith(b"\xff\xd8")


async def test_a_short_answer_and_a_beam_search_are_posted_in_one_edit(streaming):
    here = streaming.scene
    short = (await here.ask("comprehend", image=here.photo("coffee"), max_new_tokens=3))[0]
    assert len(short.edits) == 1 and short.embeds
    beams = (await here.ask("comprehend", image=here.photo("rocket"), num_beams=3, **LONG))[0]
    assert len(beams.edits) == 1 and beams.embeds


async def test_a_cancel_while_the_answer_is_written_keeps_what_was_written_marked_cancelled(streaming):
    here = streaming.scene
    record = await here.send("comprehend", in_channel=streaming.nsfw, image=here.photo("rocket"), **LONG)
    await record.wait_for(lambda: bool(record.original and record.original.content == WRITING), timeout=60)
    message = record.original
    cancel = await click(here, message, "Cancel")
    await cancel.wait_for(lambda: message.content == f"Cancelled by <@{here.reader.id}>.", timeout=30)
    assert message.components == []
    embed = message.embeds[0]
    assert embed["footer"]["text"] == "cancelled" and embed["description"]
    edits = len(message.edits)
    await asyncio.sleep(1)  # nothing more is shown of it
    assert len(message.edits) == edits and message.embeds[0]["footer"]["text"] == "cancelled"


async def test_a_text_the_filter_would_withhold_is_never_shown_and_the_withheld_answer_replaces_the_rest(streaming):
    here = streaming.scene
    shown = WordListFilter([streaming.blocked])
    withheld = (await here.ask("comprehend", image=here.photo("rocket"), **LONG))[0]
    assert withheld.embeds[0]["description"] == WITHHELD and withheld.content == ""
    assert written(withheld), "the answer was shown until the blocked word"
    assert not any(shown.blocks(edit.embeds[0]["description"]) for edit in withheld.edits)

    unfiltered = (await here.ask("comprehend", in_channel=streaming.nsfw, image=here.photo("rocket"), **LONG))[0]
    assert unfiltered.embeds[0]["description"] == streaming.said
    assert written(unfiltered)


async def test_an_edit_discord_refuses_ends_the_showing_and_the_answer_is_posted_all_the_same(streaming):
    here = streaming.scene
    refused = here.discord.limits.inject("PATCH", "/messages/@original", status=403)
    answer = (await here.ask("comprehend", in_channel=streaming.nsfw, image=here.photo("rocket"), **LONG))[0]
    assert refused.served == 1
    assert len(answer.edits) == 1 and answer.embeds[0]["description"] == streaming.said
    assert list(buttons(answer)) == ["Re-roll", "Prompt", "Delete", "Report"]


async def test_an_edit_answered_with_a_429_is_retried_without_a_burst_and_the_answer_is_whole(streaming):
    here = streaming.scene
    limited = here.discord.limits.inject("PATCH", "/messages/@original", status=429, retry_after=0.3)
    answer = (await here.ask("comprehend", in_channel=streaming.nsfw, image=here.photo("rocket"), **LONG))[0]
    assert limited.served == 1  # discord.py waited it out and sent the edit again
    for earlier, later in itertools.pairwise(written(answer)):
        assert later.at - earlier.at >= EDIT_SECONDS
    assert answer.embeds[0]["description"] == streaming.said
    assert list(buttons(answer)) == ["Re-roll", "Prompt", "Delete", "Report"]
