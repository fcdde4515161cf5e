"""What the stand-in keeps of each interaction and message, and the errors it answers with."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024  # bytes a bot may attach, in a guild without boosts and in DMs

# How the bot marks a message that stands for work still to come (its place-in-line notice).
PROGRESS_PREFIX = "⏳"


class DiscordError(Exception):
    """An error answer in Discord's shape; ``broke_limits``: the bot sent what Discord documents it refuses."""

    def __init__(
        self, status: int, code: int, message: str, errors: dict[str, Any] | None = None, broke_limits: bool = False
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.errors = status, code, message, errors
        self.broke_limits = broke_limits

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "code": self.code} | ({"errors": self.errors} if self.errors else {})


@dataclass(frozen=True)
class Edit:
    """A message as one edit left it, and when (the stand-in's clock), so tests can follow a stream of edits."""

    at: float
    content: str
    embeds: list[dict[str, Any]]
    components: list[dict[str, Any]]


@dataclass
class Message:
    id: int
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    components: list[dict[str, Any]] = field(default_factory=list)
    ephemeral: bool = False
    loading: bool = False
    deleted: bool = False
    channel_id: int | None = None  # None: a message the stand-in places in no particular channel
    # What the bot sent as ``allowed_mentions`` with the request that last set this message's content
    # (None: it sent none, so Discord's default applies and every mention in the content pings).
    allowed_mentions: dict[str, Any] | None = None
    type: int = 20  # CHAT_INPUT_COMMAND for interaction responses, 0 (DEFAULT) for channel messages
    interaction_metadata: dict[str, Any] | None = None  # who, with which interaction, made a response
    edits: list[Edit] = field(default_factory=list)  # every edit, oldest first

    def edited(self, at: float) -> None:
        self.edits.append(Edit(at, self.content, list(self.embeds), list(self.components)))

    @property
    def silent(self) -> bool:
        """Whether the bot told Discord to ping nobody, whatever the content mentions."""
        allowed = self.allowed_mentions
        if allowed is None:
            return False
        return not (allowed.get("parse") or allowed.get("users") or allowed.get("roles") or allowed.get("replied_user"))


@dataclass
class InteractionRecord:
    id: int
    token: str
    created: float
    channel_id: int | None = None  # the channel the user acted in; responses are posted there
    original: Message | None = None
    followups: list[Message] = field(default_factory=list)
    choices: list[dict[str, Any]] | None = None
    modal: dict[str, Any] | None = None
    target: Message | None = None  # the message whose component was used
    metadata: dict[str, Any] | None = None  # what Discord puts in its responses' ``interaction_metadata``
    attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT  # what the interaction told the bot it may attach
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def visible(self) -> list[Message]:
        """What the user sees, in order: the original response, then followups."""
        messages = [self.original] if self.original and not self.original.deleted else []
        return messages + [m for m in self.followups if not m.deleted]

    async def wait_for(self, done: Callable[[], bool], timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not done():
                self.changed.clear()
                await self.changed.wait()

    async def answered(self, timeout: float = 60) -> list[Message]:
        """Wait until the user sees something that is not a placeholder: 'thinking', or a place in line."""

        def waiting(message: Message) -> bool:
            return message.loading or message.content.startswith(PROGRESS_PREFIX)

        await self.wait_for(lambda: bool(self.visible) and not any(waiting(m) for m in self.visible), timeout)
        return self.visible
