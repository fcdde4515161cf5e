"""Servers' usage counts: kept per server, day and hour (UTC) by task and outcome, apart from the
stored requests (so they outlive retention and /forget-me), and deleted with a departed server."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from core.config import PrivacySettings
from core.generation import GenerationParams
from core.storage import Storage
from core.storage.database import MIGRATIONS
from core.storage.request_store import RequestBudget
from core.usage import NO_TASK

GUILD, OTHER = 1, 2
ROOMY = RequestBudget(total=2**40, per_place=2**40)
TODAY = date(2026, 5, 20)


def at(days_ago: int, hour: int) -> datetime:
    return datetime.combine(TODAY - timedelta(days=days_ago), datetime.min.time(), UTC).replace(hour=hour)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = await Storage.open(tmp_path / "bot.db")
    yield storage
    await storage.close()


async def test_counts_add_up_per_day_hour_task_and_outcome_for_their_server_only(storage: Storage) -> None:
    for guild, task, outcome, tokens, when in [
        (GUILD, "caption", "answered", 12, at(0, 9)),
        (GUILD, "caption", "answered", 30, at(0, 9)),  # the same row, added to
        (GUILD, "vqa", "answered", 5, at(0, 9)),
        (GUILD, "caption", "refused", 0, at(0, 14)),
        (GUILD, NO_TASK, "refused", 0, at(2, 14)),
        (GUILD, "caption", "failed", 0, at(6, 23)),
        (GUILD, "vqa", "cancelled", 0, at(6, 0)),
        (GUILD, "caption", "answered", 99, at(7, 9)),  # a day before the last 7
        (OTHER, "caption", "answered", 1000, at(0, 9)),
    ]:
        await storage.count_request(guild, task, outcome, tokens, when)

    week = await storage.usage(GUILD, 7, TODAY)
    assert week.days == tuple(TODAY - timedelta(days=n) for n in range(6, -1, -1))
    assert (week.total.requests, week.total.tokens) == (7, 47)
    assert week.total.outcomes == {"answered": 3, "refused": 2, "failed": 1, "cancelled": 1}
    assert week.per_day() == {
        "answered": [0, 0, 0, 0, 0, 0, 3],
        "refused": [0, 0, 0, 0, 1, 0, 1],
        "failed": [1, 0, 0, 0, 0, 0, 0],
        "cancelled": [1, 0, 0, 0, 0, 0, 0],
    }
    tasks = week.per_task()
    assert list(tasks) == ["caption", "vqa", NO_TASK]  # busiest first
    assert (tasks["caption"].outcomes, tasks["caption"].tokens) == ({"answered": 2, "refused": 1, "failed": 1}, 42)
    assert (tasks["vqa"].outcomes, tasks["vqa"].tokens) == ({"answered": 1, "cancelled": 1}, 5)
    assert week.busiest_hours() == [(9, 3), (14, 2), (0, 1)]
    assert week.busiest_day() == (TODAY, 4)

    month = await storage.usage(GUILD, 30, TODAY)
    assert len(month.days) == 30 and (month.total.requests, month.total.tokens) == (8, 146)
    other = await storage.usage(OTHER, 7, TODAY)
    assert (other.total.requests, other.total.tokens) == (1, 1000)
    assert (await storage.usage(3, 30, TODAY)).counts == ()


async def test_counts_outlive_the_requests_retention_and_forget_me(storage: Storage) -> None:
    saved = {}
    for user_id in (42, 43):
        saved[user_id] = await storage.save_request(
            GUILD, 3, user_id, "caption", "<image>", GenerationParams(), [b"jpeg"], budget=ROOMY
        )
        await storage.count_request(GUILD, "caption", "answered", 10)
    assert (await storage.forget_user(42)).requests == 1
    later = datetime.now(UTC) + timedelta(hours=2)
    assert (await storage.purge(PrivacySettings(request_retention_hours=1), ROOMY, later)).requests == 1
    assert await storage.get_request(saved[43], GUILD, 43) is None
    report = await storage.usage(GUILD, 7)
    assert (report.total.requests, report.total.tokens) == (2, 20)


async def test_a_departed_servers_counts_go_with_its_other_data(storage: Storage) -> None:
    for guild in (GUILD, OTHER):
        await storage.count_request(guild, "caption", "answered", 10)
    await storage.mark_departed(GUILD)
    later = datetime.now(UTC) + timedelta(days=1)
    kept = await storage.purge(PrivacySettings(departed_guild_retention_days=2), ROOMY, later)
    assert kept.guilds == 0 and (await storage.usage(GUILD, 7)).total.requests == 1  # within the grace period
    purged = await storage.purge(PrivacySettings(departed_guild_retention_days=0), ROOMY, later)
    assert purged.guilds == 1
    assert (await storage.usage(GUILD, 7)).counts == ()
    assert (await storage.usage(OTHER, 7)).total.requests == 1


async def test_a_server_with_only_counts_left_while_the_bot_was_away_is_marked_departed(storage: Storage) -> None:
    await storage.count_request(GUILD, "caption", "answered", 10)
    await storage.reconcile_presence(set())
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert (await storage.purge(PrivacySettings(departed_guild_retention_days=0), ROOMY, later)).guilds == 1
    assert (await storage.usage(GUILD, 7)).counts == ()


async def test_counts_older_than_the_longest_report_are_purged(storage: Storage, tmp_path: Path) -> None:
    for days_ago in (0, 29, 30, 45):
        await storage.count_request(GUILD, "caption", "answered", 1, at(days_ago, 12))
    await storage.purge(PrivacySettings(), ROOMY, at(0, 23))
    with closing(sqlite3.connect(tmp_path / "bot.db")) as db:
        days = [row[0] for row in db.execute("SELECT day FROM usage_counts ORDER BY day")]
    assert days == [(TODAY - timedelta(days=29)).isoformat(), TODAY.isoformat()]


async def test_a_database_made_before_the_counts_upgrades_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    old = len(MIGRATIONS) - 1  # the schema before the usage counts
    with closing(sqlite3.connect(path)) as db:
        for step in MIGRATIONS[:old]:
            for statement in step:
                db.execute(statement)
        db.execute("INSERT INTO guild_settings (guild_id, default_task) VALUES (?, 'vqa')", (GUILD,))
        db.execute(f"PRAGMA user_version = {old}")
        db.commit()
    storage = await Storage.open(path)
    try:
        assert storage.schema_version == len(MIGRATIONS)
        assert (await storage.guild_settings(GUILD)).default_task == "vqa"
        await storage.count_request(GUILD, "vqa", "answered", 4)
        assert (await storage.usage(GUILD, 7)).total.tokens == 4
    finally:
        await storage.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        with pytest.raises(sqlite3.IntegrityError):  # only the report's four outcomes are ever counted
            db.execute("INSERT INTO usage_counts VALUES (1, '2026-05-20', 3, 'vqa', 'expired', 1, 0)")
