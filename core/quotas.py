"""Fair use: a per-user cooldown, and per-guild caps on requests in flight and per period.

One user cannot starve a server, and one server cannot starve the others. Refusals say when to
try again. State is in memory: a restart forgives everyone, which errs on the side of the user.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from core.config import QuotaSettings
from core.errors import FlamingoError


class TooManyRequests(FlamingoError):
    """A cooldown or quota refuses the request for now."""


def _wait(seconds: float) -> str:
    seconds = math.ceil(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} min"


@dataclass
class _Guild:
    in_flight: int = 0
    recent: deque[float] = field(default_factory=deque)


class RequestQuotas:
    def __init__(self, settings: QuotaSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._last_request: dict[int, float] = {}
        self._guilds: dict[int, _Guild] = {}

    @contextmanager
    def admit(self, guild_id: int | None, user_id: int, limits: QuotaSettings | None = None) -> Iterator[None]:
        """Hold a place for one request while it runs, or raise ``TooManyRequests`` saying when to retry.

        ``limits``: the server's own, where it set stricter ones than the config's.
        """
        now = self.clock()
        settings = limits or self.settings
        last = self._last_request.get(user_id)
        if last is not None and now - last < settings.user_cooldown_seconds:
            wait = settings.user_cooldown_seconds - (now - last)
            raise TooManyRequests(f"You are asking too fast; you can ask again in {_wait(wait)}.")
        guild = self._guilds.setdefault(guild_id or 0, _Guild())
        recent = guild.recent
        while recent and now - recent[0] >= settings.period_seconds:
            recent.popleft()
        if guild.in_flight >= settings.guild_in_flight:
            raise TooManyRequests(
                f"This server already has {guild.in_flight} requests being answered; try again in a minute."
            )
        if len(recent) >= settings.guild_per_period:
            wait = settings.period_seconds - (now - recent[0])
            raise TooManyRequests(
                f"This server has used its {settings.guild_per_period} requests for now; more in {_wait(wait)}."
            )
        self._last_request[user_id] = now
        recent.append(now)
        guild.in_flight += 1
        try:
            yield
        finally:
            guild.in_flight -= 1
