"""Answered requests, kept so an answer's buttons still work after a restart, then forgotten.

A button's ``custom_id`` holds only a row id; the inputs (prompt, task, parameters, images) live
here. Rows expire after the retention set in config, and a user may delete theirs at any time.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from core.database import Database, now_text
from core.generation import GenerationParams

# Requests deleted per transaction (each with up to four stored images).
DELETE_BATCH = 25


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
    ) -> int:
        params_json = json.dumps(dataclasses.asdict(params))
        origin = None if origin_user_id == user_id else origin_user_id
        async with self._transaction() as db:
            cursor = await db.execute(
                """INSERT INTO requests
                (guild_id, channel_id, user_id, task, prompt, params, created_at, model, origin_user_id)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (guild_id or 0, channel_id, user_id, task, prompt, params_json, now_text(), model, origin),
            )
            request_id = cursor.lastrowid
            assert request_id is not None
            await db.executemany(
                "INSERT INTO request_images (request_id, position, image) VALUES (?, ?, ?)",
                [(request_id, position, image) for position, image in enumerate(images, 1)],
            )
        return request_id

    async def get_request(self, request_id: int, guild_id: int | None) -> StoredRequest | None:
        """The request, only if it was made in the same server: ids are guessable, servers are not."""
        async with self._lock:
            row = await self._one("SELECT * FROM requests WHERE id = ? AND guild_id = ?", (request_id, guild_id or 0))
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

    async def delete_request(self, request_id: int, guild_id: int | None) -> None:
        """Only in the server it was made in, as ``get_request`` reads."""
        async with self._transaction() as db:
            await db.execute("DELETE FROM requests WHERE id = ? AND guild_id = ?", (request_id, guild_id or 0))

    async def delete_requests_before(self, cutoff: datetime) -> int:
        """Retention: every request older than ``cutoff`` goes, with its images."""
        return await self._delete_in_batches("created_at < ?", (cutoff.isoformat(),))

    async def delete_user_requests(self, user_id: int) -> int:
        """Theirs, and others' that hold their images and prompt (re-rolls, descriptions of their messages)."""
        return await self._delete_in_batches("user_id = ? OR origin_user_id = ?", (user_id, user_id))

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
