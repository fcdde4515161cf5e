"""Discord API v10 objects as the real API sends them, for the fields discord.py reads."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

DISCORD_EPOCH_MS = 1_420_070_400_000
_sequence = itertools.count(1)

# https://discord.com/developers/docs/topics/permissions
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
MANAGE_MESSAGES = 1 << 13
ALL_PERMISSIONS = (1 << 51) - 1
# View channel, send messages, embed links, attach files, read history, use application commands.
EVERYONE_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 31)


def snowflake() -> int:
    """Unique ids that also encode a creation time, like Discord's."""
    return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(_sequence) & 0x3FFFFF)


def user_payload(user_id: int, name: str, bot: bool = False) -> dict[str, Any]:
    return {
        "id": str(user_id),
        "username": name,
        "global_name": name.title(),
        "discriminator": "0",
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
    }


@dataclass
class Member:
    id: int
    name: str
    permissions: int = EVERYONE_PERMISSIONS
    roles: list[int] = field(default_factory=list)

    @property
    def effective_permissions(self) -> int:
        """Discord resolves Administrator to every permission in interaction payloads."""
        return ALL_PERMISSIONS if self.permissions & ADMINISTRATOR else self.permissions

    def payload(self) -> dict[str, Any]:
        return {
            "user": user_payload(self.id, self.name),
            "roles": [str(r) for r in self.roles],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "permissions": str(self.effective_permissions),
            "nick": None,
            "avatar": None,
        }


@dataclass
class Channel:
    """A text channel (type 0), or a DM channel when ``guild_id`` is None."""

    id: int
    guild_id: int | None
    name: str = "general"
    nsfw: bool = False
    position: int = 0

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "type": 0,
            "name": self.name,
            "position": self.position,
            "nsfw": self.nsfw,
        }
        if self.guild_id is not None:
            data["guild_id"] = str(self.guild_id)
            data["permission_overwrites"] = []
            data["parent_id"] = None
            data["topic"] = None
            data["rate_limit_per_user"] = 0
        return data


@dataclass
class Role:
    id: int
    name: str
    permissions: int = 0
    position: int = 1

    def payload(self) -> dict[str, Any]:
        # discord.py 2.7 reads the colour from ``colors``; older clients read ``color``. Discord sends both.
        return {
            "id": str(self.id),
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }


@dataclass
class Guild:
    id: int
    name: str
    owner_id: int
    channels: list[Channel] = field(default_factory=list)
    members: dict[int, Member] = field(default_factory=dict)
    roles: list[Role] = field(default_factory=list)

    @property
    def everyone(self) -> Role:
        """The @everyone role, whose id is the guild's."""
        return Role(self.id, "@everyone", EVERYONE_PERMISSIONS, position=0)


@dataclass
class Attachment:
    id: int
    filename: str
    data: bytes
    content_type: str | None
    url: str

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": len(self.data),
            "url": self.url,
            "proxy_url": self.url,
        }
        if self.content_type:
            data["content_type"] = self.content_type
        return data


OPTION_TYPES = {str: 3, int: 4, bool: 5, float: 10}
ATTACHMENT_OPTION = 11
CHANNEL_OPTION = 7
ROLE_OPTION = 8
SUB_COMMAND = 1
SUB_COMMAND_GROUP = 2


def guild_payload(guild: Guild, bot_member: dict[str, Any], premium_tier: int = 0) -> dict[str, Any]:
    """GUILD_CREATE data: the fields discord.py reads, with the bot as the only cached member.

    ``premium_tier`` is what discord.py derives the guild's upload limit from.
    """
    return {
        "id": str(guild.id),
        "name": guild.name,
        "icon": None,
        "owner_id": str(guild.owner_id),
        "roles": [role.payload() for role in [guild.everyone, *guild.roles]],
        "channels": [c.payload() for c in guild.channels],
        "members": [bot_member],
        "member_count": len(guild.members) + 1,
        "unavailable": False,
        "large": False,
        "joined_at": "2026-01-01T00:00:00+00:00",
        "features": [],
        "emojis": [],
        "stickers": [],
        "threads": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "voice_states": [],
        "presences": [],
        "premium_tier": premium_tier,
        "preferred_locale": "en-US",
        "nsfw_level": 0,
        "mfa_level": 0,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "afk_timeout": 300,
        "system_channel_flags": 0,
    }
