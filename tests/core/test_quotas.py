"""Cooldowns and quotas refuse with when to try again, and free their place when a request ends."""

from __future__ import annotations

import pytest

from core.config import QuotaSettings
from core.errors import BadImage, BadPrompt
from core.guild_settings import MAX_COOLDOWN_SECONDS
from core.quotas import PRUNE_SECONDS, QuotaLeft, RequestQuotas, TooManyRequests


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_user_waits_between_requests():
    clock = Clock()
    quotas = RequestQuotas(QuotaSettings(user_cooldown_seconds=10), clock)
    with quotas.admit(1, 7):
        pass
    clock.now += 3.5
    with (
        pytest.raises(TooManyRequests, match=r"^You are asking too fast; you can ask again in 7 s\.$"),
        quotas.admit(1, 7),
    ):
        pass
    with quotas.admit(1, 8):  # another user is not held back
        pass
    clock.now += 6.5
    with quotas.admit(1, 7):
        pass


def test_a_guild_has_a_cap_on_requests_in_flight():
    quotas = RequestQuotas(QuotaSettings(user_cooldown_seconds=0, guild_in_flight=2), Clock())
    with quotas.admit(1, 1), quotas.admit(1, 2):
        with pytest.raises(TooManyRequests, match="already has 2 requests answered or waiting"), quotas.admit(1, 3):
            pass
        with quotas.admit(2, 3):  # other guilds are not affected
            pass
    with quotas.admit(1, 3):  # places are freed when requests end, even by an error
        pass


def test_a_guild_has_a_quota_per_period():
    clock = Clock()
    quotas = RequestQuotas(QuotaSettings(user_cooldown_seconds=0, guild_per_period=2, period_seconds=3600), clock)
    for user in (1, 2):
        with quotas.admit(5, user):
            clock.now += 60
    with pytest.raises(TooManyRequests, match=r"used its 2 requests for now; more in 58 min\.$"), quotas.admit(5, 3):
        pass
    clock.now += 58 * 60
    with quotas.admit(5, 3):
        pass


def test_a_refused_request_gives_back_its_cooldown_and_its_share_of_the_quota():
    clock = Clock()
    quotas = RequestQuotas(QuotaSettings(user_cooldown_seconds=10, guild_per_period=1), clock)
    with pytest.raises(BadImage), quotas.admit(5, 7):
        raise BadImage("That file is not an image.")
    with quotas.admit(5, 7):  # at once, and the server's one request is still there
        pass
    with pytest.raises(TooManyRequests, match="asking too fast"), quotas.admit(5, 7):
        pass
    with pytest.raises(TooManyRequests, match="used its 1 request for now"), quotas.admit(5, 8):
        pass


def test_a_request_refused_after_its_images_were_decoded_keeps_its_cooldown_not_its_share():
    """Else a prompt sure to be refused (too many tokens) could be sent again at once, forever,
    each time making the bot fetch and decode four large images."""
    clock = Clock()
    quotas = RequestQuotas(QuotaSettings(user_cooldown_seconds=10, guild_per_period=1), clock)
    with pytest.raises(BadPrompt), quotas.admit(5, 7) as admission:
        admission.spent()
        raise BadPrompt("The prompt with the task's 8 examples is 3000 tokens")
    with pytest.raises(TooManyRequests, match="asking too fast"), quotas.admit(5, 7):
        pass
    with quotas.admit(5, 8):  # the server's one request is still there
        pass


def test_an_answered_request_keeps_its_cooldown_whatever_fails_after():
    clock = Clock()
    quotas = RequestQuotas(QuotaSettings(user_cooldown_seconds=10), clock)
    with pytest.raises(OSError), quotas.admit(5, 7):
        raise OSError("the answer could not be posted")
    with pytest.raises(TooManyRequests, match="asking too fast"), quotas.admit(5, 7):
        pass


def test_direct_messages_count_per_person():
    quotas = RequestQuotas(QuotaSettings(user_cooldown_seconds=0, guild_per_period=1, guild_in_flight=1), Clock())
    with quotas.admit(None, 1):
        busy = r"^You already have 1 request answered or waiting"
        with pytest.raises(TooManyRequests, match=busy), quotas.admit(None, 1):
            pass
        with quotas.admit(None, 2):  # someone else's direct messages are not shared with theirs
            pass
    with pytest.raises(TooManyRequests, match=r"^You have used your 1 request for now"), quotas.admit(None, 1):
        pass


