"""Stored requests' images within a budget, and request ids that never come back."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.config import PrivacySettings, StorageSettings
from core.generation import GenerationParams
from core.storage import Storage
from core.storage.database import MIGRATIONS
from core.storage.request_store import DELETE_BATCH, RequestBudget

GUILD, OTHER = 1, 2
ROOMY = RequestBudget(total=2**40, per_place=2**40)
KEEP_ALL = PrivacySettings(request_retention_hours=1000, departed_guild_retention_days=30)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = await Storage.open(tmp_path / "bot.db")
    yield storage
    await storage.close()


async def save(
    storage: Storage, guild_id: int | None, size: int, budget: RequestBudget = ROOMY, user_id: int = 42
) -> int:
    image = bytes(size)
    return await storage.save_request(
        guild_id, 3, user_id, "cats", "<image>Cat:", GenerationParams(), [image], budget=budget
    )


async def kept(storage: Storage, ids: list[int], guild_id: int | None, user_id: int = 42) -> list[int]:
    return [request_id for request_id in ids if await storage.get_request(request_id, guild_id, user_id) is not None]


def accounted(path: Path) -> dict[tuple[int, int], int]:
    """The triggers' per-place totals, checked against the images actually stored."""
    with closing(sqlite3.connect(path)) as db:
        counted = dict(((g, u), b) for g, u, b in db.execute("SELECT * FROM request_bytes WHERE bytes != 0"))
        actual = db.execute(
            """SELECT r.guild_id, CASE WHEN r.guild_id = 0 THEN r.user_id ELSE 0 END, sum(length(i.image))
            FROM requests r JOIN request_images i ON i.request_id = r.id GROUP BY 1, 2"""
        ).fetchall()
    assert counted == {(g, u): b for g, u, b in actual}
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT image_bytes FROM request_counters").fetchone() == (sum(counted.values()),)
    return counted


async def test_ids_are_never_reused_once_their_requests_are_gone(storage: Storage) -> None:
    """Buttons on old answers name their request by id: a reused id showed another request."""
    first = [await save(storage, GUILD, 10) for _ in range(3)]
    await storage.delete_request(first[-1], GUILD, 42)
    after_delete = await save(storage, GUILD, 10)
    assert after_delete > first[-1]
    await storage.purge(PrivacySettings(request_retention_hours=1), ROOMY, datetime.now(UTC) + timedelta(hours=2))
    assert await kept(storage, [*first, after_delete], GUILD) == []  # the table is empty now
    assert await save(storage, GUILD, 10) > after_delete


async def test_a_server_beyond_its_share_loses_its_own_oldest_requests(storage: Storage, tmp_path: Path) -> None:
    budget = RequestBudget(total=100_000, per_place=3000)
    ours = [await save(storage, GUILD, 1000, budget) for _ in range(3)]
    theirs = [await save(storage, OTHER, 1000, budget) for _ in range(3)]
    newest = await save(storage, GUILD, 1500, budget)
    assert await kept(storage, [*ours, newest], GUILD) == [ours[2], newest]  # 2500 bytes, within 3000
    assert await kept(storage, theirs, OTHER) == theirs
    assert accounted(tmp_path / "bot.db") == {(GUILD, 0): 2500, (OTHER, 0): 3000}


async def test_direct_messages_count_per_user(storage: Storage, tmp_path: Path) -> None:
    budget = RequestBudget(total=100_000, per_place=2000)
    mine = [await save(storage, None, 1000, budget, user_id=42) for _ in range(3)]
    yours = [await save(storage, None, 1000, budget, user_id=43) for _ in range(2)]
    assert await kept(storage, mine, None) == mine[1:]
    assert await kept(storage, yours, None, 43) == yours
    assert accounted(tmp_path / "bot.db") == {(0, 42): 2000, (0, 43): 2000}


async def test_beyond_the_total_the_oldest_of_any_place_go(storage: Storage) -> None:
    budget = RequestBudget(total=3000, per_place=3000)
    first = await save(storage, GUILD, 1000, budget)
    second = await save(storage, OTHER, 1000, budget)
    third = await save(storage, None, 1000, budget)
    fourth = await save(storage, OTHER, 1000, budget)
    assert await kept(storage, [first], GUILD) == []
    assert await kept(storage, [second, fourth], OTHER) == [second, fourth]
    assert await kept(storage, [third], None) == [third]


