"""What may be posted: a hook that can withhold an answer before it reaches a channel.

The default is a word list from config. A public bot answers strangers with a model trained on the
open web, so outside channels marked NSFW an answer with a listed word is not posted at all
(replacing the word would still leave its meaning plain).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol


class AnswerFilter(Protocol):
    def blocks(self, text: str) -> bool: ...


class WordListFilter:
    def __init__(self, words: Iterable[str]) -> None:
        listed = sorted({word.strip().casefold() for word in words if word.strip()}, key=len, reverse=True)
        # Never part of a longer word, so "class" is not caught by "ass"; casefold catches "BAD" and "Bad".
        # Lookarounds rather than \b, so entries that start or end with punctuation work too.
        alternatives = "|".join(map(re.escape, listed))
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)") if listed else None

    def blocks(self, text: str) -> bool:
        return self._pattern is not None and self._pattern.search(text.casefold()) is not None


class ReportLog:
    """Who reported which answer, so that one member clicking Report again does not post it again.

    Kept in memory for the bot's life, the oldest forgotten beyond ``capacity``: a restart lets a
    member report an answer once more, which a moderators' channel can bear.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._reported: OrderedDict[tuple[int, int], None] = OrderedDict()

    def first(self, request_id: int, user_id: int) -> bool:
        """Record the report; False if this member had already reported this answer."""
        key = (request_id, user_id)
        if key in self._reported:
            return False
        self._reported[key] = None
        if len(self._reported) > self.capacity:
            self._reported.popitem(last=False)
        return True

    def forget(self, request_id: int, user_id: int) -> None:
        """The report could not be posted: it may be tried again."""
        self._reported.pop((request_id, user_id), None)
