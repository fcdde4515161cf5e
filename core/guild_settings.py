"""Per-server settings a member with Manage Server may change without the bot's owner.

Quota values a server sets may only be stricter than the operator's: the config's values are the
fair share of one GPU between all servers, and one server raising its own would take from others.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from core.config import QuotaSettings
from core.errors import BadParameter

MAX_ANSWER_CHANNELS = 25
MAX_COOLDOWN_SECONDS = 3600


@dataclass(frozen=True)
class GuildSettings:
    default_task: str | None = None
    answer_channels: frozenset[int] = frozenset()  # empty: every channel
    required_role: int | None = None
    ephemeral_answers: bool = False
    user_cooldown_seconds: int | None = None  # None: the config's value
    guild_in_flight: int | None = None
    guild_per_period: int | None = None
    report_channel: int | None = None
    model: str | None = None  # None: the bot's default model

    def quotas(self, defaults: QuotaSettings) -> QuotaSettings:
        """The limits in force here: the server's own where it set them, never looser than the config's."""
        return defaults.model_copy(
            update={
                "user_cooldown_seconds": max(defaults.user_cooldown_seconds, self.user_cooldown_seconds or 0),
                "guild_in_flight": min(defaults.guild_in_flight, self.guild_in_flight or defaults.guild_in_flight),
                "guild_per_period": min(defaults.guild_per_period, self.guild_per_period or defaults.guild_per_period),
            }
        )

    def forgetting(self, gone: int) -> GuildSettings:
        """Without a channel the server deleted. A restriction never lifts by itself: the last
        answer channel stays (an empty list means every channel), and so does a deleted required
        role, until a moderator changes them; the refusals say why."""
        channels = self.answer_channels - {gone}
        return dataclasses.replace(
            self,
            answer_channels=channels or self.answer_channels,
            report_channel=None if self.report_channel == gone else self.report_channel,
        )

    def allows_channel(self, *channel_ids: int | None) -> bool:
        """A channel, or a thread whose parent, is one of the answer channels (or none are set)."""
        return not self.answer_channels or any(c in self.answer_channels for c in channel_ids if c is not None)


def check_quota_change(
    defaults: QuotaSettings, cooldown_seconds: int | None, in_flight: int | None, per_period: int | None
) -> None:
    """Refuse values outside what the operator allows, saying the range."""
    low_cooldown = math.ceil(defaults.user_cooldown_seconds)  # a whole number of seconds, never below the operator's
    if cooldown_seconds is not None and not low_cooldown <= cooldown_seconds <= MAX_COOLDOWN_SECONDS:
        raise BadParameter(f"cooldown_seconds must be between {low_cooldown} and {MAX_COOLDOWN_SECONDS}.")
    if in_flight is not None and not 1 <= in_flight <= defaults.guild_in_flight:
        raise BadParameter(f"in_flight must be between 1 and {defaults.guild_in_flight}.")
    if per_period is not None and not 1 <= per_period <= defaults.guild_per_period:
        raise BadParameter(f"per_period must be between 1 and {defaults.guild_per_period}.")