async def test_the_newest_request_is_kept_even_beyond_the_share_and_the_total(storage: Storage) -> None:
    """Its buttons were just shown; the next purge must not take them away either."""
    budget = RequestBudget(total=3000, per_place=1000)
    older = await save(storage, GUILD, 500, budget)
    large = await save(storage, GUILD, 4000, budget)
    assert await kept(storage, [older, large], GUILD) == [large]
    assert (await storage.purge(KEEP_ALL, budget)).over_budget == 0
    assert await kept(storage, [large], GUILD) == [large]


async def test_a_lowered_budget_deletes_a_batch_per_request_and_purge_the_rest(
    storage: Storage, tmp_path: Path
) -> None:
    """Gigabytes beyond a newly lowered budget must not hold the database in one request's transaction."""
    count = 3 * DELETE_BATCH
    old = [await save(storage, GUILD, 100) for _ in range(count)]
    lowered = RequestBudget(total=10_000, per_place=1000)
    newest = await save(storage, GUILD, 100, lowered)
    assert len(await kept(storage, old, GUILD)) == count - DELETE_BATCH
    purged = await storage.purge(KEEP_ALL, lowered)
    assert purged.over_budget == count - DELETE_BATCH - 9  # nine old ones fit beside the newest
    assert await kept(storage, [*old, newest], GUILD) == [*old[-9:], newest]
    assert accounted(tmp_path / "bot.db") == {(GUILD, 0): 1000}


async def test_purge_trims_every_place_beyond_its_share_then_the_total(storage: Storage, tmp_path: Path) -> None:
    for guild_id in (GUILD, OTHER, None):
        for _ in range(5):
            await save(storage, guild_id, 1000)
    purged = await storage.purge(KEEP_ALL, RequestBudget(total=5000, per_place=2000))
    assert purged.over_budget == 10
    # each place keeps its newest two; then the oldest of those six, the first server's, goes
    assert accounted(tmp_path / "bot.db") == {(GUILD, 0): 1000, (OTHER, 0): 2000, (0, 42): 2000}


async def test_a_departed_server_leaves_no_count_behind(storage: Storage, tmp_path: Path) -> None:
    await save(storage, GUILD, 1000)
    await storage.mark_departed(GUILD)
    purged = await storage.purge(KEEP_ALL, ROOMY, datetime.now(UTC) + timedelta(days=31))
    assert purged.guilds == 1
    with closing(sqlite3.connect(tmp_path / "bot.db")) as db:
        assert db.execute("SELECT count(*) FROM request_bytes").fetchone() == (0,)


async def test_migrating_counts_the_images_already_stored_and_continues_their_ids(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA foreign_keys = ON")
        for step in MIGRATIONS[:6]:
            for statement in step:
                db.execute(statement)
        for request_id, guild_id, user_id, images in [
            (1, GUILD, 42, [300, 200]),
            (7, 0, 43, [50]),
            (9, GUILD, 44, [1]),
        ]:
            db.execute(
                "INSERT INTO requests (id, guild_id, channel_id, user_id, task, prompt, params, created_at)"
                " VALUES (?, ?, 3, ?, 'cats', '<image>', '{}', '2026-01-01T00:00:00+00:00')",
                (request_id, guild_id, user_id),
            )
            db.executemany(
                "INSERT INTO request_images VALUES (?, ?, ?)",
                [(request_id, n, bytes(size)) for n, size in enumerate(images, 1)],
            )
        db.execute("PRAGMA user_version = 6")
        db.commit()
    migrated_at = int(time.time()) * 1000
    storage = await Storage.open(path)
    try:
        assert accounted(path) == {(GUILD, 0): 501, (0, 43): 50}
        # Ids given before may have been reused already: new ones start past any of them.
        assert await save(storage, GUILD, 10) > migrated_at
    finally:
        await storage.close()


def test_a_servers_share_cannot_exceed_the_total() -> None:
    with pytest.raises(ValueError, match="request_images_per_server_mb 300 is above request_images_mb 200"):
        StorageSettings(request_images_mb=200, request_images_per_server_mb=300)
    assert RequestBudget.of(StorageSettings(request_images_mb=2, request_images_per_server_mb=0.5)) == RequestBudget(
        2 * 2**20, 2**19
    )
