"""Each guild's task library and settings, kept in one SQLite file through aiosqlite.

Every query names the guild, so no call can see or change another guild's rows. Every change runs
in one ``BEGIN IMMEDIATE`` transaction under an ``asyncio.Lock``: the bot shares one connection
between coroutines, and without the lock the statements of two changes would interleave inside one
transaction. Reads take the lock too, so they never see another coroutine's uncommitted rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

from core.errors import ExampleNotFound, LimitReached, TaskExists, UnknownTask

_BUSY_TIMEOUT_MS = 5000

# Schema steps in order; step i brings ``PRAGMA user_version`` from i to i + 1. Append, never edit.
# ``name_key`` is ``str.casefold(name)``: SQLite's NOCASE folds only ASCII letters.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tasks (
            id INTEGER PRIMARY KEY,
            guild_id INTEGER NOT NULL,
            name TEXT NOT NULL,
            name_key TEXT NOT NULL,
            description TEXT NOT NULL,
            prompt_template TEXT NOT NULL,
            created_by INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            revision INTEGER NOT NULL DEFAULT 1,
            UNIQUE (guild_id, name_key)
        )""",
        """CREATE TABLE examples (
            task_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            text TEXT NOT NULL,
            image BLOB NOT NULL,
            image_sha256 TEXT NOT NULL,
            UNIQUE (task_id, position)
        )""",
    ),
    ("CREATE TABLE guild_settings (guild_id INTEGER PRIMARY KEY, default_task TEXT)",),
)


@dataclass(frozen=True)
class StoredExample:
    position: int
    text: str
    image: bytes
    image_sha256: str


@dataclass(frozen=True)
class StoredTask:
    guild_id: int
    name: str
    description: str
    prompt_template: str
    created_by: int
    created_at: datetime
    updated_at: datetime
    revision: int
    examples: tuple[StoredExample, ...]


@dataclass(frozen=True)
class TaskSummary:
    name: str
    description: str
    example_count: int
    revision: int


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _example_row(task_id: int, position: int, image: bytes, text: str) -> tuple[int, int, str, bytes, str]:
    return task_id, position, text, image, hashlib.sha256(image).hexdigest()


def _key(name: str) -> str:
    """How names compare: surrounding spaces ignored, case folded (SQLite's NOCASE folds ASCII only)."""
    return name.strip().casefold()