def test_idle_users_and_places_are_forgotten():
    clock = Clock()
    quotas = RequestQuotas(QuotaSettings(user_cooldown_seconds=10, period_seconds=60), clock)
    for user in range(100):
        with quotas.admit(user, user):
            pass
    with quotas.admit(None, 1000):
        clock.now += max(PRUNE_SECONDS, MAX_COOLDOWN_SECONDS)
        with quotas.admit(None, 1001):  # prunes: the running places and the newest user stay
            assert len(quotas._places) == 2 and list(quotas._last_request) == [1001]
    clock.now += 0.5
    with pytest.raises(TooManyRequests, match="asking too fast"), quotas.admit(1, 1001):
        pass


def test_what_is_left_is_read_without_spending_anything():
    clock = Clock()
    settings = QuotaSettings(user_cooldown_seconds=10, guild_in_flight=3, guild_per_period=2, period_seconds=3600)
    quotas = RequestQuotas(settings, clock)
    assert quotas.left(5, 7) == QuotaLeft(0, 3, 0, 2, 3600, None, 0.0)
    with quotas.admit(5, 7):
        clock.now += 4
        assert quotas.left(5, 7) == QuotaLeft(1, 3, 1, 2, 3600, 3596, 6)
        assert quotas.left(5, 8).cooldown_seconds == 0  # another member's own wait
        assert quotas.left(None, 7) == QuotaLeft(0, 3, 0, 2, 3600, None, 6)  # the same person, in direct messages
    stricter = settings.model_copy(update={"user_cooldown_seconds": 30, "guild_per_period": 1})
    assert quotas.left(5, 7, stricter) == QuotaLeft(0, 3, 1, 1, 3600, 3596, 26)
    for _ in range(3):
        quotas.left(5, 8)
    with quotas.admit(5, 8):  # looking took nothing: the server's second request is still there
        pass
    clock.now += 3596
    assert quotas.left(5, 7) == QuotaLeft(0, 3, 1, 2, 3600, 4, 0.0)  # the first has left the period


def test_a_job_takes_its_count_from_the_period_at_once_and_members_then_find_it_used():
    clock = Clock()
    quotas = RequestQuotas(QuotaSettings(user_cooldown_seconds=0, guild_per_period=10, period_seconds=3600), clock)
    quotas.charge(5, 8)
    assert quotas.left(5, 1).used == 8
    with quotas.admit(5, 1), quotas.admit(5, 2):
        pass
    with pytest.raises(TooManyRequests, match="used its 10 requests for now"), quotas.admit(5, 3):
        pass
    assert quotas.left(6, 1).used == 0  # another server's quota is its own


def test_a_job_that_does_not_fit_is_refused_with_when_it_will_and_takes_nothing():
    clock = Clock()
    quotas = RequestQuotas(QuotaSettings(user_cooldown_seconds=0, guild_per_period=10, period_seconds=3600), clock)
    for user in range(6):
        with quotas.admit(5, user):
            clock.now += 60
    with pytest.raises(
        TooManyRequests,
        match=r"^That needs 8 requests, and this server has used 6 of its 10 for now; there will be room in 57 min\.$",
    ):
        quotas.charge(5, 8)
    assert quotas.left(5, 1).used == 6
    clock.now += 56 * 60  # the 4th oldest leaves the period 57 min after the refusal
    with pytest.raises(TooManyRequests):
        quotas.charge(5, 8)
    clock.now += 60
    quotas.charge(5, 8)
    assert quotas.left(5, 1).used == 10


def test_a_job_larger_than_the_whole_quota_is_refused_for_good():
    quotas = RequestQuotas(QuotaSettings(guild_per_period=5, period_seconds=3600), Clock())
    refusal = r"^That needs 8 requests, more than this server's 5 requests per hour\.$"
    with pytest.raises(TooManyRequests, match=refusal):
        quotas.charge(5, 8)


def test_what_a_job_did_not_send_is_given_back_once():
    clock = Clock()
    quotas = RequestQuotas(QuotaSettings(guild_per_period=10, period_seconds=3600), clock)
    charge = quotas.charge(5, 8)
    charge.give_back(5)
    charge.give_back(5)  # only the 3 still taken
    assert quotas.left(5, 1).used == 0
    assert charge.unused == 0
