"""How long answers took lately, in line and at the model: the typical wait ``/queue`` shows.

Kept by the service that holds the line (either backend), in memory: a restart starts afresh.
Medians, not means, so that one long beam search does not make every request look slow; over a
window of recent answers, so that the figure follows the load of the last minutes.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_SECONDS = 600.0


@dataclass(frozen=True)
class TypicalTimes:
    answers: int  # answered within the window
    waited: float  # median seconds in line, from queueing to the start
    answering: float  # median seconds from the start to the answer
    window_seconds: float


class RecentTimes:
    """The answers of the last ``window_seconds``; thread-safe (the local service records from its worker)."""

    def __init__(self, window_seconds: float = WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_seconds = window_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._answers: deque[tuple[float, float, float]] = deque()  # (answered at, waited, answering)

    def record(self, queued: float, started: float) -> None:
        """An answer given now, to a request queued and started at those ``clock()`` times."""
        now = self.clock()
        with self._lock:
            self._answers.append((now, started - queued, now - started))
            self._forget(now)

    def typical(self) -> TypicalTimes | None:
        """Medians of the window's answers; None when none came within it."""
        now = self.clock()
        with self._lock:
            self._forget(now)
            recent = list(self._answers)
        if not recent:
            return None
        waited = statistics.median(waited for _, waited, _ in recent)
        answering = statistics.median(answering for _, _, answering in recent)
        return TypicalTimes(len(recent), waited, answering, self.window_seconds)

    def _forget(self, now: float) -> None:
        while self._answers and now - self._answers[0][0] > self.window_seconds:
            self._answers.popleft()
