"""A database that refuses writes (disk full, read-only, locked too long): every change is refused
whole with a message the user can read, logged once while it lasts, counted, and forgotten at the
first write that succeeds. Each condition is SQLite's own refusal on the store's real connection.

Also the cap on all servers' task images together, which the store keeps with triggers.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.config import PrivacySettings
from core.errors import LimitReached, StorageUnavailable, TaskExists
from core.storage import Storage
from core.storage.database import BUSY_TIMEOUT_MS, MIGRATIONS
from core.storage.request_store import RequestBudget

GUILD, OTHER, THIRD = 1, 2, 3
CANNOT_SAVE = "The bot cannot save changes right now, so nothing was changed; try again later."
BIG = bytes(100_000)  # more than any page has free: it needs new pages


def example(size: int, author: int = 7) -> tuple[bytes, str, int]:
    return bytes(size), "<image>Pet:", author


async def create(storage: Storage, guild_id: int, name: str, *examples: tuple[bytes, str, int]) -> None:
    await storage.create_task(
        guild_id, name, "", "<image>Pet:", 7, max_tasks=5, max_image_bytes=2**30, examples=examples
    )


async def add(storage: Storage, guild_id: int, image: bytes, author: int = 7) -> int:
    name = "cats" if guild_id == GUILD else "dogs"
    return await storage.add_example(
        guild_id, name, image, "<image>Pet:", max_examples=8, max_image_bytes=2**30, added_by=author
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "bot.db"


@pytest.fixture
async def storage(db_path: Path) -> AsyncIterator[Storage]:
    storage = await Storage.open(db_path)
    await create(storage, GUILD, "cats", (b"jpeg", "<image>Pet:", 7))
    yield storage
    await storage.close()


@asynccontextmanager
async def full(storage: Storage) -> AsyncIterator[None]:
    """No page more than the file has now: what a full disk does to a write that needs room."""
    db = storage._db
    before = await storage._int("PRAGMA max_page_count")
    await db.execute(f"PRAGMA max_page_count = {await storage._int('PRAGMA page_count')}")
    yield
    await db.execute(f"PRAGMA max_page_count = {before}")


@asynccontextmanager
async def read_only(storage: Storage) -> AsyncIterator[None]:
    await storage._db.execute("PRAGMA query_only = ON")
    yield
    await storage._db.execute("PRAGMA query_only = OFF")


@asynccontextmanager
async def locked(storage: Storage) -> AsyncIterator[None]:
    """Another process holds the write lock; the store waits 1 ms for it instead of seconds."""
    rows = await storage._db.execute_fetchall("PRAGMA database_list")
    (path,) = [row[2] for row in rows if row[1] == "main"]
    await storage._db.execute("PRAGMA busy_timeout = 1")
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        yield
        other.execute("ROLLBACK")
    await storage._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


REFUSALS: dict[str, Callable[[Storage], AbstractAsyncContextManager[None]]] = {
    "full": full,
    "read-only": read_only,
    "locked": locked,
}


def lines(caplog: pytest.LogCaptureFixture, words: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if words in record.getMessage()]


@pytest.mark.parametrize("condition", list(REFUSALS))
async def test_refused_writes_change_nothing_are_logged_once_and_end_at_the_next_write(
    storage: Storage, condition: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="core.storage.database")
    async with REFUSALS[condition](storage):
        for _ in range(3):
            with pytest.raises(StorageUnavailable, match=CANNOT_SAVE):
                await add(storage, GUILD, BIG)
        assert storage.writes.degraded and storage.writes.refused == 3
        task = await storage.get_task(GUILD, "cats")  # reads go on
        assert task is not None and [e.image for e in task.examples] == [b"jpeg"]
        assert [t.name for t in await storage.list_tasks(GUILD)] == ["cats"]
    (refused,) = lines(caplog, "the database refuses writes")
    assert refused.levelno == logging.ERROR and refused.exc_info is None  # a line with its cause, no traceback
    assert storage.writes.refusal is not None and storage.writes.refusal in refused.getMessage()
    assert lines(caplog, "takes writes again") == []

    assert await add(storage, GUILD, BIG) == 2
    assert not storage.writes.degraded and storage.writes.refusal is None and storage.writes.refused == 3
    assert len(lines(caplog, "takes writes again")) == 1
    assert len(lines(caplog, "the database refuses writes")) == 1


async def test_task_and_settings_changes_are_refused_whole(storage: Storage) -> None:
    await storage.change_guild_settings(GUILD, lambda rules: replace(rules, ephemeral_answers=True))
    async with read_only(storage):
        changes = [
            storage.change_guild_settings(GUILD, lambda rules: replace(rules, ephemeral_answers=False)),
            storage.set_default_task(GUILD, "cats"),
            create(storage, GUILD, "dogs"),
            storage.rename_task(GUILD, "cats", "kittens"),
            storage.delete_task(GUILD, "cats"),
            storage.mark_departed(GUILD),
        ]
        for change in changes:
            with pytest.raises(StorageUnavailable, match=CANNOT_SAVE):
                await change
        assert storage.writes.refused == len(changes)
    assert (await storage.guild_settings(GUILD)).ephemeral_answers
    assert await storage.get_default_task(GUILD) is None
    assert [t.name for t in await storage.list_tasks(GUILD)] == ["cats"]


async def test_only_a_write_that_changed_rows_ends_the_degraded_state(storage: Storage) -> None:
    async with full(storage):
        with pytest.raises(StorageUnavailable):
            await add(storage, GUILD, BIG)
        await storage.reconcile_presence({GUILD})  # commits, having nothing to change: no sign the disk has room
        await storage.purge(PrivacySettings(), RequestBudget(2**30, 2**30))
        assert storage.writes.degraded
    await storage.mark_departed(OTHER)
    assert not storage.writes.degraded


async def test_a_change_refused_for_its_own_reasons_leaves_storage_healthy(storage: Storage) -> None:
    with pytest.raises(TaskExists):
        await create(storage, GUILD, "CATS")
    assert not storage.writes.degraded and storage.writes.refused == 0


# All servers' task images together


def accounted(path: Path) -> tuple[int, int]:
    """The total the triggers keep, and the sum it stands for."""
    with closing(sqlite3.connect(path)) as db:
        return (
            db.execute("SELECT bytes FROM task_image_bytes").fetchone()[0],
            db.execute("SELECT coalesce(sum(length(image)), 0) FROM examples").fetchone()[0],
        )


FULL = r"^The bot's storage for task images is full \(all servers' task images together may take 1000 B"
OPERATOR = r": its operator must raise that limit \(limits\.max_all_task_images_mb\) before images can be added\.$"


async def test_all_servers_task_images_together_stay_within_the_operators_limit(
    storage: Storage, db_path: Path
) -> None:
    storage.max_all_image_bytes = 1000  # 4 bytes are stored already, in the first server
    await create(storage, OTHER, "dogs", example(600))
    with pytest.raises(LimitReached, match=FULL + r"; 396 B left, and these need 500 B\)" + OPERATOR):
        await add(storage, GUILD, bytes(500))
    with pytest.raises(LimitReached, match=FULL):  # a copy or an import: a task created with its examples
        await create(storage, THIRD, "pets", example(397))
    await storage.check_image_room(THIRD, max_image_bytes=2**30)  # 396 bytes are left
    assert await add(storage, GUILD, bytes(396)) == 2
    with pytest.raises(LimitReached, match=FULL + r"\)" + OPERATOR):  # asked before an upload is decoded
        await storage.check_image_room(THIRD, max_image_bytes=2**30)
    await create(storage, THIRD, "empty")  # no images, no bytes
    assert [t.name for t in await storage.list_tasks(THIRD)] == ["empty"]
    assert accounted(db_path) == (1000, 1000)


async def test_the_total_follows_every_way_task_images_go(storage: Storage, db_path: Path) -> None:
    await create(storage, OTHER, "dogs", example(300, author=8), example(200))
    for size in (50, 60):
        await add(storage, GUILD, bytes(size), author=8)
    assert accounted(db_path) == (614, 614)
    await storage.remove_example(GUILD, "cats", 2)
    assert accounted(db_path) == (564, 564)
    await storage.delete_user_examples(8)  # /forget-me's examples
    assert accounted(db_path) == (204, 204)
    await storage.delete_task(GUILD, "cats")  # its examples go through the foreign key
    assert accounted(db_path) == (200, 200)
    await storage.mark_departed(OTHER)
    later = datetime.now(UTC) + timedelta(seconds=1)
    purged = await storage.purge(PrivacySettings(departed_guild_retention_days=0), RequestBudget(2**30, 2**30), later)
    assert purged.guilds == 1 and accounted(db_path) == (0, 0)


async def test_migrating_counts_the_task_images_already_stored(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as db:
        for step in MIGRATIONS[:7]:
            for statement in step:
                db.execute(statement)
        db.execute(
            "INSERT INTO tasks (id, guild_id, name, name_key, description, prompt_template, created_by, created_at,"
            " updated_at) VALUES (1, 1, 'cats', 'cats', '', 'p', 7, '2026-01-01', '2026-01-01')"
        )
        db.executemany(
            "INSERT INTO examples (task_id, position, text, image, image_sha256) VALUES (1, ?, 't', ?, '')",
            [(1, bytes(300)), (2, bytes(45))],
        )
        db.execute("PRAGMA user_version = 7")
        db.commit()
    storage = await Storage.open(db_path)
    await storage.close()
    assert accounted(db_path) == (345, 345)
