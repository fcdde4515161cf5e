"""The stand-in's gateway: Hello, Identify, Ready, Guild Create, heartbeats, Resume with replay.

Sessions outlive their websocket, as Discord's do: events dispatched while the bot is
disconnected are kept and replayed when it resumes with its last sequence number. A connection
that sends no heartbeat within ``heartbeat_timeout`` is closed with 4009 (session timed out), and
a session that ended so cannot be resumed: RESUME is answered with op 9, ``d: false``, and the bot
must identify anew. Tests can also ask for a reconnect (op 7), or make a connection a zombie:
``go_silent`` (Discord stops answering, ACKs included) or ``go_deaf`` (the bot's heartbeats are lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

HELLO, HEARTBEAT, IDENTIFY, RESUME, RECONNECT, INVALID_SESSION, HEARTBEAT_ACK, DISPATCH = 10, 1, 2, 6, 7, 9, 11, 0
AUTHENTICATION_FAILED = 4004
INVALID_SEQUENCE = 4007
SESSION_TIMED_OUT = 4009
INVALID_SHARD = 4010
# Close codes after which Discord's docs say to start a new session: a RESUME is refused.
SESSION_ENDING = (INVALID_SEQUENCE, SESSION_TIMED_OUT)


class _Transport:
    """One websocket, with zlib-stream transport compression when the client asks for it.

    discord.py asks for zstd-stream instead when ``zstandard`` is installed; the project does not
    install it, and such a connection is refused so the difference cannot go unnoticed.
    ``silent``: nothing reaches the client any more; ``deaf``: its heartbeats no longer reach the stand-in.
    """

    def __init__(self, ws: web.WebSocketResponse, compress: str | None, number: int, heartbeat_timeout: float) -> None:
        self.ws = ws
        self.number = number  # connections are numbered from 1, in the order they open
        self.heartbeat_timeout = heartbeat_timeout  # as the gateway's was when its HELLO was sent
        self._zlib = zlib.compressobj() if compress == "zlib-stream" else None
        self.silent = False
        self.deaf = False
        self.last_heartbeat = time.monotonic()  # or the HELLO, before the first one
        self.session: Session | None = None

    async def send(self, message: dict[str, Any]) -> None:
        """Send, unless the connection is already closing: as on Discord, a dispatch kept in its
        session's events then reaches the bot when it resumes."""
        if self.silent or self.ws.closed:
            return
        text = json.dumps(message)
        try:
            if self._zlib is not None:
                await self.ws.send_bytes(self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH))
            else:
                await self.ws.send_str(text)
        except ConnectionResetError:  # closed while the frame was written (aiohttp's error is one)
            return


