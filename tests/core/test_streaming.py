"""Which partial texts of an answer are shown while it is written, and when, on a fake clock."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

from core.config import AnswerSettings
from core.streaming import shown_while_written

PACE = AnswerSettings(stream_edit_seconds=1.0, stream_after_seconds=2.0)


class FakeTime:
    """A clock that moves only when the code under test sleeps, a text is decoded or an edit is made."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


async def decoded(time: FakeTime, texts: list[str], every: float = 0.25) -> AsyncIterator[str]:
    """A word each ``every`` seconds; read late, the latest only, as ``Ticket.partial_texts`` gives it.
    It ends once the last word is written: the front end stops following when the answer is there."""
    start, read = time.now, 0
    while read < len(texts) and time.now < start + len(texts) * every:
        written = min(len(texts), int((time.now - start) / every) + 1)
        if written == read:
            time.now = start + written * every  # waits for the next word
            continue
        read = written
        yield texts[read - 1]


async def shown(
    time: FakeTime,
    partials: AsyncIterator[str],
    pace: AnswerSettings = PACE,
    stop_at: float = 900.0,
    shows=lambda text: True,
    edit_seconds: float = 0.5,
) -> list[tuple[float, float, str]]:
    """Each edit the front end makes: when it starts, when it ends, and its text."""
    edits = []
    async for text in shown_while_written(partials, pace, stop_at, shows, time, time.sleep):
        start = time.now
        time.now += edit_seconds
        edits.append((start, time.now, text))
    return edits


def words(count: int) -> list[str]:
    return [" ".join(f"w{n}" for n in range(1, last + 1)) for last in range(1, count + 1)]


async def test_a_long_answer_is_shown_after_the_first_delay_then_once_per_interval_after_each_edit():
    time = FakeTime()
    edits = await shown(time, decoded(time, words(40)))
    assert len(edits) >= 4
    assert edits[0][0] >= PACE.stream_after_seconds
    for (_, ended, earlier), (started, _, later) in itertools.pairwise(edits):
        assert started - ended >= PACE.stream_edit_seconds  # from the end of the last edit: never a burst
        assert len(later) > len(earlier) and later.startswith(earlier)


async def test_a_short_answer_beam_search_or_streaming_turned_off_show_nothing_before_the_answer():
    time = FakeTime()
    assert await shown(time, decoded(time, words(5))) == []  # done within the first delay

    async def beam_search() -> AsyncIterator[str]:
        return
        yield

    assert await shown(time, beam_search()) == []
    read = []

    async def followed() -> AsyncIterator[str]:
        read.append(True)
        yield "w1"

    off = AnswerSettings(stream_edit_seconds=0)
    assert await shown(time, followed(), off) == [] and read == []  # not even decoded into text


async def test_a_text_the_filter_withholds_ends_the_stream_with_nothing_of_it_shown():
    time = FakeTime()
    edits = await shown(time, decoded(time, words(40)), shows=lambda text: "w12" not in text)
    assert edits and all("w12" not in text for _, _, text in edits)
    assert len(edits[-1][2].split()) < 12


async def test_nothing_is_shown_past_the_deadline():
    time = FakeTime()
    edits = await shown(time, decoded(time, words(200)), stop_at=6.0)
    assert edits and all(started < 6.0 for started, _, _ in edits)
    assert await shown(FakeTime(), decoded(FakeTime(), words(200)), stop_at=1.0) == []
