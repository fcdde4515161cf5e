"""The line's order and shares: fair between servers and direct messages, by each request's cost."""

from __future__ import annotations

import pytest

from core.errors import ServiceBusy
from core.serving.fair_line import FairLine


def test_a_party_that_queued_much_waits_behind_one_that_asks_little():
    line: FairLine[str] = FairLine(32)
    line.add("a long", 1, cost=300)
    line.add("a short", 1, cost=10)
    for n in range(3):
        line.add(f"b{n}", 2, cost=10)
    assert list(line) == ["a long", "b0", "b1", "b2", "a short"]


def test_equal_costs_take_turns_and_a_party_keeps_its_own_order():
    line: FairLine[str] = FairLine(32)
    for n in range(3):
        line.add(f"a{n}", 1, cost=5)
    line.add("b0", 2, cost=5)
    line.add("dm0", None, cost=5)
    assert list(line) == ["a0", "b0", "dm0", "a1", "a2"]
    assert line.position("a1") == 4
    assert line.position("gone") is None


def test_a_running_request_counts_against_its_party_until_the_others_catch_up():
    line: FairLine[str] = FairLine(32)
    line.add("a0", 1, cost=100)
    line.add("b0", 2, cost=10)
    assert line.take(2) == ["a0", "b0"]
    line.add("a1", 1, cost=10)
    for n in range(1, 4):
        line.add(f"b{n}", 2, cost=10)
    assert list(line) == ["b1", "b2", "b3", "a1"]
    line.take(4)
    line.add("a2", 1, cost=10)
    line.add("b4", 2, cost=10)  # b's work has all run; a's last request is still counted
    assert list(line) == ["b4", "a2"]
    assert line.place_for(3) == 2  # a newcomer starts now: with b4, before a2


def test_a_party_holds_at_most_its_share_leaving_room_for_one_more():
    line: FairLine[int] = FairLine(32)
    for n in range(16):
        line.add(n, None, cost=1)
    with pytest.raises(
        ServiceBusy, match=r"^Direct messages' share of the model's line is full \(16 requests waiting\)"
    ):
        line.add(99, None, cost=1)
    line.add(100, 7, cost=1)  # an unrelated server's first request finds room
    for n in range(8):  # its share with three parties waiting: 32 // 4
        line.add(200 + n, 8, cost=1)
    with pytest.raises(ServiceBusy, match=r"^This server's share of the model's line is full \(8 requests waiting\)"):
        line.add(300, 8, cost=1)


def test_a_full_line_is_busy_for_everyone():
    line: FairLine[int] = FairLine(2)
    line.add(1, 1, cost=1)
    line.add(2, 2, cost=1)
    with pytest.raises(ServiceBusy, match=r"busy \(2 requests are already waiting\)"):
        line.add(3, 3, cost=1)


def test_withdrawn_and_taken_requests_free_their_places():
    line: FairLine[int] = FairLine(4)
    line.add(1, 1, cost=1)
    line.add(2, 1, cost=1)
    with pytest.raises(ServiceBusy, match="This server's share"):
        line.add(3, 1, cost=1)
    assert line.remove(2)
    assert not line.remove(2)
    line.add(3, 1, cost=1)
    assert line.take(1) == [1]
    line.add(4, 1, cost=1)
    assert list(line) == [3, 4]
    assert line.clear() == [3, 4]
    assert len(line) == 0


def test_a_line_behind_the_bots_own_keeps_no_shares():
    """A Ray replica's line: the bot's has let each request in by its server's share already."""
    line: FairLine[int] = FairLine(4, shares=False)
    for n in range(4):
        line.add(n, None, cost=1)
    with pytest.raises(ServiceBusy, match="busy"):
        line.add(5, None, cost=1)


def test_a_request_put_back_goes_first_even_in_a_full_line():
    """A background request stopped to let a member's beam search run keeps its turn."""
    line: FairLine[str] = FairLine(2)
    line.add("a0", 1, cost=5)
    assert line.take(1) == ["a0"]
    line.add("b0", 2, cost=1)
    line.add("c0", 3, cost=1)
    line.put_back("a0", 1)
    assert list(line) == ["a0", "b0", "c0"]
    assert line.position("a0") == 1
    assert line.take(1) == ["a0"]
    assert line.remove("c0")
    line.add("d0", 4, cost=1)  # arrivals after it queue by their own turns, as before
    assert list(line) == ["b0", "d0"]
