"""The order of the model's line: fair between servers, with direct messages as one group, by cost.

First come, first served let one server, or a handful of accounts in direct messages (each with a
whole server's quota), fill the line and hold the model while an unrelated server's first request
was refused as busy. Here each party (a server; all direct messages together) is served by
start-time fair queueing: a request's turn is set by the work its party already has in line ahead
of it, counted in decode steps, so a party that asks for little goes before one that queued much,
and a party's own requests keep their order. A party may hold at most its share of the places,
which always leaves room for one more party to be let in.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from core.errors import ServiceBusy
from core.wording import plural

T = TypeVar("T")

# A server's id; None: direct messages, one group however many accounts write (accounts are free to make).
Party = int | None


@dataclass(eq=False)
class _Place(Generic[T]):
    item: T
    party: Party
    start: float  # the virtual time at which it may run: after its party's earlier work
    number: int  # arrival order, between equal starts


class FairLine(Generic[T]):
    """Waiting requests in the order they run; not thread-safe (the service holds its lock around it)."""

    def __init__(self, capacity: int, shares: bool = True) -> None:
        self.capacity = capacity
        self.shares = shares  # False behind another line that keeps them (a Ray replica's, behind the bot's)
        self._places: list[_Place[T]] = []  # sorted by (start, number)
        self._held: Counter[Party] = Counter()
        self._finish: dict[Party, float] = {}  # where each party's queued work ends, in virtual time
        self._clock = 0.0  # the start of the latest request taken to run
        self._numbers = itertools.count()

    def __len__(self) -> int:
        return len(self._places)

    def __iter__(self) -> Iterator[T]:
        return (place.item for place in self._places)

    def share(self, party: Party) -> int:
        """The places a party may hold: an equal part for it, the others waiting, and one more party."""
        parties = len(self._held) + (party not in self._held)
        return max(1, self.capacity // (parties + 1))

    def add(self, item: T, party: Party, cost: float) -> None:
        """Queue ``item`` costing ``cost`` decode steps, or refuse it as ``check_room`` does."""
        self.check_room(party)
        start = max(self._clock, self._finish.get(party, 0.0))
        self._finish[party] = start + max(cost, 1.0)
        place = _Place(item, party, start, next(self._numbers))
        index = len(self._places)
        while index and (self._places[index - 1].start, self._places[index - 1].number) > (start, place.number):
            index -= 1
        self._places.insert(index, place)
        self._held[party] += 1

    def check_room(self, party: Party) -> None:
        """Refuse as busy when the line is full, or when the party holds its share, saying which."""
        if len(self._places) >= self.capacity:
            raise ServiceBusy(
                f"The model is busy ({plural(self.capacity, 'request')} {'is' if self.capacity == 1 else 'are'} "
                "already waiting); try again in a minute."
            )
        held = self._held[party]
        if self.shares and held >= self.share(party):
            whose = "Direct messages'" if party is None else "This server's"
            raise ServiceBusy(
                f"{whose} share of the model's line is full ({plural(held, 'request')} waiting); the rest is kept "
                "for other servers. Try again in a minute."
            )

    def place_for(self, party: Party) -> int:
        """The place a request of ``party`` would take now: after every request starting no later."""
        start = max(self._clock, self._finish.get(party, 0.0))
        return 1 + sum(place.start <= start for place in self._places)

    def position(self, item: T) -> int | None:
        """1 for the next to run; None when it is not waiting."""
        for index, place in enumerate(self._places, 1):
            if place.item == item:
                return index
        return None

    def remove(self, item: T) -> bool:
        """Withdraw a waiting request; its cost still counts for its party until the line's clock passes it."""
        for index, place in enumerate(self._places):
            if place.item == item:
                del self._places[index]
                self._release(place.party)
                return True
        return False

    def take(self, count: int) -> list[T]:
        """The first ``count`` requests, out of the line to run."""
        taken, self._places = self._places[:count], self._places[count:]
        for place in taken:
            self._clock = max(self._clock, place.start)
            self._release(place.party)
        self._finish = {party: end for party, end in self._finish.items() if end > self._clock}
        return [place.item for place in taken]

    def put_back(self, item: T, party: Party) -> None:
        """Return a request taken to run but stopped before it finished (to let others run) to the front
        of the line, room or not: it keeps the turn it had, and its cost already counted for its party."""
        self._places.insert(0, _Place(item, party, self._clock, -1))  # no place starts before the clock
        self._held[party] += 1

    def clear(self) -> list[T]:
        return self.take(len(self._places))

    def _release(self, party: Party) -> None:
        self._held[party] -= 1
        if not self._held[party]:
            del self._held[party]
