"""Fair use: a per-user cooldown, and per-server caps on requests in flight and per period (per
person in direct messages, where there is no server to share them).

One user cannot starve a server, and one server cannot starve the others. Refusals say when to
try again. State is in memory: a restart forgives everyone, which errs on the side of the user.
Members' requests and task uploads (which read images too) are counted apart, each by an instance
of ``RequestQuotas`` with its own limits and words.
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
from core.guild_settings import MAX_COOLDOWN_SECONDS
from core.wording import plural, quota_period


class TooManyRequests(FlamingoError):
    """A cooldown or quota refuses the request for now."""


def wait_words(seconds: float) -> str:
    """A wait as refusals (and ``/queue``) say it: whole seconds under a minute, else whole minutes."""
    seconds = math.ceil(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes = math.ceil(seconds / 60)
    return f"{minutes} min"


@dataclass(frozen=True)
class Wording:
    """What refusals call the things counted."""

    noun: str  # counted with ``plural``
    under_way: str
    too_fast: str  # with ``{wait}``


REQUESTS = Wording("request", "answered or waiting", "You are asking too fast; you can ask again in {wait}.")
TASK_UPLOADS = Wording(
    "task upload", "being read", "You are uploading to tasks too fast; you can upload again in {wait}."
)


@dataclass
class Admission:
    """A request let in. Once the bot has spent real work on it (fetched and decoded its images),
    ``spent()`` says so: a refusal after that still costs the cooldown, or the request could be
    sent again at once, over and over, only to make the bot decode."""

    work_spent: bool = False

    def spent(self) -> None:
        self.work_spent = True


@dataclass(frozen=True)
class QuotaLeft:
    """What a server (one person, in direct messages) has left of its quotas now, and one user's wait."""

    in_flight: int  # answered or waiting
    in_flight_limit: int
    used: int  # within the period
    per_period: int
    period_seconds: float
    next_back_seconds: float | None  # until the oldest counted request leaves the period; None: none counted
    cooldown_seconds: float  # until the user may ask again; 0: now


@dataclass
class Charge:
    """Requests taken from a period's quota at once (``RequestQuotas.charge``); those a job did not
    send after all can be given back."""

    _recent: deque[float]
    _at: float
    unused: int  # taken and not given back

    def give_back(self, count: int) -> None:
        """Return ``count`` of them (at most those still taken), unless they have aged out of the period meanwhile."""
        for _ in range(min(count, self.unused)):
            self.unused -= 1
            if self._at in self._recent:
                self._recent.remove(self._at)


@dataclass
class _Place:
    """A server's requests, or one person's in direct messages, where there is no server to share."""

    in_flight: int = 0
    recent: deque[float] = field(default_factory=deque)

    def within(self, now: float, period: float) -> deque[float]:
        """Its requests counted in the period ending ``now``, those before it let go."""
        while self.recent and now - self.recent[0] >= period:
            self.recent.popleft()
        return self.recent


# How often idle users and places are forgotten, so that memory follows the active ones.
PRUNE_SECONDS = 600.0