class TaskStore:
    """The per-guild task library; open it with ``await TaskStore.open(path)``."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self.schema_version = 0

    @classmethod
    async def open(cls, path: Path) -> TaskStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the store writes BEGIN itself, so sqlite3 never opens or commits behind its back.
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = sqlite3.Row
        store = cls(db)
        try:
            for pragma in ("journal_mode = WAL", "foreign_keys = ON", f"busy_timeout = {_BUSY_TIMEOUT_MS}"):
                await db.execute(f"PRAGMA {pragma}")
            await store._migrate()
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        await self._db.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One atomic change; IMMEDIATE takes the write lock first, so no read-then-write upgrade can fail.

        BEGIN and COMMIT sit inside the ``try``: a change cancelled while either is queued still ends its
        transaction, instead of leaving the shared connection inside it.
        """
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await self._db.commit()
            except BaseException:
                await self._db.rollback()
                raise

    async def _migrate(self) -> None:
        """Apply the missing steps, each with its version bump in one transaction, so a crash never half-migrates."""
        while True:
            async with self._transaction() as db:
                version = await self._int("PRAGMA user_version")
                if version > len(MIGRATIONS):
                    raise RuntimeError(
                        f"The task database is at schema version {version}, newer than this code knows "
                        f"({len(MIGRATIONS)}); run the newer bot version or restore a backup."
                    )
                self.schema_version = version
                if version == len(MIGRATIONS):
                    return
                for statement in MIGRATIONS[version]:
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {version + 1}")

    async def _one(self, sql: str, parameters: Sequence[object] = ()) -> sqlite3.Row | None:
        rows = list(await self._db.execute_fetchall(sql, parameters))
        return rows[0] if rows else None

    async def _int(self, sql: str, parameters: Sequence[object] = ()) -> int:
        """The single integer a count or a pragma query returns."""
        rows = list(await self._db.execute_fetchall(sql, parameters))
        return rows[0][0]

    async def _find(self, guild_id: int, name: str) -> sqlite3.Row | None:
        return await self._one(
            "SELECT * FROM tasks WHERE guild_id = ? AND name_key = ?",
            (guild_id, _key(name)),
        )

    async def _require(self, guild_id: int, name: str) -> sqlite3.Row:
        task = await self._find(guild_id, name)
        if task is None:
            raise UnknownTask(f"This server has no task called “{name}”.")
        return task

    async def _count_examples(self, task_id: int) -> int:
        return await self._int("SELECT count(*) FROM examples WHERE task_id = ?", (task_id,))

    async def _count_tasks(self, guild_id: int) -> int:
        return await self._int("SELECT count(*) FROM tasks WHERE guild_id = ?", (guild_id,))

    async def _check_position(self, task: sqlite3.Row, *positions: int) -> int:
        count = await self._count_examples(task["id"])
        for position in positions:
            if not 1 <= position <= count:
                raise ExampleNotFound(f"Task “{task['name']}” has no example {position}; it has {count}.")
        return count

    async def _touch(self, task_id: int) -> None:
        """Bump the revision on every change, so caches keyed on it see the task changed."""
        await self._db.execute(
            "UPDATE tasks SET revision = revision + 1, updated_at = ? WHERE id = ?",
            (_now(), task_id),
        )

    async def _shift(self, task_id: int, low: int, high: int, delta: int) -> None:
        """Move positions low..high by delta in two passes, so UNIQUE (task_id, position) holds after each row."""
        await self._db.execute(
            "UPDATE examples SET position = -(position + ?) WHERE task_id = ? AND position BETWEEN ? AND ?",
            (delta, task_id, low, high),
        )
        await self._db.execute(
            "UPDATE examples SET position = -position WHERE task_id = ? AND position < 0", (task_id,)
        )

    async def _retarget_default(self, guild_id: int, old_name: str, new_name: str | None) -> None:
        """Keep the guild default on the same task after a rename, or clear it when the task goes."""
        row = await self._one("SELECT default_task FROM guild_settings WHERE guild_id = ?", (guild_id,))
        if row is not None and row[0] is not None and _key(row[0]) == _key(old_name):
            await self._db.execute(
                "UPDATE guild_settings SET default_task = ? WHERE guild_id = ?",
                (new_name, guild_id),
            )

    async def list_tasks(self, guild_id: int) -> list[TaskSummary]:
        async with self._lock:
            rows = await self._db.execute_fetchall(
                """SELECT t.name, t.description, count(e.task_id), t.revision
                FROM tasks t LEFT JOIN examples e ON e.task_id = t.id
                WHERE t.guild_id = ? GROUP BY t.id ORDER BY t.name_key""",
                (guild_id,),
            )
        return [TaskSummary(*row) for row in rows]

    async def count_tasks(self, guild_id: int) -> int:
        async with self._lock:
            return await self._count_tasks(guild_id)

    async def get_task(self, guild_id: int, name: str) -> StoredTask | None:
        async with self._lock:
            task = await self._find(guild_id, name)
            if task is None:
                return None
            rows = await self._db.execute_fetchall(
                "SELECT position, text, image, image_sha256 FROM examples WHERE task_id = ? ORDER BY position",
                (task["id"],),
            )
        return StoredTask(
            guild_id=guild_id,
            name=task["name"],
            description=task["description"],
            prompt_template=task["prompt_template"],
            created_by=task["created_by"],
            created_at=datetime.fromisoformat(task["created_at"]),
            updated_at=datetime.fromisoformat(task["updated_at"]),
            revision=task["revision"],
            examples=tuple(StoredExample(*row) for row in rows),
        )

    async def create_task(
        self,
        guild_id: int,
        name: str,
        description: str,
        prompt_template: str,
        created_by: int,
        *,
        max_tasks: int,
        examples: Sequence[tuple[bytes, str]] = (),
    ) -> None:
        async with self._transaction() as db:
            if (existing := await self._find(guild_id, name)) is not None:
                raise TaskExists(f"This server already has a task called “{existing['name']}”.")
            if await self._count_tasks(guild_id) >= max_tasks:
                raise LimitReached(
                    f"This server already has {max_tasks} tasks, the most it may have; delete one first."
                )
            now = _now()
            cursor = await db.execute(
                """INSERT INTO tasks (guild_id, name, name_key, description, prompt_template, created_by,
                created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (guild_id, name, _key(name), description, prompt_template, created_by, now, now),
            )
            await db.executemany(
                "INSERT INTO examples (task_id, position, text, image, image_sha256) VALUES (?, ?, ?, ?, ?)",
                [_example_row(cursor.lastrowid, i, image, text) for i, (image, text) in enumerate(examples, 1)],
            )

    async def update_task(
        self, guild_id: int, name: str, *, description: str | None = None, prompt_template: str | None = None
    ) -> None:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            await db.execute(
                """UPDATE tasks SET description = coalesce(?, description),
                prompt_template = coalesce(?, prompt_template) WHERE id = ?""",
                (description, prompt_template, task["id"]),
            )
            await self._touch(task["id"])

    async def rename_task(self, guild_id: int, name: str, new_name: str) -> None:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            clash = await self._find(guild_id, new_name)
            if clash is not None and clash["id"] != task["id"]:
                raise TaskExists(f"This server already has a task called “{clash['name']}”.")
            await db.execute(
                "UPDATE tasks SET name = ?, name_key = ? WHERE id = ?",
                (new_name, _key(new_name), task["id"]),
            )
            await self._touch(task["id"])
            await self._retarget_default(guild_id, task["name"], new_name)

    async def delete_task(self, guild_id: int, name: str) -> None:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            await db.execute("DELETE FROM tasks WHERE id = ?", (task["id"],))
            await self._retarget_default(guild_id, task["name"], None)

    async def add_example(self, guild_id: int, name: str, image: bytes, text: str, *, max_examples: int) -> int:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            count = await self._count_examples(task["id"])
            if count >= max_examples:
                raise LimitReached(
                    f"Task “{task['name']}” already has {max_examples} examples, the most a task may have."
                )
            await db.execute(
                "INSERT INTO examples (task_id, position, text, image, image_sha256) VALUES (?, ?, ?, ?, ?)",
                _example_row(task["id"], count + 1, image, text),
            )
            await self._touch(task["id"])
            return count + 1

    async def edit_example(self, guild_id: int, name: str, position: int, text: str) -> None:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            await self._check_position(task, position)
            await db.execute(
                "UPDATE examples SET text = ? WHERE task_id = ? AND position = ?",
                (text, task["id"], position),
            )
            await self._touch(task["id"])

    async def remove_example(self, guild_id: int, name: str, position: int) -> None:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            count = await self._check_position(task, position)
            await db.execute("DELETE FROM examples WHERE task_id = ? AND position = ?", (task["id"], position))
            await self._shift(task["id"], position + 1, count, -1)
            await self._touch(task["id"])

    async def move_example(self, guild_id: int, name: str, position: int, new_position: int) -> None:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            await self._check_position(task, position, new_position)
            if position == new_position:
                return
            # Park the moving example at 0 (never a real position), close the gap it leaves, then drop it in.
            await db.execute(
                "UPDATE examples SET position = 0 WHERE task_id = ? AND position = ?",
                (task["id"], position),
            )
            if position < new_position:
                await self._shift(task["id"], position + 1, new_position, -1)
            else:
                await self._shift(task["id"], new_position, position - 1, +1)
            await db.execute(
                "UPDATE examples SET position = ? WHERE task_id = ? AND position = 0",
                (new_position, task["id"]),
            )
            await self._touch(task["id"])

    async def get_default_task(self, guild_id: int) -> str | None:
        async with self._lock:
            row = await self._one("SELECT default_task FROM guild_settings WHERE guild_id = ?", (guild_id,))
        return None if row is None else row[0]

    async def set_default_task(self, guild_id: int, name: str | None) -> None:
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO guild_settings (guild_id, default_task) VALUES (?, ?)
                ON CONFLICT (guild_id) DO UPDATE SET default_task = excluded.default_task""",
                (guild_id, name),
            )


def backup_database(source: Path, target: Path) -> None:
    """Copy a consistent snapshot with SQLite's online backup API, safe while the bot writes.

    It blocks: call it through ``asyncio.to_thread`` from the bot. The source is opened read-only, so a
    wrong path fails instead of backing up a new empty file; the copy lands in one transaction on the target.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    source_uri = f"{source.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(source_uri, uri=True)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
