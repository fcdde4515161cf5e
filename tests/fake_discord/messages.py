"""Every route through which the bot posts, edits or deletes a message.

Interaction callbacks and the interaction webhook (original response and followups) need no bot
token, the interaction token is the credential; channel messages need the bot token. Each message
remembers its channel and the ``allowed_mentions`` the bot sent with it. Every message the bot
creates or edits is checked against Discord's limits first (see ``outgoing``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fake_discord.outgoing import Path, check_message, check_not_empty, checked_choices, checked_modal
from tests.fake_discord.payloads import Channel, Guild, snowflake, user_payload
from tests.fake_discord.records import DiscordError, InteractionRecord, Message

API = "/api/v10"
EPHEMERAL = 1 << 6
ACK_WINDOW_SECONDS = 3.0
TOKEN_LIFETIME_SECONDS = 15 * 60
DEFAULT_MESSAGE = 0


def _json(data: Any, status: int = 200) -> web.Response:
    # Exactly application/json: discord.py parses only that (aiohttp's json_response adds a charset).
    return web.Response(status=status, body=json.dumps(data), headers={"Content-Type": "application/json"})


def _snowflake(value: str) -> int:
    if not value.isdigit():
        raise DiscordError(400, 50035, f'Invalid Form Body: Value "{value}" is not snowflake.')
    return int(value)


class MessageRoutes:
    """Message routes of the stand-in; ``channel_messages`` holds what the bot posted in each channel."""

    base_url: str
    bot_user_id: int
    clock: Callable[[], float]
    guilds: dict[int, Guild]
    departed: dict[int, Guild]
    interactions: dict[str, InteractionRecord]
    channel_messages: dict[int, list[Message]]
    channel_changed: asyncio.Event
    attachment_size_limit: int

    def message_routes(self) -> tuple[list[web.RouteDef], list[web.RouteDef]]:
        """(routes that need the bot token, routes that need an interaction token)."""
        message = f"{API}/channels/{{channel_id}}/messages/{{message_id}}"
        bot = [
            web.post(f"{API}/channels/{{channel_id}}/messages", self._post_channel_message),
            web.patch(message, self._edit_channel_message),
            web.delete(message, self._delete_channel_message),
        ]
        interaction = [
            web.post(f"{API}/interactions/{{id}}/{{token}}/callback", self._callback),
            web.patch(f"{API}/webhooks/{{app}}/{{token}}/messages/@original", self._edit_original),
            web.delete(f"{API}/webhooks/{{app}}/{{token}}/messages/@original", self._delete_original),
            web.post(f"{API}/webhooks/{{app}}/{{token}}", self._followup),
        ]
        return bot, interaction

    # Test API

    async def wait_for_channel_messages(self, channel: Channel, count: int = 1, timeout: float = 60) -> list[Message]:
        """Wait until the bot has posted at least ``count`` messages (not deleted) in ``channel``."""

        def posted() -> list[Message]:
            return [m for m in self.channel_messages.get(channel.id, []) if not m.deleted]

        async with asyncio.timeout(timeout):
            while len(posted()) < count:
                self.channel_changed.clear()
                await self.channel_changed.wait()
        return posted()

    def message_json(self, message: Message) -> dict[str, Any]:
        channel_id = message.channel_id if message.channel_id is not None else snowflake()
        return {
            "id": str(message.id),
            "type": message.type,
            "channel_id": str(channel_id),
            "content": message.content,
            "author": user_payload(self.bot_user_id, "flamingo", bot=True),
            "embeds": message.embeds,
            "attachments": [
                {
                    "id": str(snowflake()),
                    "filename": n,
                    "size": len(d),
                    "url": f"{self.base_url}/x/{n}",
                    "proxy_url": f"{self.base_url}/x/{n}",
                }
                for n, d in message.files.items()
            ],
            "components": message.components,
            "flags": EPHEMERAL if message.ephemeral else 0,
            "timestamp": "2026-01-01T00:00:00+00:00",
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "pinned": False,
        } | ({"interaction_metadata": message.interaction_metadata} if message.interaction_metadata else {})

    # Shared by every route

    @staticmethod
    async def _message_body(request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        if not request.content_type.startswith("multipart/"):
            return await request.json(), {}
        payload: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        reader = await request.multipart()
        async for part in reader:
            if part.name == "payload_json":
                payload = json.loads(await part.text())
            else:
                files[part.filename or part.name] = await part.read()
        return payload, files

    @staticmethod
    def _apply(
        message: Message, payload: dict[str, Any], files: dict[str, bytes], size_limit: int, path: Path = ()
    ) -> None:
        """A create or an edit, refused whole (the message unchanged) if it breaks Discord's limits."""
        check_message(path, payload, files, size_limit)
        kept = message.files if "attachments" not in payload and not files else files
        check_not_empty(
            payload["content"] or "" if "content" in payload else message.content,
            payload["embeds"] or [] if "embeds" in payload else message.embeds,
            kept,
            payload["components"] or [] if "components" in payload else message.components,
        )
        if "allowed_mentions" in payload:
            message.allowed_mentions = payload["allowed_mentions"]
        elif "content" in payload:
            message.allowed_mentions = None  # new content under Discord's default: every mention pings
        if "content" in payload:
            message.content = payload["content"] or ""
        if "embeds" in payload:
            message.embeds = payload["embeds"] or []
        if "components" in payload:
            message.components = payload["components"] or []
        if "attachments" in payload or files:
            message.files = files
        message.loading = False

    # Interaction routes

    def _interaction(self, token: str, *, acknowledging: bool = False) -> InteractionRecord:
        record = self.interactions.get(token)
        if record is None:
            raise DiscordError(404, 10062, "Unknown interaction")
        age = self.clock() - record.created
        if acknowledging and age > ACK_WINDOW_SECONDS:
            raise DiscordError(404, 10062, "Unknown interaction")
        if age > TOKEN_LIFETIME_SECONDS:
            raise DiscordError(401, 50027, "Invalid Webhook Token")
        return record

    @staticmethod
    def _new_message(record: InteractionRecord, flags: Any) -> Message:
        ephemeral = bool(int(flags or 0) & EPHEMERAL)
        return Message(
            snowflake(), ephemeral=ephemeral, channel_id=record.channel_id, interaction_metadata=record.metadata
        )

    async def _callback(self, request: web.Request) -> web.Response:
        record = self._interaction(request.match_info["token"], acknowledging=True)
        if record.original is not None:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        body, files = await self._message_body(request)
        kind, data = body["type"], body.get("data") or {}
        message = self._new_message(record, data.get("flags"))
        if kind == 4:
            self._apply(message, data, files, record.attachment_size_limit, ("data",))
        elif kind == 5:
            message.loading = True
        elif kind in (6, 7) and record.target is not None:
            message = record.target
            if kind == 7:
                self._apply(message, data, files, record.attachment_size_limit, ("data",))
                message.edited(self.clock())
        elif kind == 8:
            record.choices = checked_choices(data.get("choices"))
        elif kind == 9:
            record.modal = checked_modal(data)
        else:
            raise DiscordError(400, 50035, f"Invalid Form Body: callback type {kind} does not fit this interaction")
        if kind in (4, 5, 6, 7):
            record.original = message
        record.changed.set()
        response = {
            "interaction": {
                "id": str(record.id),
                "type": 2,
                "response_message_id": str(message.id),
                "response_message_loading": message.loading,
                "response_message_ephemeral": message.ephemeral,
            }
        }
        if request.query.get("with_response") in ("1", "true", "True"):
            response["resource"] = {"type": kind, "message": self.message_json(message)}
        return _json(response)

    async def _edit_original(self, request: web.Request) -> web.Response:
        record = self._interaction(request.match_info["token"])
        if record.original is None or record.original.deleted:
            raise DiscordError(404, 10008, "Unknown Message")
        body, files = await self._message_body(request)
        self._apply(record.original, body, files, record.attachment_size_limit)
        record.original.edited(self.clock())
        record.changed.set()
        return _json(self.message_json(record.original))

    async def _delete_original(self, request: web.Request) -> web.Response:
        record = self._interaction(request.match_info["token"])
        if record.original is None or record.original.deleted:
            raise DiscordError(404, 10008, "Unknown Message")
        record.original.deleted = True
        record.changed.set()
        return web.Response(status=204)

    async def _followup(self, request: web.Request) -> web.Response:
        record = self._interaction(request.match_info["token"])
        if record.original is None:
            raise DiscordError(400, 40060, "The interaction has not been acknowledged.")
        body, files = await self._message_body(request)
        original = record.original
        if original.loading and not original.deleted:
            # The first followup after a deferral replaces the 'thinking' message, keeping its visibility.
            self._apply(original, body, files, record.attachment_size_limit)
            message = original
        else:
            message = self._new_message(record, body.get("flags"))
            self._apply(message, body, files, record.attachment_size_limit)
            record.followups.append(message)
        record.changed.set()
        return _json(self.message_json(message))

    # Channel routes (bot token)

    def _known_channel(self, value: str) -> Channel:
        """A channel of a guild the bot is in; Missing Access for one of a guild it left."""
        channel_id = _snowflake(value)
        for guilds, known in ((self.guilds, True), (self.departed, False)):
            for guild in guilds.values():
                for channel in guild.channels:
                    if channel.id == channel_id:
                        if not known:
                            raise DiscordError(403, 50001, "Missing Access")
                        return channel
        raise DiscordError(404, 10003, "Unknown Channel")

    def _channel_message(self, channel: Channel, value: str) -> tuple[Message, InteractionRecord | None]:
        """A message the bot can see in ``channel``: one it posted there, or a non-ephemeral interaction response."""
        message_id = _snowflake(value)
        for message in self.channel_messages.get(channel.id, []):
            if message.id == message_id and not message.deleted:
                return message, None
        for record in self.interactions.values():
            for message in record.visible:
                if message.id == message_id and message.channel_id == channel.id and not message.ephemeral:
                    return message, record
        raise DiscordError(404, 10008, "Unknown Message")

    async def _post_channel_message(self, request: web.Request) -> web.Response:
        channel = self._known_channel(request.match_info["channel_id"])
        body, files = await self._message_body(request)
        message = Message(snowflake(), channel_id=channel.id, type=DEFAULT_MESSAGE)
        self._apply(message, body, files, self.attachment_size_limit)
        self.channel_messages.setdefault(channel.id, []).append(message)
        self.channel_changed.set()
        return _json(self.message_json(message))

    async def _edit_channel_message(self, request: web.Request) -> web.Response:
        channel = self._known_channel(request.match_info["channel_id"])
        message, record = self._channel_message(channel, request.match_info["message_id"])
        body, files = await self._message_body(request)
        self._apply(message, body, files, self.attachment_size_limit)
        message.edited(self.clock())
        self._changed(record)
        return _json(self.message_json(message))

    async def _delete_channel_message(self, request: web.Request) -> web.Response:
        channel = self._known_channel(request.match_info["channel_id"])
        message, record = self._channel_message(channel, request.match_info["message_id"])
        message.deleted = True
        self._changed(record)
        return web.Response(status=204)

    def _changed(self, record: InteractionRecord | None) -> None:
        if record is not None:
            record.changed.set()
        self.channel_changed.set()
