"""A local stand-in for Discord's REST API (v10), on 127.0.0.1, that the real bot talks to.

It keeps what a user would see of each interaction and rejects requests the way Discord does
(missing auth, acknowledging after 3 seconds, tokens older than 15 minutes, and anything over
Discord's documented limits), so that a bot bug shows up as a failed test rather than passing
silently. Limit violations are also kept in ``violations``, which the fixtures check after each
test: a bot that swallows the 400 still fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tests.fake_discord.gateway import Gateway
from tests.fake_discord.interactions import InteractionBuilder
from tests.fake_discord.limits import Clock, RateLimiter
from tests.fake_discord.messages import (
    ACK_WINDOW_SECONDS,
    API,
    EPHEMERAL,
    TOKEN_LIFETIME_SECONDS,
    MessageRoutes,
)
from tests.fake_discord.outgoing import check_commands, flatten
from tests.fake_discord.payloads import (
    Attachment,
    Channel,
    Guild,
    Member,
    Role,
    guild_payload,
    snowflake,
    user_payload,
)
from tests.fake_discord.records import DEFAULT_ATTACHMENT_SIZE_LIMIT, DiscordError, InteractionRecord, Message

__all__ = [
    "ACK_WINDOW_SECONDS",
    "API",
    "EPHEMERAL",
    "TOKEN_LIFETIME_SECONDS",
    "FakeDiscord",
    "InteractionRecord",
    "Message",
]

LINK_LIFETIME_SECONDS = 24 * 3600


def premium_tier(attachment_size_limit: int) -> int:
    """The boost level whose upload limit discord.py reads as ``Guild.filesize_limit`` (it has no lower one)."""
    return 3 if attachment_size_limit >= 100 * 1024 * 1024 else 2 if attachment_size_limit >= 50 * 1024 * 1024 else 0


class FakeDiscord(MessageRoutes, InteractionBuilder):
    clock: Clock

    def __init__(self) -> None:
        self.clock = Clock()
        self.limits = RateLimiter(self.clock)
        self.token = "fake-bot-token"
        self.application_id = snowflake()
        self.bot_user_id = self.application_id
        self.owner = Member(snowflake(), "owner")
        self.global_commands: list[dict[str, Any]] = []
        self.guild_commands: dict[int, list[dict[str, Any]]] = {}
        self.guilds: dict[int, Guild] = {}  # guilds the bot is in
        self.departed: dict[int, Guild] = {}  # guilds the bot left or was removed from
        self.recommended_shards = 1  # what GET /gateway/bot recommends
        # What the bot may attach, in bytes: interactions carry it, guilds' boost level follows it.
        self.attachment_size_limit = DEFAULT_ATTACHMENT_SIZE_LIMIT
        self.gateway_bot_asked = 0  # how many times: a bot asks it as it starts to set up
        self.announced: set[int] = set()  # guilds a gateway session has had a GUILD_CREATE for
        self.channel_messages: dict[int, list[Message]] = {}
        self.channel_changed = asyncio.Event()
        self.attachments: dict[int, Attachment] = {}
        # CDN faults a test injects, by attachment id: seconds before the download starts (a delay, or a
        # stall that never answers), a status (404, 403, 5xx), or a body cut off halfway that never ends.
        # Links also expire as Discord's do: see ``expire``.
        self.cdn_delays: dict[int, float] = {}
        self.cdn_statuses: dict[int, int] = {}
        self.cdn_stalls: set[int] = set()
        self._cdn_key = secrets.token_bytes(16)
        # What the bot sent that Discord refuses for breaking its documented limits (see ``outgoing``).
        self.violations: list[str] = []
        self._stopping = asyncio.Event()
        self.interactions: dict[str, InteractionRecord] = {}
        self.requests: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.gateway = Gateway(self)

    # Lifecycle

    async def start(self) -> str:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        message_bot_routes, interaction_routes = self.message_routes()
        bot_routes = [
            *message_bot_routes,
            web.get(f"{API}/users/@me", self._current_user),
            web.get(f"{API}/gateway/bot", self._gateway_bot),
            web.get(f"{API}/oauth2/applications/@me", self._application),
            web.put(f"{API}/applications/{{app}}/commands", self._sync_global),
            web.put(f"{API}/applications/{{app}}/guilds/{{guild}}/commands", self._sync_guild),
            web.get(f"{API}/guilds/{{guild}}", self._guild),
        ]
        open_routes = [
            *interaction_routes,
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
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        route = request.match_info.route.resource
        canonical = route.canonical if route is not None else request.path
        needs_auth = canonical in self._bot_paths
        if needs_auth and request.headers.get("Authorization") != f"Bot {self.token}":
            return self._json(DiscordError(401, 0, "401: Unauthorized").body(), 401)
        info = request.match_info
        major = info.get("token") or info.get("guild") or info.get("channel_id") or ""
        bucket = f"{request.method} {canonical} {major}"
        refusal = self.limits.check(request, bucket)
        if refusal is not None:
            return refusal
        try:
            response = await handler(request)
        except DiscordError as error:
            if error.broke_limits:
                problems = flatten(error.errors or {}) or [error.message]
                self.violations.append(f"{request.method} {canonical} ({error.code}): " + "; ".join(problems))
            response = self._json(error.body(), error.status)
        if isinstance(response, web.Response):
            response.headers.update(self.limits.headers(bucket))
        return response

    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        # Exactly application/json: discord.py parses only that (aiohttp's json_response adds a charset).
        return web.Response(status=status, body=json.dumps(data), headers={"Content-Type": "application/json"})

    # Test API

    def take_violations(self) -> list[str]:
        """The limit violations recorded since last asked, forgotten so that the next test starts clean."""
        found, self.violations = self.violations, []
        return found

    def check_violations(self, when: str = "") -> None:
        """Fail if the bot sent anything Discord refuses, even if it caught the 400 it was answered."""
        found = self.take_violations()
        if found:
            raise AssertionError(f"the bot sent what Discord refuses{when}:\n" + "\n".join(found))

    def add_guild(self, name: str = "Test Server") -> Guild:
        """A guild with one channel and its owner; the bot hears of it when a session next identifies."""
        guild = Guild(snowflake(), name, self.owner.id)
        guild.channels.append(Channel(snowflake(), guild.id))
        guild.members[self.owner.id] = Member(self.owner.id, "owner", permissions=(1 << 3))  # administrator
        self.guilds[guild.id] = guild
        return guild

    async def join(self, name: str = "Test Server") -> Guild:
        """A guild that adds the bot while it is connected (GUILD_CREATE on the live session)."""
        guild = self.add_guild(name)
        await self.add_bot(guild)
        return guild

    async def add_bot(self, guild: Guild) -> None:
        """The bot (re-)added to ``guild``: GUILD_CREATE on every session."""
        self.departed.pop(guild.id, None)
        self.guilds[guild.id] = guild
        self.announced.add(guild.id)
        await self.gateway.dispatch("GUILD_CREATE", self.guild_payload(guild), guild.id)

    async def remove_bot(self, guild: Guild) -> None:
        """The bot kicked from ``guild`` (or leaving it): GUILD_DELETE without ``unavailable``.

        Discord forgets the bot's guild commands there; the guild's channels answer Missing Access.
        """
        self.guilds.pop(guild.id, None)
        self.departed[guild.id] = guild
        self.guild_commands.pop(guild.id, None)
        if guild.id in self.announced:
            self.announced.discard(guild.id)
            await self.gateway.dispatch("GUILD_DELETE", {"id": str(guild.id)}, guild.id)

    async def _guild_event(self, guild: Guild, event: str, data: dict[str, Any]) -> None:
        """Dispatch ``event`` if the bot has heard of ``guild``; otherwise its next GUILD_CREATE carries it."""
        if guild.id in self.announced and guild.id in self.guilds:
            await self.gateway.dispatch(event, data, guild.id)

    async def add_channel(self, guild: Guild, name: str, nsfw: bool = False) -> Channel:
        """A new text channel; CHANNEL_CREATE when the bot already knows the guild."""
        channel = Channel(snowflake(), guild.id, name, nsfw=nsfw, position=len(guild.channels))
        guild.channels.append(channel)
        await self._guild_event(guild, "CHANNEL_CREATE", channel.payload())
        return channel

    async def add_role(self, guild: Guild, name: str, permissions: int = 0) -> Role:
        """A new role; GUILD_ROLE_CREATE when the bot already knows the guild. Give it via ``member.roles``."""
        role = Role(snowflake(), name, permissions, position=len(guild.roles) + 1)
        guild.roles.append(role)
        await self._guild_event(guild, "GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": role.payload()})
        return role

    async def remove_role(self, guild: Guild, role: Role) -> None:
        """A role deleted: GUILD_ROLE_DELETE, and no member has it any more."""
        guild.roles.remove(role)
        for member in guild.members.values():
            if role.id in member.roles:
                member.roles.remove(role.id)
        await self._guild_event(guild, "GUILD_ROLE_DELETE", {"guild_id": str(guild.id), "role_id": str(role.id)})

    async def remove_channel(self, guild: Guild, channel: Channel) -> None:
        """A channel deleted: CHANNEL_DELETE with its last state."""
        guild.channels.remove(channel)
        await self._guild_event(guild, "CHANNEL_DELETE", channel.payload())

    def bot_user(self) -> dict[str, Any]:
        return user_payload(self.bot_user_id, "flamingo", bot=True) | {"verified": True, "flags": 0}

    def guild_payload(self, guild: Guild) -> dict[str, Any]:
        bot_member = Member(self.bot_user_id, "flamingo").payload() | {"user": self.bot_user()}
        return guild_payload(guild, bot_member, premium_tier(self.attachment_size_limit))

    async def send_interaction(self, payload: dict[str, Any]) -> InteractionRecord:
        """Deliver an interaction over the gateway, as Discord does when a user runs a command.

        One session gets it: of the shard that holds the guild, the newest connected one (tests may
        keep several bot processes connected, and one interaction must reach one bot).
        """
        guild_id = int(payload["guild_id"]) if "guild_id" in payload else None
        await self.gateway.session_for(guild_id).dispatch("INTERACTION_CREATE", payload)
        return self.record(payload)

    def add_member(self, guild: Guild, name: str, permissions: int | None = None) -> Member:
        member = Member(snowflake(), name) if permissions is None else Member(snowflake(), name, permissions)
        guild.members[member.id] = member
        return member

    def upload(self, filename: str, data: bytes, content_type: str | None = "image/png") -> Attachment:
        """A user's upload, with a signed CDN link valid for a day (as Discord's are)."""
        attachment_id = snowflake()
        attachment = Attachment(attachment_id, filename, data, content_type, "")
        attachment.url = self._signed_url(attachment, self.clock.wall() + LINK_LIFETIME_SECONDS)
        self.attachments[attachment_id] = attachment
        return attachment

    def expire(self, attachment: Attachment) -> None:
        """The upload's link expires: payloads built from now on carry a link whose ``ex`` has passed."""
        attachment.url = self._signed_url(attachment, self.clock.wall() - 1)

    def _signed_url(self, attachment: Attachment, expires: float) -> str:
        """``ex`` (expiry) and ``is`` (issue) are hexadecimal Unix times; ``hm`` signs them with the link."""
        ex, issued = f"{int(expires):x}", f"{int(self.clock.wall()):x}"
        path = f"/cdn/attachments/{attachment.id}/{attachment.filename}"
        return f"{self.base_url}{path}?ex={ex}&is={issued}&hm={self._signature(path, ex, issued)}&"

    def _signature(self, path: str, ex: str, issued: str) -> str:
        return hmac.new(self._cdn_key, f"{path}:{ex}:{issued}".encode(), hashlib.sha256).hexdigest()

    # Bot routes

    async def _current_user(self, request: web.Request) -> web.Response:
        return self._json(self.bot_user())

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        self.gateway_bot_asked += 1
        return self._json(
            {
                "url": self.gateway.url,
                "shards": self.recommended_shards,
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
        check_commands(commands)
        app_id = str(self.application_id)
        # Discord echoes commands with its defaults filled in (context menus get an empty description).
        defaults = {"type": 1, "description": "", "options": [], "default_member_permissions": None, "nsfw": False}
        return [defaults | c | {"id": str(snowflake()), "application_id": app_id, "version": "1"} for c in commands]

    async def _sync_global(self, request: web.Request) -> web.Response:
        self.global_commands = self._registered(request, await request.json())
        return self._json(self.global_commands)

    def _joined(self, request: web.Request) -> Guild:
        """The guild in the path, which the bot must be in (else Missing Access, as Discord answers)."""
        guild = self.guilds.get(int(request.match_info["guild"]))
        if guild is None:
            raise DiscordError(403, 50001, "Missing Access")
        return guild

    async def _guild(self, request: web.Request) -> web.Response:
        return self._json(self.guild_payload(self._joined(request)))

    async def _sync_guild(self, request: web.Request) -> web.Response:
        guild_id = self._joined(request).id
        self.guild_commands[guild_id] = [
            c | {"guild_id": str(guild_id)} for c in self._registered(request, await request.json())
        ]
        return self._json(self.guild_commands[guild_id])

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        """An upload's bytes; a deleted one, or a link expired or not signed, is 404, as on Discord's CDN."""
        attachment_id = int(request.match_info["id"])
        with contextlib.suppress(TimeoutError):  # a stall ends when the stand-in stops
            await asyncio.wait_for(self._stopping.wait(), self.cdn_delays.get(attachment_id, 0))
        attachment = self.attachments.get(attachment_id)
        query = request.query
        ex, issued = query.get("ex", ""), query.get("is", "")
        signed = hmac.compare_digest(query.get("hm", ""), self._signature(request.path, ex, issued))
        if attachment is None or not signed or int(ex, 16) <= self.clock.wall():
            return web.Response(status=404, text="This content is no longer available.")
        if attachment_id in self.cdn_statuses:
            raise DiscordError(self.cdn_statuses[attachment_id], 0, "CDN failure")
        content_type = attachment.content_type or "application/octet-stream"
        if attachment_id not in self.cdn_stalls:
            return web.Response(body=attachment.data, content_type=content_type)
        response = web.StreamResponse(
            headers={"Content-Type": content_type, "Content-Length": str(len(attachment.data))}
        )
        await response.prepare(request)
        await response.write(attachment.data[: len(attachment.data) // 2])
        await self._stopping.wait()  # the rest never comes
        return response
