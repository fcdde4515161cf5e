"""Answered requests, kept so an answer's buttons still work after a restart, then forgotten.

A button's ``custom_id`` holds only a row id; the inputs (prompt, task, parameters, images) live
here. Rows expire after the retention set in config, and a user may delete theirs at any time.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from core.config import StorageSettings
from core.generation import GenerationParams
from core.storage.database import Database, now_text

# Requests deleted per transaction (each with up to four stored images).
DELETE_BATCH = 25


# A request is reached only from the server it was made in; in direct messages, which share one
# place (guild 0), only by the person whose request, or whose picture, it is.
_WHERE_MADE = "id = ? AND guild_id = ? AND (guild_id != 0 OR user_id = ? OR origin_user_id = ?)"


def _where_made(request_id: int, guild_id: int | None, user_id: int) -> tuple[int, int, int, int]:
    return request_id, guild_id or 0, user_id, user_id


@dataclass(frozen=True)
class RequestBudget:
    """Bytes of stored request images, beyond which the oldest requests go before their retention ends.

    ``per_place`` bounds one server's (or one user's direct messages'), so a busy or abusive server
    loses its own oldest buttons first; ``total`` bounds them all, whatever the number of servers.
    """

    total: int
    per_place: int

    @classmethod
    def of(cls, storage: StorageSettings) -> RequestBudget:
        return cls(round(storage.request_images_mb * 2**20), round(storage.request_images_per_server_mb * 2**20))


@dataclass(frozen=True)
class _Place:
    """Where a request counts against its share: its server, or in direct messages the user."""

    guild_id: int
    user_id: int  # 0 for a server

    @classmethod
    def of(cls, guild_id: int, user_id: int) -> _Place:
        return cls(guild_id, 0 if guild_id else user_id)

    @property
    def requests(self) -> tuple[str, tuple[int, ...]]:
        """The SQL condition for its requests, as the indexes serve it."""
        if self.guild_id:
            return "guild_id = ?", (self.guild_id,)
        return "guild_id = 0 AND user_id = ?", (self.user_id,)


@dataclass(frozen=True)
class StoredRequest:
    id: int
    guild_id: int  # 0 outside servers
    channel_id: int
    user_id: int
    task: str
    prompt: str
    params: GenerationParams
    images: tuple[bytes, ...]
    created_at: datetime
    model: str | None = None  # a model the server chose; None: the bot's default
    # Whose images and prompt these are when not the asker's: a re-roll of their answer, or
    # "Describe image" on their message. Theirs to delete too, and /forget-me deletes them.
    origin_user_id: int | None = None

    @property
    def owners(self) -> set[int]:
        return {self.user_id} | ({self.origin_user_id} if self.origin_user_id is not None else set())


class RequestStore(Database):
    async def save_request(
        self,
        guild_id: int | None,
        channel_id: int,
        user_id: int,
        task: str,
        prompt: str,
        params: GenerationParams,
        images: Sequence[bytes],
        model: str | None = None,
        origin_user_id: int | None = None,
        *,
        budget: RequestBudget,
    ) -> int:
        """Store a request, then make room within ``budget``: at most a batch of the oldest go here,
        so a lowered budget never holds the database for long; ``purge`` deletes the rest."""
        params_json = json.dumps(params.as_dict())
        origin = None if origin_user_id == user_id else origin_user_id
        guild_id = guild_id or 0
        async with self._transaction() as db:
            request_id = await self._int("SELECT last_id + 1 FROM request_counters")
            await db.execute(
                """INSERT INTO requests (id, guild_id, channel_id, user_id, task, prompt, params, created_at, model,
                origin_user_id, image_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    request_id,
                    guild_id,
                    channel_id,
                    user_id,
                    task,
                    prompt,
                    params_json,
                    now_text(),
                    model,
                    origin,
                    sum(map(len, images)),
                ),
            )
            await db.executemany(
                "INSERT INTO request_images (request_id, position, image) VALUES (?, ?, ?)",
                [(request_id, position, image) for position, image in enumerate(images, 1)],
            )
            evicted = await self._trim_place(_Place.of(guild_id, user_id), budget.per_place, DELETE_BATCH)
            await self._trim_total(budget.total, DELETE_BATCH - evicted)
        return request_id

    async def _trim_place(self, place: _Place, allowed: int, limit: int) -> int:
        stored = await self._int(
            "SELECT coalesce(sum(bytes), 0) FROM request_bytes WHERE guild_id = ? AND user_id = ?",
            (place.guild_id, place.user_id),
        )
        return await self._evict(stored - allowed, *place.requests, limit)

    async def _trim_total(self, allowed: int, limit: int) -> int:
        stored = await self._int("SELECT image_bytes FROM request_counters")
        return await self._evict(stored - allowed, "1", (), limit)

    async def _evict(self, excess: int, where: str, parameters: tuple[int, ...], limit: int) -> int:
        """Delete the oldest requests matching ``where`` until ``excess`` bytes are freed, at most
        ``limit`` of them, inside the caller's transaction. The newest is always kept, whatever its
        size: it is the one just answered, whose buttons were just shown."""
        if excess <= 0 or limit <= 0:
            return 0
        rows = await self._db.execute_fetchall(
            f"""SELECT id, image_bytes FROM requests WHERE {where}
            AND id < (SELECT max(id) FROM requests WHERE {where}) ORDER BY id LIMIT ?""",
            (*parameters, *parameters, limit),
        )
        doomed = []
        for request_id, size in rows:
            if excess <= 0:
                break
            doomed.append(request_id)
            excess -= size
        await self._db.executemany("DELETE FROM requests WHERE id = ?", [(request_id,) for request_id in doomed])
        return len(doomed)

    async def get_request(self, request_id: int, guild_id: int | None, user_id: int) -> StoredRequest | None:
        """The request, only where it was made (``_WHERE_MADE``): ids are guessable, places are not."""
        async with self._lock:
            row = await self._one(
                f"SELECT * FROM requests WHERE {_WHERE_MADE}", _where_made(request_id, guild_id, user_id)
            )
            if row is None:
                return None
            images = await self._db.execute_fetchall(
                "SELECT image FROM request_images WHERE request_id = ? ORDER BY position", (request_id,)
            )
        return StoredRequest(
            id=row["id"],
            guild_id=row["guild_id"],
            channel_id=row["channel_id"],
            user_id=row["user_id"],
            task=row["task"],
            prompt=row["prompt"],
            params=GenerationParams(**json.loads(row["params"])),
            images=tuple(image[0] for image in images),
            created_at=datetime.fromisoformat(row["created_at"]),
            model=row["model"],
            origin_user_id=row["origin_user_id"],
        )

    async def delete_request(self, request_id: int, guild_id: int | None, user_id: int) -> None:
        """Only where it was made, as ``get_request`` reads."""
        async with self._transaction() as db:
            await db.execute(f"DELETE FROM requests WHERE {_WHERE_MADE}", _where_made(request_id, guild_id, user_id))

    async def delete_requests_before(self, cutoff: datetime) -> int:
        """Retention: every request older than ``cutoff`` goes, with its images."""
        return await self._delete_in_batches("created_at < ?", (cutoff.isoformat(),))

    async def delete_user_requests(self, user_id: int) -> int:
        """Theirs, and others' that hold their images and prompt (re-rolls, descriptions of their messages)."""
        return await self._delete_in_batches("user_id = ? OR origin_user_id = ?", (user_id, user_id))

    async def trim_requests(self, budget: RequestBudget) -> int:
        """The oldest requests beyond ``budget``, a batch per transaction (after the budget was lowered,
        gigabytes may be over it): first each place's beyond its share, then everyone's beyond the total."""
        async with self._lock:
            over = await self._db.execute_fetchall(
                "SELECT guild_id, user_id FROM request_bytes WHERE bytes > ?", (budget.per_place,)
            )
        trims: list[Callable[[], Awaitable[int]]] = [
            partial(self._trim_place, _Place(*place), budget.per_place, DELETE_BATCH) for place in over
        ]
        trims.append(partial(self._trim_total, budget.total, DELETE_BATCH))
        deleted = 0
        for trim in trims:
            while True:
                async with self._transaction():
                    evicted = await trim()
                deleted += evicted
                if evicted < DELETE_BATCH:
                    break
        async with self._transaction() as db:
            await db.execute("DELETE FROM request_bytes WHERE bytes = 0")
        return deleted

    async def _delete_in_batches(self, where: str, parameters: tuple[object, ...]) -> int:
        """A batch of requests per transaction: every server's reads and writes wait while one runs,
        and a gigabyte of stored images took seconds to delete at once."""
        deleted = 0
        while True:
            async with self._transaction() as db:
                cursor = await db.execute(
                    f"DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE {where} LIMIT {DELETE_BATCH})",
                    parameters,
                )
            deleted += cursor.rowcount
            if cursor.rowcount < DELETE_BATCH:
                return deleted
