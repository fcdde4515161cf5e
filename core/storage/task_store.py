"""Each guild's task library: tasks and their examples, in the bot's database."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from core.config import LimitSettings
from core.errors import ExampleNotFound, LimitReached, TaskChanged, TaskExists, UnknownTask
from core.storage.database import Database, now_text
from core.wording import byte_size, quoted


@dataclass(frozen=True)
class StoredExample:
    position: int
    text: str
    image: bytes
    image_sha256: str
    added_by: int  # 0: nobody (a built-in task's example, or one stored before authors were kept)


@dataclass(frozen=True)
class TaskVersion:
    """One version of a server's task: every change bumps its revision, and a task deleted and made
    again under the same name has another creation time, so each edit gives another ``key``."""

    guild_id: int
    name: str
    created_at: datetime
    revision: int

    @property
    def key(self) -> str:
        """What caches of the task (its examples, its prefix on the model) are keyed by."""
        return f"guild/{self.guild_id}/{self.name}/{self.created_at.isoformat()}/{self.revision}"


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

    @property
    def version(self) -> TaskVersion:
        return TaskVersion(self.guild_id, self.name, self.created_at, self.revision)


@dataclass(frozen=True)
class TaskSummary:
    name: str
    description: str
    example_count: int
    revision: int


_INSERT_EXAMPLE = (
    "INSERT INTO examples (task_id, position, text, image, image_sha256, added_by) VALUES (?, ?, ?, ?, ?, ?)"
)


def _example_row(
    task_id: int, position: int, image: bytes, text: str, added_by: int
) -> tuple[int, int, str, bytes, str, int]:
    return task_id, position, text, image, hashlib.sha256(image).hexdigest(), added_by


def _key(name: str) -> str:
    """How names compare: surrounding spaces ignored, case folded (SQLite's NOCASE folds ASCII only)."""
    return name.strip().casefold()


class TaskStore(Database):
    """The per-guild task library; open it with ``await TaskStore.open(path)``."""

    # Bytes all servers' task images may take together (``limits.max_all_task_images_mb``), set by
    # whoever opens the store: unlike a server's cap, which each change is given, it bounds the one
    # database file, so every change made through this store is held to it.
    max_all_image_bytes: int = LimitSettings().max_all_task_image_bytes

    async def _find(self, guild_id: int, name: str) -> sqlite3.Row | None:
        return await self._one(
            "SELECT * FROM tasks WHERE guild_id = ? AND name_key = ?",
            (guild_id, _key(name)),
        )

    async def _require(self, guild_id: int, name: str) -> sqlite3.Row:
        task = await self._find(guild_id, name)
        if task is None:
            raise UnknownTask(f"This server has no task called {quoted(name)}.")
        return task

    @staticmethod
    def _unchanged(task: sqlite3.Row, revision: int | None) -> None:
        """A change checked against ``revision`` (where given) is refused if someone changed the task
        meanwhile: the checks would no longer hold. After the store's own checks, whose refusals say more."""
        if revision is not None and task["revision"] != revision:
            raise TaskChanged(
                f"Task “{task['name']}” was changed by someone else a moment ago; look at it again and retry."
            )

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
            (now_text(), task_id),
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

    async def has_task(self, guild_id: int, name: str) -> bool:
        async with self._lock:
            return await self._find(guild_id, name) is not None

    async def task_version(self, guild_id: int, name: str) -> TaskVersion | None:
        """Which version of the task is stored, without reading its examples."""
        async with self._lock:
            task = await self._one(
                "SELECT name, created_at, revision FROM tasks WHERE guild_id = ? AND name_key = ?",
                (guild_id, _key(name)),
            )
        if task is None:
            return None
        return TaskVersion(guild_id, task["name"], datetime.fromisoformat(task["created_at"]), task["revision"])

    async def get_task(self, guild_id: int, name: str) -> StoredTask | None:
        async with self._lock:
            task = await self._find(guild_id, name)
            if task is None:
                return None
            rows = await self._db.execute_fetchall(
                """SELECT position, text, image, image_sha256, added_by FROM examples
                WHERE task_id = ? ORDER BY position""",
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
        max_image_bytes: int,
        examples: Sequence[tuple[bytes, str, int]] = (),
    ) -> None:
        """``examples``: image, text and who added it (kept through copies, for /forget-me)."""
        async with self._transaction() as db:
            await self._check_room(guild_id, name, max_tasks)
            if examples:
                await self._check_image_room(guild_id, sum(len(image) for image, _, _ in examples), max_image_bytes)
            now = now_text()
            cursor = await db.execute(
                """INSERT INTO tasks (guild_id, name, name_key, description, prompt_template, created_by,
                created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (guild_id, name, _key(name), description, prompt_template, created_by, now, now),
            )
            task_id = cursor.lastrowid
            assert task_id is not None
            await db.executemany(
                _INSERT_EXAMPLE,
                [_example_row(task_id, i, *example) for i, example in enumerate(examples, 1)],
            )

    async def check_room(self, guild_id: int, name: str, *, max_tasks: int) -> None:
        """Whether a task of this name could be created now: asked before costly work (decoding an
        import's images); ``create_task`` checks again as it writes."""
        async with self._lock:
            await self._check_room(guild_id, name, max_tasks)

    async def _check_room(self, guild_id: int, name: str, max_tasks: int) -> None:
        if (existing := await self._find(guild_id, name)) is not None:
            raise TaskExists(f"This server already has a task called “{existing['name']}”; choose another name.")
        if await self._count_tasks(guild_id) >= max_tasks:
            raise LimitReached(f"This server already has {max_tasks} tasks, the most it may have; delete one first.")

    async def _image_bytes(self, guild_id: int) -> int:
        return await self._int(
            """SELECT coalesce(sum(length(e.image)), 0) FROM examples e JOIN tasks t ON t.id = e.task_id
            WHERE t.guild_id = ?""",
            (guild_id,),
        )

    async def image_bytes(self, guild_id: int) -> int:
        """What the guild's task images take: each is stored whole, in every task that holds it."""
        async with self._lock:
            return await self._image_bytes(guild_id)

    async def check_image_room(self, guild_id: int, *, max_image_bytes: int) -> None:
        """Whether any image could be added now: asked before decoding an upload or an import's images;
        the change checks again, with their sizes, as it writes."""
        async with self._lock:
            await self._check_image_room(guild_id, 0, max_image_bytes)

    async def _check_image_room(self, guild_id: int, adding: int, max_image_bytes: int) -> None:
        """Tasks and examples are bounded in number, but a strip-shaped photo stores up to 30 times the
        bytes of a square one; the bytes themselves are bounded too, per server and for all servers
        together (any number of servers may add the bot). ``adding`` 0: whether any could be."""
        used = await self._image_bytes(guild_id)
        if used >= max_image_bytes:
            raise LimitReached(
                f"This server's task images already take all of the {byte_size(max_image_bytes)} they may; "
                "remove some examples or tasks first."
            )
        if used + adding > max_image_bytes:
            left = max_image_bytes - used
            raise LimitReached(
                f"This server's task images may take {byte_size(max_image_bytes)} in all; {byte_size(left)} "
                f"{'is' if left >= 2**10 else 'are'} left, and these need {byte_size(adding)}. "
                "Remove some examples or tasks first."
            )
        await self._check_total_image_room(adding)

    async def _check_total_image_room(self, adding: int) -> None:
        """The operator's limit, under which no server can make room: said so, naming the setting."""
        total = self.max_all_image_bytes
        left = total - await self._int("SELECT bytes FROM task_image_bytes")
        if left > 0 and adding <= left:
            return
        need = f"; {byte_size(left)} left, and these need {byte_size(adding)}" if left > 0 else ""
        raise LimitReached(
            f"The bot's storage for task images is full (all servers' task images together may take "
            f"{byte_size(total)}{need}): its operator must raise that limit (limits.max_all_task_images_mb) "
            "before images can be added."
        )

    async def update_task(
        self,
        guild_id: int,
        name: str,
        *,
        description: str | None = None,
        prompt_template: str | None = None,
        revision: int | None = None,
    ) -> None:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            self._unchanged(task, revision)
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
                raise TaskExists(f"This server already has a task called “{clash['name']}”; choose another name.")
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

    async def add_example(
        self,
        guild_id: int,
        name: str,
        image: bytes,
        text: str,
        *,
        max_examples: int,
        max_image_bytes: int,
        added_by: int,
        revision: int | None = None,
    ) -> int:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            count = await self._count_examples(task["id"])
            if count >= max_examples:
                raise LimitReached(
                    f"Task “{task['name']}” already has {max_examples} examples, the most a task may have."
                )
            await self._check_image_room(guild_id, len(image), max_image_bytes)
            self._unchanged(task, revision)
            await db.execute(_INSERT_EXAMPLE, _example_row(task["id"], count + 1, image, text, added_by))
            await self._touch(task["id"])
            return count + 1

    async def edit_example(
        self, guild_id: int, name: str, position: int, text: str, *, revision: int | None = None
    ) -> None:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            await self._check_position(task, position)
            self._unchanged(task, revision)
            await db.execute(
                "UPDATE examples SET text = ? WHERE task_id = ? AND position = ?",
                (text, task["id"], position),
            )
            await self._touch(task["id"])

    async def remove_example(self, guild_id: int, name: str, position: int, *, revision: int | None = None) -> None:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            count = await self._check_position(task, position)
            self._unchanged(task, revision)
            await db.execute("DELETE FROM examples WHERE task_id = ? AND position = ?", (task["id"], position))
            await self._shift(task["id"], position + 1, count, -1)
            await self._touch(task["id"])

    async def move_example(
        self, guild_id: int, name: str, position: int, new_position: int, *, revision: int | None = None
    ) -> None:
        async with self._transaction() as db:
            task = await self._require(guild_id, name)
            await self._check_position(task, position, new_position)
            self._unchanged(task, revision)
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

    async def forget_user_tasks(self, user_id: int) -> int:
        """The tasks a user created stay (they are the server's), without saying who created them; the
        examples they added are counted, not deleted: they change shared tasks, so they go only when
        confirmed (``delete_user_examples``). One transaction."""
        async with self._transaction() as db:
            await db.execute("UPDATE tasks SET created_by = 0 WHERE created_by = ?", (user_id,))
            return await self._int("SELECT count(*) FROM examples WHERE added_by = ?", (user_id,))

    async def delete_user_examples(self, user_id: int) -> int:
        """Remove every example a user added, in any server; later examples move up, tasks change revision."""
        async with self._transaction() as db:
            rows = await db.execute_fetchall("SELECT DISTINCT task_id FROM examples WHERE added_by = ?", (user_id,))
            cursor = await db.execute("DELETE FROM examples WHERE added_by = ?", (user_id,))
            for (task_id,) in rows:
                await self._renumber(task_id)
                await self._touch(task_id)
            return cursor.rowcount

    async def _renumber(self, task_id: int) -> None:
        """Close gaps left by deleted examples, keeping their order. Positions are unique, so they
        go through negatives first, as in ``_shift``."""
        rows = await self._db.execute_fetchall(
            "SELECT rowid FROM examples WHERE task_id = ? ORDER BY position", (task_id,)
        )
        await self._db.execute("UPDATE examples SET position = -position WHERE task_id = ?", (task_id,))
        await self._db.executemany(
            "UPDATE examples SET position = ? WHERE rowid = ?", [(n, rowid) for n, (rowid,) in enumerate(rows, 1)]
        )
