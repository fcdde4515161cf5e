"""An answer shown while it is written: which of its partial texts a front end shows, and when.

Editing a message at every word would spend the rate limit and flicker, and a short answer is best
posted once, whole. So a text is shown only once decoding has gone on for ``stream_after_seconds``,
then at most once per ``stream_edit_seconds`` counted from the previous edit's end (a slow edit
never leads to a burst), only when it changed, and never after ``stop_at``, so the reply's token
still has time for the final answer. A text the answer filter would withhold ends the stream: the
final answer, moderated as ever, decides what is posted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from core.config import AnswerSettings


async def shown_while_written(
    partials: AsyncIterator[str],
    settings: AnswerSettings,
    stop_at: float,
    shows: Callable[[str], bool],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> AsyncGenerator[str, None]:
    """The partial texts to show, each yielded when it may be shown; the caller's edit is done by the
    time it asks for the next. ``clock`` and ``stop_at`` are on one timeline (``time.monotonic``)."""
    if settings.stream_edit_seconds <= 0 or await anext(partials, None) is None:
        return  # streaming off, or nothing to stream (beam search; a backend that cannot stream)
    due = clock() + settings.stream_after_seconds  # counted from the first word decoded
    shown = ""
    while due < stop_at:
        await sleep(max(0.0, due - clock()))
        text = await anext(partials, None)  # the latest, at once if it changed while this slept
        if text is None or clock() >= stop_at or not shows(text):
            return  # answered (its final post replaces the stream), too late, or to be withheld
        if text != shown:
            yield text
            shown = text
        due = clock() + settings.stream_edit_seconds
