"""A local stand-in for Discord's REST API (v10), on 127.0.0.1, that the real bot talks to.

It keeps what a user would see of each interaction and rejects requests the way Discord does
(missing auth, oversized messages, acknowledging after 3 seconds, tokens older than 15 minutes),
so that a bot bug shows up as a failed test rather than passing silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fake_discord.gateway import Gateway
from tests.fake_discord.interactions import InteractionBuilder
from tests.fake_discord.limits import Clock, RateLimiter
from tests.fake_discord.payloads import (
    Attachment,
    Channel,
    Guild,
    Member,
    guild_payload,
    snowflake,
    user_payload,
)
from tests.fake_discord.records import (
    DiscordError,
    InteractionRecord,
    Message,
    check_limits,
    checked_choices,
    checked_modal,
)

API = "/api/v10"
EPHEMERAL = 1 << 6
ACK_WINDOW_SECONDS = 3.0
TOKEN_LIFETIME_SECONDS = 15 * 60


class FakeDiscord(InteractionBuilder):
    def __init__(self) -> None:
        self.clock = Clock()
        self.limits = RateLimiter(self.clock)
        self.token = "fake-bot-token"
        self.application_id = snowflake()
        self.bot_user_id = self.application_id
        self.owner = Member(snowflake(), "owner")
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.guilds: dict[int, Guild] = {}
        self.attachments: dict[int, Attachment] = {}
        self.interactions: dict[str, InteractionRecord] = {}
        self.requests: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.gateway = Gateway(self)

    # Lifecycle

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        bot_routes = [
            web.get(f"{API}/users/@me", self._current_user),
            web.get(f"{API}/gateway/bot", self._gateway_bot),
            web.get(f"{API}/oauth2/applications/@me", self._application),
            web.put(f"{API}/applications/{{app}}/commands", self._sync_global),
            web.put(f"{API}/applications/{{app}}/guilds/{{guild}}/commands", self._sync_guild),
        ]
        open_routes = [
            web.post(f"{API}/interactions/{{id}}/{{token}}/callback", self._callback),
            web.patch(f"{API}/webhooks/{{app}}/{{token}}/messages/@original", self._edit_original),
            web.delete(f"{API}/webhooks/{{app}}/{{token}}/messages/@original", self._delete_original),
            web.post(f"{API}/webhooks/{{app}}/{{token}}", self._followup),
            web.get("/cdn/attachments/{id}/{filename}", self._cdn),
            web.get(f"{API}/gateway", self._gateway_url),
            web.get("/gateway", self.gateway.handle),
        ]
        app.add_routes(bot_routes + open_routes)
        self._bot_paths = {route.path for route in bot_routes}
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"
        return f"{self.base_url}{API}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        route = request.match_info.route.resource
        canonical = route.canonical if route is not None else request.path
        needs_auth = canonical in self._bot_paths
        if needs_auth and request.headers.get("Authorization") != f"Bot {self.token}":
            return self._error(401, 0, "401: Unauthorized")
        major = request.match_info.get("token") or request.match_info.get("guild") or ""
        bucket = f"{request.method} {canonical} {major}"
        refusal = self.limits.check(request, bucket)
        if refusal is not None:
            return refusal
        try:
            response = await handler(request)
        except DiscordError as error:
            response = self._error(error.status, error.code, error.message)
        if isinstance(response, web.Response):
            response.headers.update(self.limits.headers(bucket))
        return response

    @staticmethod
    def _error(status: int, code: int, message: str) -> web.Response:
        body = json.dumps({"message": message, "code": code})
        return web.Response(status=status, body=body, content_type="application/json")

    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        # Exactly application/json: discord.py parses only that (aiohttp's json_response adds a charset).
        return web.Response(status=status, body=json.dumps(data), headers={"Content-Type": "application/json"})

    # Test API

    def add_guild(self, name: str = "Test Server") -> Guild:
        guild = Guild(snowflake(), name, self.owner.id)
        guild.channels.append(Channel(snowflake(), guild.id))
        guild.members[self.owner.id] = Member(self.owner.id, "owner", permissions=(1 << 3))  # administrator
        self.guilds[guild.id] = guild
        return guild

    async def join(self, name: str = "Test Server") -> Guild:
        """A guild that adds the bot while it is connected (GUILD_CREATE on the live session)."""
        guild = self.add_guild(name)
        await self.gateway.dispatch("GUILD_CREATE", self.guild_payload(guild))
        return guild

    def bot_user(self) -> dict[str, Any]:
        return user_payload(self.bot_user_id, "flamingo", bot=True) | {"verified": True, "flags": 0}

    def guild_payload(self, guild: Guild) -> dict[str, Any]:
        bot_member = Member(self.bot_user_id, "flamingo").payload() | {"user": self.bot_user()}
        return guild_payload(guild, bot_member)

    async def send_interaction(self, payload: dict[str, Any]) -> InteractionRecord:
        """Deliver an interaction over the gateway, as Discord does when a user runs a command.

        One session gets it, the newest connected one: tests may keep several bot processes
        connected, and one interaction must reach one bot.
        """
        await self.gateway.live_session.dispatch("INTERACTION_CREATE", payload)
        return self.record(payload)

    def add_member(self, guild: Guild, name: str, permissions: int | None = None) -> Member:
        member = Member(snowflake(), name) if permissions is None else Member(snowflake(), name, permissions)
        guild.members[member.id] = member
        return member

    def upload(self, filename: str, data: bytes, content_type: str | None = "image/png") -> Attachment:
        attachment_id = snowflake()
        url = f"{self.base_url}/cdn/attachments/{attachment_id}/{filename}"
        attachment = Attachment(attachment_id, filename, data, content_type, url)
        self.attachments[attachment_id] = attachment
        return attachment

    # Bot routes

    async def _current_user(self, request: web.Request) -> web.Response:
        return self._json(self.bot_user())

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        return self._json(
            {
                "url": self.gateway.url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 86_400_000,
                    "max_concurrency": 1,
                },
            }
        )

    async def _gateway_url(self, request: web.Request) -> web.Response:
        return self._json({"url": self.gateway.url})

    async def _application(self, request: web.Request) -> web.Response:
        return self._json(
            {
                "id": str(self.application_id),
                "name": "flamingo",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "0" * 64,
                "flags": 0,
                "owner": user_payload(self.owner.id, self.owner.name),
                "team": None,
            }
        )

    def _registered(self, request: web.Request, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if request.match_info["app"] != str(self.application_id):
            raise DiscordError(403, 50001, "Missing Access")
        app_id = str(self.application_id)
        # Discord echoes commands with its defaults filled in (context menus get an empty description).
        defaults = {"type": 1, "description": "", "options": [], "default_member_permissions": None, "nsfw": False}
        return [defaults | c | {"id": str(snowflake()), "application_id": app_id, "version": "1"} for c in commands]

    async def _sync_global(self, request: web.Request) -> web.Response:
        self.global_commands = self._registered(request, await request.json())
        return self._json(self.global_commands)

    async def _sync_guild(self, request: web.Request) -> web.Response:
        guild_id = int(request.match_info["guild"])
        self.guild_commands[guild_id] = [
            c | {"guild_id": str(guild_id)} for c in self._registered(request, await request.json())
        ]
        return self._json(self.guild_commands[guild_id])

    # Interaction routes (no bot auth: the interaction token is the credential)

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

    def message_json(self, message: Message) -> dict[str, Any]:
        return {
            "id": str(message.id),
            "type": 20,
            "channel_id": str(snowflake()),
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
        }

    @staticmethod
    def _apply(message: Message, payload: dict[str, Any], files: dict[str, bytes]) -> None:
        check_limits(payload | {"content": payload.get("content", message.content)}, files or message.files)
        if "content" in payload:
            message.content = payload["content"] or ""
        if "embeds" in payload:
            message.embeds = payload["embeds"] or []
        if "components" in payload:
            message.components = payload["components"] or []
        if "attachments" in payload or files:
            message.files = files
        message.loading = False

    async def _callback(self, request: web.Request) -> web.Response:
        record = self._interaction(request.match_info["token"], acknowledging=True)
        if record.original is not None:
            raise DiscordError(400, 40060, "Interaction has already been acknowledged.")
        body, files = await self._message_body(request)
        kind, data = body["type"], body.get("data") or {}
        message = Message(snowflake(), ephemeral=bool(int(data.get("flags") or 0) & EPHEMERAL))
        if kind == 4:
            self._apply(message, data, files)
        elif kind == 5:
            message.loading = True
        elif kind in (6, 7) and record.target is not None:
            message = record.target
            if kind == 7:
                self._apply(message, data, files)
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
        return self._json(response)

    async def _edit_original(self, request: web.Request) -> web.Response:
        record = self._interaction(request.match_info["token"])
        if record.original is None or record.original.deleted:
            raise DiscordError(404, 10008, "Unknown Message")
        body, files = await self._message_body(request)
        self._apply(record.original, body, files)
        record.changed.set()
        return self._json(self.message_json(record.original))

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
            self._apply(original, body, files)
            message = original
        else:
            message = Message(snowflake(), ephemeral=bool(int(body.get("flags") or 0) & EPHEMERAL))
            self._apply(message, body, files)
            record.followups.append(message)
        record.changed.set()
        return self._json(self.message_json(message))

    async def _cdn(self, request: web.Request) -> web.Response:
        attachment = self.attachments.get(int(request.match_info["id"]))
        if attachment is None:
            raise DiscordError(404, 0, "Not Found")
        return web.Response(body=attachment.data, content_type=attachment.content_type or "application/octet-stream")