@dataclass
class Session:
    id: str
    intents: int
    sequence: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    transport: _Transport | None = None
    identified: asyncio.Event = field(default_factory=asyncio.Event)
    shard: tuple[int, int] = (0, 1)  # [shard_id, num_shards] from Identify
    ended: bool = False  # timed out (or closed with another code that ends it): it cannot be resumed
    ready_on: int = 0  # the number of the connection that last got its READY or RESUMED

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
    def __init__(self, owner: Any, heartbeat_interval_ms: int = 41_250, heartbeat_timeout: float | None = None) -> None:
        self.discord = owner
        # What HELLO tells new connections, and how long (seconds) one may go without a heartbeat; by
        # default the interval and half as much again, for the client's jitter and latency. Changes
        # apply to connections opened afterwards (``reconnect`` makes a client open one).
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_timeout = heartbeat_timeout if heartbeat_timeout is not None else heartbeat_interval_ms * 1.5e-3
        self.sessions: dict[str, Session] = {}
        self.connections = 0
        self.resumes = 0
        self.refused_resumes = 0  # RESUMEs answered with INVALID_SESSION
        self.compressions: list[str | None] = []
        self._live: list[_Transport] = []

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
        """The newest session of the shard that holds the guild, connected ones first; ended ones last."""
        alive = [s for s in self.sessions.values() if not s.ended] or list(self.sessions.values())
        sessions = [s for s in alive if s.covers(guild_id)] or alive
        connected = [s for s in sessions if s.transport is not None]
        return connected[-1] if connected else sessions[-1]

    async def wait_for_session(self, timeout: float = 60) -> Session:
        async with asyncio.timeout(timeout):
            while not self.sessions or not self.session.identified.is_set():
                await asyncio.sleep(0.02)
        return self.session

    async def wait_for_reconnect(self, since: int, resumed: Session | None = None, timeout: float = 60) -> Session:
        """The session identified or resumed on a connection numbered above ``since`` (take ``connections``
        before the disruption), or ``resumed`` once it is: from then on it receives events again."""
        async with asyncio.timeout(timeout):
            while True:
                candidates = [resumed] if resumed is not None else list(self.sessions.values())
                ready = [s for s in candidates if not s.ended and s.ready_on > since]
                if ready:
                    return ready[-1]
                await asyncio.sleep(0.02)

    async def dispatch(self, event: str, data: dict[str, Any], guild_id: int | None = None) -> None:
        """To every session that has not ended, or only to those of the guild's shard."""
        for session in self.sessions.values():
            if not session.ended and (guild_id is None or session.covers(guild_id)):
                await session.dispatch(event, data)

    async def drop(self, code: int = 4000) -> None:
        """Close every live socket the way a network failure or a Discord restart does; a code that
        ends sessions (4009: timed out) ends theirs."""
        for session in self.sessions.values():
            if session.transport is not None:
                session.ended = session.ended or code in SESSION_ENDING
                await session.transport.ws.close(code=code, message=b"dropped by the test")
                session.transport = None

    async def reconnect(self) -> None:
        """Op 7 RECONNECT on every live connection, as Discord sends before it moves a session."""
        for transport in list(self._live):
            await transport.send({"op": RECONNECT, "d": None})

    def go_silent(self) -> int:
        """Every live connection becomes a zombie: it stays open but nothing reaches the client any more,
        heartbeat ACKs included (events are kept for a resume). Returns how many there were."""
        for transport in self._live:
            transport.silent = True
        return len(self._live)

    def go_deaf(self) -> int:
        """The clients' heartbeats on every live connection are lost on the way, so the stand-in closes
        each when its heartbeat timeout has passed. Returns how many there were."""
        for transport in self._live:
            transport.deaf = True
        return len(self._live)

    async def _watch_heartbeats(self, transport: _Transport) -> None:
        """Discord's side: a connection without a heartbeat for ``heartbeat_timeout`` is closed, its session ended."""
        while not transport.ws.closed:
            overdue = time.monotonic() - transport.last_heartbeat - transport.heartbeat_timeout
            if overdue >= 0:
                session = transport.session
                if session is not None and session.transport is transport:  # not resumed elsewhere since
                    session.ended = True
                await transport.ws.close(code=SESSION_TIMED_OUT, message=b"Session timed out.")
                return
            await asyncio.sleep(min(-overdue, 0.5))

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
        self.connections += 1
        transport = _Transport(ws, compress, self.connections, self.heartbeat_timeout)
        await transport.send({"op": HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
        self._live.append(transport)
        watchdog = asyncio.create_task(self._watch_heartbeats(transport))
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    continue
                payload = json.loads(message.data)
                op, data = payload.get("op"), payload.get("d")
                if op == HEARTBEAT and not transport.deaf:
                    transport.last_heartbeat = time.monotonic()
                    await transport.send({"op": HEARTBEAT_ACK})
                elif op == IDENTIFY:
                    transport.session = await self._identify(transport, data)
                elif op == RESUME:
                    transport.session = await self._resume(transport, data)
                if ws.closed:
                    break
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
            self._live.remove(transport)
        session = transport.session
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
        session.ready_on = transport.number
        session.identified.set()
        return session

    async def _resume(self, transport: _Transport, data: dict[str, Any]) -> Session | None:
        """The session's missed events, then RESUMED; an unknown or ended session gets op 9, ``d: false``."""
        session = self.sessions.get(data.get("session_id", ""))
        if session is None or session.ended or data.get("token") != self.discord.token:
            self.refused_resumes += 1
            await transport.send({"op": INVALID_SESSION, "d": False})
            return None
        self.resumes += 1
        session.transport = transport
        for event in session.events:
            if event["s"] > int(data.get("seq") or 0):
                await transport.send(event)
        await session.dispatch("RESUMED", {})
        session.ready_on = transport.number
        return session