class RequestQuotas:
    def __init__(
        self, settings: QuotaSettings, clock: Callable[[], float] = time.monotonic, wording: Wording = REQUESTS
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.wording = wording
        self._last_request: dict[int, float] = {}
        self._places: dict[tuple[str, int], _Place] = {}
        self._pruned = clock()

    @contextmanager
    def admit(self, guild_id: int | None, user_id: int, limits: QuotaSettings | None = None) -> Iterator[Admission]:
        """Hold a place for one request while it runs, or raise ``TooManyRequests`` saying when to retry.

        ``limits``: the server's own, where it set stricter ones than the config's. A request refused
        on the way (a ``FlamingoError``: a bad image or prompt, a busy or failed model) gives back
        its share of the server's quota, and its cooldown too unless work was spent on it
        (``Admission.spent``), so that fixing a typo costs nothing.
        """
        now = self.clock()
        self._prune(now)
        settings, words = limits or self.settings, self.wording
        last = self._last_request.get(user_id)
        if last is not None and now - last < settings.user_cooldown_seconds:
            wait = settings.user_cooldown_seconds - (now - last)
            raise TooManyRequests(words.too_fast.format(wait=wait_words(wait)))
        in_dms = guild_id is None
        place = self._places.setdefault(_key(guild_id, user_id), _Place())
        recent = place.within(now, settings.period_seconds)
        if place.in_flight >= settings.guild_in_flight:
            who = "You already have" if in_dms else "This server already has"
            raise TooManyRequests(
                f"{who} {plural(place.in_flight, words.noun)} {words.under_way}; try again in a minute."
            )
        if len(recent) >= settings.guild_per_period:
            wait = settings.period_seconds - (now - recent[0])
            who = "You have used your" if in_dms else "This server has used its"
            raise TooManyRequests(
                f"{who} {plural(settings.guild_per_period, words.noun)} for now; more in {wait_words(wait)}."
            )
        self._last_request[user_id] = now
        recent.append(now)
        place.in_flight += 1
        admission = Admission()
        try:
            yield admission
        except FlamingoError:
            if now in recent:  # (unless it has aged out of the period meanwhile)
                recent.remove(now)
            if self._last_request.get(user_id) == now and not admission.work_spent:
                if last is None:
                    del self._last_request[user_id]
                else:
                    self._last_request[user_id] = last
            raise
        finally:
            place.in_flight -= 1

    def charge(self, guild_id: int, count: int, limits: QuotaSettings | None = None) -> Charge:
        """Take ``count`` requests from a server's per-period quota at once (a job's, such as a task's
        evaluation), or raise ``TooManyRequests`` saying when they will fit, taking nothing. Neither a
        member's cooldown nor the requests in flight: the job holds one place in the model's line
        at a time, behind members' requests, so it keeps none of them from being let in."""
        now = self.clock()
        self._prune(now)
        settings, words = limits or self.settings, self.wording
        per_period = settings.guild_per_period
        if count > per_period:
            raise TooManyRequests(
                f"That needs {plural(count, words.noun)}, more than this server's "
                f"{plural(per_period, words.noun)} per {quota_period(settings.period_seconds)}."
            )
        place = self._places.setdefault(_key(guild_id, 0), _Place())  # the server's, whoever asks
        recent = place.within(now, settings.period_seconds)
        over = len(recent) + count - per_period
        if over > 0:  # it fits once the ``over`` oldest counted requests have left the period
            wait = settings.period_seconds - (now - recent[over - 1])
            raise TooManyRequests(
                f"That needs {plural(count, words.noun)}, and this server has used {len(recent)} of its "
                f"{per_period} for now; there will be room in {wait_words(wait)}."
            )
        recent.extend([now] * count)
        return Charge(recent, now, count)

    def left(self, guild_id: int | None, user_id: int, limits: QuotaSettings | None = None) -> QuotaLeft:
        """What ``admit`` would find now, changing nothing (``/queue`` only looks)."""
        now = self.clock()
        settings = limits or self.settings
        place = self._places.get(_key(guild_id, user_id), _Place())
        recent = [at for at in place.recent if now - at < settings.period_seconds]
        last = self._last_request.get(user_id)
        cooldown = 0.0 if last is None else max(0.0, settings.user_cooldown_seconds - (now - last))
        return QuotaLeft(
            place.in_flight,
            settings.guild_in_flight,
            len(recent),
            settings.guild_per_period,
            settings.period_seconds,
            settings.period_seconds - (now - recent[0]) if recent else None,
            cooldown,
        )

    def _prune(self, now: float) -> None:
        """Forget users whose every cooldown has passed, and places with nothing running or counted."""
        if now - self._pruned < PRUNE_SECONDS:
            return
        self._pruned = now
        longest = max(self.settings.user_cooldown_seconds, MAX_COOLDOWN_SECONDS)
        self._last_request = {user: at for user, at in self._last_request.items() if now - at < longest}
        period = self.settings.period_seconds
        self._places = {
            key: place
            for key, place in self._places.items()
            if place.in_flight or (place.recent and now - place.recent[-1] < period)
        }


def _key(guild_id: int | None, user_id: int) -> tuple[str, int]:
    """Whose quota: the server's, or the person's in direct messages."""
    return ("user", user_id) if guild_id is None else ("guild", guild_id)
