"""What the stand-in keeps of each interaction, and Discord's limits on what a bot may send."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# https://discord.com/developers/docs/resources/message#embed-object-embed-limits
LIMITS = {
    "content": 2000,
    "embeds": 10,
    "files": 10,
    "title": 256,
    "description": 4096,
    "fields": 25,
    "field_name": 256,
    "field_value": 1024,
    "footer": 2048,
    "author": 256,
    "embed_total": 6000,
}


# How the bot marks a message that stands for work still to come (its place-in-line notice).
PROGRESS_PREFIX = "⏳"


class DiscordError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


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


def check_limits(payload: dict[str, Any], files: dict[str, bytes]) -> None:
    problems = []
    if len(payload.get("content") or "") > LIMITS["content"]:
        problems.append("content: Must be 2000 or fewer in length.")
    embeds = payload.get("embeds") or []
    if len(embeds) > LIMITS["embeds"]:
        problems.append("embeds: Must be 10 or fewer in length.")
    if len(files) > LIMITS["files"]:
        problems.append("files: Must be 10 or fewer.")
    total = 0
    for embed in embeds:
        for key in ("title", "description"):
            total += len(embed.get(key) or "")
            if len(embed.get(key) or "") > LIMITS[key]:
                problems.append(f"embeds.{key}: Must be {LIMITS[key]} or fewer in length.")
        fields = embed.get("fields") or []
        if len(fields) > LIMITS["fields"]:
            problems.append("embeds.fields: Must be 25 or fewer in length.")
        for item in fields:
            total += len(item["name"]) + len(item["value"])
            if not item["value"] or len(item["value"]) > LIMITS["field_value"]:
                problems.append("embeds.fields.value: Must be between 1 and 1024 in length.")
        total += len((embed.get("footer") or {}).get("text", "")) + len((embed.get("author") or {}).get("name", ""))
    if total > LIMITS["embed_total"]:
        problems.append("embeds: Embed size exceeds maximum size of 6000")
    if not (payload.get("content") or embeds or files or payload.get("components")):
        problems.append("Cannot send an empty message")
    if problems:
        raise DiscordError(400, 50035, "Invalid Form Body: " + "; ".join(problems))


def checked_choices(choices: Any) -> list[dict[str, Any]]:
    if not isinstance(choices, list) or len(choices) > 25:
        raise DiscordError(400, 50035, "Invalid Form Body: data.choices: Must be 25 or fewer in length.")
    for choice in choices:
        if not 1 <= len(str(choice.get("name", ""))) <= 100:
            raise DiscordError(400, 50035, "Invalid Form Body: data.choices.name: Must be between 1 and 100 in length.")
    return choices


def checked_modal(data: dict[str, Any]) -> dict[str, Any]:
    if not data.get("custom_id") or not 1 <= len(data.get("title") or "") <= 45:
        raise DiscordError(400, 50035, "Invalid Form Body: data.title: Must be between 1 and 45 in length.")
    if not 1 <= len(data.get("components") or []) <= 5:
        raise DiscordError(400, 50035, "Invalid Form Body: data.components: Must be between 1 and 5 in length.")
    return data


def checked_allowed_mentions(allowed: Any) -> dict[str, Any] | None:
    """``allowed_mentions`` as Discord validates it: known parse types, and no type both parsed and listed."""
    if allowed is None:
        return None
    if not isinstance(allowed, dict):
        raise DiscordError(400, 50035, "Invalid Form Body: allowed_mentions: Must be an object.")
    parse = allowed.get("parse") or []
    if not set(parse) <= {"everyone", "roles", "users"}:
        raise DiscordError(400, 50035, f"Invalid Form Body: allowed_mentions.parse: Value(s) {parse} are not valid.")
    for kind in ("users", "roles"):
        if kind in parse and allowed.get(kind):
            raise DiscordError(
                400, 50035, f'Invalid Form Body: allowed_mentions: parse:["{kind}"] and {kind}: [ids...] are exclusive.'
            )
        if len(allowed.get(kind) or []) > 100:
            raise DiscordError(400, 50035, f"Invalid Form Body: allowed_mentions.{kind}: Must be 100 or fewer.")
    return allowed
