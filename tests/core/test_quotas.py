"""Cooldowns and quotas refuse with when to try again, and free their place when a request ends."""

from __future__ import annotations

import pytest

from core.config import QuotaSettings
from core.quotas import RequestQuotas, TooManyRequests


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
        with pytest.raises(TooManyRequests, match="already has 2 requests being answered"), quotas.admit(1, 3):
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
