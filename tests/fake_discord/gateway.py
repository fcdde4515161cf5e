"""The stand-in's gateway: Hello, Identify, Ready, Guild Create, heartbeats, Resume with replay.

Sessions outlive their websocket, as Discord's do: events dispatched while the bot is
disconnected are kept and replayed when it resumes with its last sequence number.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

HELLO, HEARTBEAT, IDENTIFY, RESUME, RECONNECT, INVALID_SESSION, HEARTBEAT_ACK, DISPATCH = 10, 1, 2, 6, 7, 9, 11, 0
AUTHENTICATION_FAILED = 4004
INVALID_SHARD = 4010


class _Transport:
    """One websocket, with zlib-stream transport compression when the client asks for it.

    discord.py asks for zstd-stream instead when ``zstandard`` is installed; the project does not
    install it, and such a connection is refused so the difference cannot go unnoticed.
    """

    def __init__(self, ws: web.WebSocketResponse, compress: str | None) -> None:
        self.ws = ws
        self._zlib = zlib.compressobj() if compress == "zlib-stream" else None

    async def send(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        if self._zlib is not None:
            await self.ws.send_bytes(self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH))
        else:
            await self.ws.send_str(text)


@dataclass
class Session:
    id: str
    intents: int
    sequence: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    transport: _Transport | None = None
    identified: asyncio.Event = field(default_factory=asyncio.Event)
    shard: tuple[int, int] = (0, 1)  # [shard_id, num_shards] from Identify

    def covers(self, guild_id: int | None) -> bool:
        """Discord's rule: a guild belongs to shard (guild_id >> 22) % num_shards; DMs to shard 0."""
        shard_id, count = self.shard
        return (0 if guild_id is None else (guild_id >> 22) % count) == shard_id

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        self.sequence += 1
        message = {"op": DISPATCH, "t": event, "s": self.sequence, "d": data}
        self.events.append(message)
        if self.transport is not None and not self.transport.ws.closed:
            await self.transport.send(message)


class Gateway:
    def __init__(self, owner: Any, heartbeat_interval_ms: int = 41_250) -> None:
        self.discord = owner
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.sessions: dict[str, Session] = {}
        self.connections = 0
        self.resumes = 0
        self.compressions: list[str | None] = []

    @property
    def url(self) -> str:
        return self.discord.base_url.replace("http://", "ws://") + "/gateway"

    @property
    def session(self) -> Session:
        """The newest session (a bot without shards has one)."""
        return list(self.sessions.values())[-1]

    @property
    def live_session(self) -> Session:
        """The newest connected session, else the newest (it gets the events when it resumes)."""
        return self.session_for(None)

    def session_for(self, guild_id: int | None) -> Session:
        """The newest session of the shard that holds the guild, connected ones first."""
        sessions = [s for s in self.sessions.values() if s.covers(guild_id)] or list(self.sessions.values())
        connected = [s for s in sessions if s.transport is not None]
        return connected[-1] if connected else sessions[-1]

    async def wait_for_session(self, timeout: float = 60) -> Session:
        async with asyncio.timeout(timeout):
            while not self.sessions or not self.session.identified.is_set():
                await asyncio.sleep(0.02)
        return self.session

    async def dispatch(self, event: str, data: dict[str, Any], guild_id: int | None = None) -> None:
        """To every session, or only to those of the guild's shard."""
        for session in self.sessions.values():
            if guild_id is None or session.covers(guild_id):
                await session.dispatch(event, data)

    async def drop(self, code: int = 4000) -> None:
        """Close every live socket the way a network failure or a Discord restart does."""
        for session in self.sessions.values():
            if session.transport is not None:
                await session.transport.ws.close(code=code, message=b"dropped by the test")
                session.transport = None

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        if request.query.get("v") != "10" or request.query.get("encoding", "json") != "json":
            await ws.close(code=4012, message=b"Invalid API version")
            return ws
        compress = request.query.get("compress")
        self.compressions.append(compress)
        if compress not in (None, "zlib-stream"):
            await ws.close(code=4000, message=b"unsupported transport compression in the stand-in")
            return ws
        transport = _Transport(ws, compress)
        self.connections += 1
        await transport.send({"op": HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
        session: Session | None = None
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            payload = json.loads(message.data)
            op, data = payload.get("op"), payload.get("d")
            if op == HEARTBEAT:
                await transport.send({"op": HEARTBEAT_ACK})
            elif op == IDENTIFY:
                session = await self._identify(transport, data)
            elif op == RESUME:
                session = await self._resume(transport, data)
            if ws.closed:
                break
        if session is not None and session.transport is transport:
            session.transport = None
        return ws

    async def _identify(self, transport: _Transport, data: dict[str, Any]) -> Session | None:
        if data.get("token") != self.discord.token:
            await transport.ws.close(code=AUTHENTICATION_FAILED, message=b"Authentication failed.")
            return None
        shard = tuple(data.get("shard") or (0, 1))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            await transport.ws.close(code=INVALID_SHARD, message=b"Invalid shard.")
            return None
        session = Session(secrets.token_hex(16), int(data.get("intents", 0)), transport=transport, shard=shard)
        self.sessions[session.id] = session
        guilds = [guild for guild in self.discord.guilds.values() if session.covers(guild.id)]
        await session.dispatch(
            "READY",
            {
                "v": 10,
                "user": self.discord.bot_user(),
                "guilds": [{"id": str(g.id), "unavailable": True} for g in guilds],
                "session_id": session.id,
                "resume_gateway_url": self.url,
                "application": {"id": str(self.discord.application_id), "flags": 0},
                "private_channels": [],
                "relationships": [],
                "shard": list(shard),
            },
        )
        for guild in guilds:
            self.discord.announced.add(guild.id)
            await session.dispatch("GUILD_CREATE", self.discord.guild_payload(guild))
        session.identified.set()
        return session

    async def _resume(self, transport: _Transport, data: dict[str, Any]) -> Session | None:
        session = self.sessions.get(data.get("session_id", ""))
        if session is None or data.get("token") != self.discord.token:
            await transport.send({"op": INVALID_SESSION, "d": False})
            return None
        self.resumes += 1
        session.transport = transport
        for event in session.events:
            if event["s"] > int(data.get("seq") or 0):
                await transport.send(event)
        await session.dispatch("RESUMED", {})
        return session
