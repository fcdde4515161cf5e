from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path

import pytest

from core.config import PROJECT_ROOT
from core.errors import ExampleNotFound, LimitReached, TaskExists, UnknownTask
from core.storage.database import MIGRATIONS, backup_database
from core.storage.task_store import StoredTask, TaskStore

ROOT = PROJECT_ROOT
GUILD = 1
OTHER_GUILD = 2
MAX = 10


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "tasks.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[TaskStore]:
    store = await TaskStore.open(db_path)
    yield store
    await store.close()


async def make_cats(store: TaskStore, guild_id: int = GUILD, count: int = 3, name: str = "Cats") -> None:
    examples = [(f"jpeg-{i}".encode(), f"text {i}", 42) for i in range(1, count + 1)]
    await store.create_task(
        guild_id, name, "Cat captions", "A photo of", 42, max_tasks=MAX, max_image_bytes=2**30, examples=examples
    )


async def texts(store: TaskStore, guild_id: int = GUILD, name: str = "cats") -> list[str]:
    task = await store.get_task(guild_id, name)
    assert task is not None
    assert [e.position for e in task.examples] == list(range(1, len(task.examples) + 1))
    return [e.text for e in task.examples]


async def revision(store: TaskStore, guild_id: int = GUILD, name: str = "cats") -> int:
    task = await store.get_task(guild_id, name)
    assert task is not None
    return task.revision


def raw(path: Path, sql: str) -> list[tuple]:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchall()


# Opening and migrating


async def test_open_creates_the_directory_and_migrates_an_empty_file_to_the_latest_version(db_path: Path) -> None:
    store = await TaskStore.open(db_path)
    await store.close()
    assert store.schema_version == len(MIGRATIONS) == 9
    assert raw(db_path, "PRAGMA user_version") == [(9,)]
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]
    tables = {row[0] for row in raw(db_path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {
        "tasks",
        "examples",
        "guild_settings",
        "requests",
        "request_images",
        "departed_guilds",
        "request_counters",
        "request_bytes",
        "task_image_bytes",
        "usage_counts",
    }
    reopened = await TaskStore.open(db_path)
    assert reopened.schema_version == 9
    await reopened.close()


async def test_open_migrates_a_version_1_database_and_keeps_its_data(db_path: Path) -> None:
    db_path.parent.mkdir()
    with closing(sqlite3.connect(db_path)) as db:
        for statement in MIGRATIONS[0]:
            db.execute(statement)
        db.execute(
            "INSERT INTO tasks (guild_id, name, name_key, description, prompt_template, created_by, created_at,"
            " updated_at, revision) VALUES (1, 'Cats', 'cats', 'd', 'p', 7, ?, ?, 4)",
            ("2024-01-01T00:00:00+00:00", "2024-01-02T00:00:00+00:00"),
        )
        db.execute(
            "INSERT INTO examples VALUES (1, 1, 'a cat', ?, ?)", (b"jpeg-1", hashlib.sha256(b"jpeg-1").hexdigest())
        )
        db.execute("PRAGMA user_version = 1")
        db.commit()

    store = await TaskStore.open(db_path)
    try:
        assert store.schema_version == len(MIGRATIONS)
        task = await store.get_task(GUILD, "CATS")
        assert task is not None
        assert (task.name, task.revision, task.examples[0].text, task.examples[0].image) == (
            "Cats",
            4,
            "a cat",
            b"jpeg-1",
        )
        assert await store.get_default_task(GUILD) is None
        await store.set_default_task(GUILD, "Cats")
        assert await store.get_default_task(GUILD) == "Cats"
    finally:
        await store.close()


async def test_open_refuses_a_database_newer_than_the_code(db_path: Path) -> None:
    db_path.parent.mkdir()
    with closing(sqlite3.connect(db_path)) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this code knows"):
        await TaskStore.open(db_path)
    assert raw(db_path, "PRAGMA user_version") == [(len(MIGRATIONS) + 1,)]


# Tasks


async def test_create_task_stores_every_field_and_get_task_matches_any_case(store: TaskStore) -> None:
    await make_cats(store, count=2)
    task = await store.get_task(GUILD, "cAtS")
    assert task is not None
    assert (task.guild_id, task.name, task.description, task.prompt_template, task.created_by, task.revision) == (
        GUILD,
        "Cats",
        "Cat captions",
        "A photo of",
        42,
        1,
    )
    assert task.created_at.tzinfo is not None
    assert task.updated_at == task.created_at
    assert [(e.position, e.text, e.image) for e in task.examples] == [
        (1, "text 1", b"jpeg-1"),
        (2, "text 2", b"jpeg-2"),
    ]
    assert task.examples[0].image_sha256 == hashlib.sha256(b"jpeg-1").hexdigest()
    assert await store.get_task(GUILD, "dogs") is None


@pytest.mark.parametrize("name", ["cats", "CATS", "Cats"])
async def test_create_task_refuses_a_name_that_differs_only_in_case(store: TaskStore, name: str) -> None:
    await make_cats(store)
    with pytest.raises(TaskExists, match="already has a task called “Cats”"):
        await store.create_task(GUILD, name, "d", "p", 1, max_tasks=MAX, max_image_bytes=2**30)


async def test_names_compare_by_unicode_casefold_not_only_ascii(store: TaskStore) -> None:
    await store.create_task(GUILD, "Été", "d", "p", 1, max_tasks=MAX, max_image_bytes=2**30)
    with pytest.raises(TaskExists):
        await store.create_task(GUILD, "ÉTÉ", "d", "p", 1, max_tasks=MAX, max_image_bytes=2**30)
    assert (await store.get_task(GUILD, "été")) is not None


async def test_create_task_beyond_the_guild_cap_raises_limit_reached(store: TaskStore) -> None:
    await store.create_task(GUILD, "a", "d", "p", 1, max_tasks=2, max_image_bytes=2**30)
    await store.create_task(GUILD, "b", "d", "p", 1, max_tasks=2, max_image_bytes=2**30)
    with pytest.raises(LimitReached, match="already has 2 tasks, the most it may have"):
        await store.create_task(GUILD, "c", "d", "p", 1, max_tasks=2, max_image_bytes=2**30)
    await store.create_task(OTHER_GUILD, "c", "d", "p", 1, max_tasks=2, max_image_bytes=2**30)
    assert await store.count_tasks(GUILD) == 2


async def test_a_guilds_task_images_are_bounded_in_bytes(store: TaskStore) -> None:
    big, small = b"x" * 600, b"y" * 300
    await store.create_task(
        GUILD, "cats", "d", "p", 1, max_tasks=MAX, max_image_bytes=1000, examples=[(big, "t", 1), (small, "t", 1)]
    )
    assert await store.image_bytes(GUILD) == 900
    with pytest.raises(LimitReached, match="may take 1000 B in all; 100 B are left, and these need 300 B"):
        await store.add_example(GUILD, "cats", small, "t", max_examples=MAX, max_image_bytes=1000, added_by=1)
    with pytest.raises(LimitReached, match="100 B are left, and these need 900 B"):
        await store.create_task(
            GUILD, "copy", "d", "p", 1, max_tasks=MAX, max_image_bytes=1000, examples=[(big, "t", 1), (small, "t", 1)]
        )
    assert [s.name for s in await store.list_tasks(GUILD)] == ["cats"]
    assert await store.image_bytes(GUILD) == 900
    await store.create_task(GUILD, "empty", "d", "p", 1, max_tasks=MAX, max_image_bytes=1000)  # no images, no bytes
    await store.create_task(
        OTHER_GUILD, "cats", "d", "p", 1, max_tasks=MAX, max_image_bytes=1000, examples=[(big, "t", 1)]
    )
    await store.remove_example(GUILD, "cats", 1)
    assert await store.add_example(GUILD, "cats", small, "t", max_examples=MAX, max_image_bytes=1000, added_by=1) == 2
    assert await store.image_bytes(GUILD) == 600
    await store.check_image_room(GUILD, max_image_bytes=601)  # room for one byte more
    full = "already take all of the 600 B they may; remove some examples or tasks first"
    with pytest.raises(LimitReached, match=full):
        await store.check_image_room(GUILD, max_image_bytes=600)
    with pytest.raises(LimitReached, match=full):
        await store.add_example(GUILD, "cats", b"z", "t", max_examples=MAX, max_image_bytes=600, added_by=1)


async def test_a_failed_change_leaves_nothing_behind(store: TaskStore) -> None:
    with pytest.raises(TypeError):  # hashing the bad image fails after the task row was inserted
        await store.create_task(
            GUILD, "cats", "d", "p", 1, max_tasks=MAX, max_image_bytes=2**30, examples=[("not bytes", "t", 1)]
        )  # type: ignore[list-item]
    assert await store.count_tasks(GUILD) == 0


async def test_list_tasks_sorts_case_insensitively_and_counts_examples(store: TaskStore) -> None:
    await make_cats(store, count=2, name="banana")
    await make_cats(store, count=0, name="Apple")
    await make_cats(store, count=1, name="cherry")
    summaries = await store.list_tasks(GUILD)
    assert [(s.name, s.example_count, s.revision) for s in summaries] == [
        ("Apple", 0, 1),
        ("banana", 2, 1),
        ("cherry", 1, 1),
    ]
    assert await store.count_tasks(GUILD) == 3
    assert await store.list_tasks(OTHER_GUILD) == []


async def test_update_task_changes_only_the_given_fields(store: TaskStore) -> None:
    await make_cats(store)
    await store.update_task(GUILD, "CATS", description="new description")
    await store.update_task(GUILD, "cats", prompt_template="new template")
    task = await store.get_task(GUILD, "cats")
    assert task is not None
    assert (task.description, task.prompt_template, task.revision) == ("new description", "new template", 3)
    assert task.updated_at > task.created_at


async def test_rename_task_allows_a_change_of_case_and_refuses_a_taken_name(store: TaskStore) -> None:
    await make_cats(store)
    await make_cats(store, name="Dogs")
    await store.rename_task(GUILD, "cats", "CATS")
    assert [s.name for s in await store.list_tasks(GUILD)] == ["CATS", "Dogs"]
    with pytest.raises(TaskExists, match="already has a task called “Dogs”"):
        await store.rename_task(GUILD, "cats", "dogs")
    await store.rename_task(GUILD, "cats", "Kittens")
    assert await store.get_task(GUILD, "cats") is None
    assert await texts(store, name="kittens") == ["text 1", "text 2", "text 3"]


async def test_the_guild_default_follows_a_rename_and_is_cleared_by_a_delete(store: TaskStore) -> None:
    await make_cats(store)
    await store.set_default_task(GUILD, "cats")
    await store.rename_task(GUILD, "Cats", "Kittens")
    assert await store.get_default_task(GUILD) == "Kittens"
    await store.delete_task(GUILD, "kittens")
    assert await store.get_default_task(GUILD) is None


async def test_a_default_naming_another_task_survives_renames_and_deletes(store: TaskStore) -> None:
    await make_cats(store)
    await store.set_default_task(GUILD, "caption")  # a built-in task, not in the table
    await store.rename_task(GUILD, "cats", "Kittens")
    await store.delete_task(GUILD, "kittens")
    assert await store.get_default_task(GUILD) == "caption"
    await store.set_default_task(GUILD, None)
    assert await store.get_default_task(GUILD) is None


async def test_delete_task_removes_its_examples(store: TaskStore, db_path: Path) -> None:
    await make_cats(store)
    await make_cats(store, name="Dogs", count=2)
    await store.delete_task(GUILD, "CATS")
    assert await store.get_task(GUILD, "cats") is None
    assert raw(db_path, "SELECT count(*) FROM examples") == [(2,)]


UNKNOWN_TASK_CALLS: dict[str, Callable[[TaskStore], Awaitable[object]]] = {
    "update": lambda s: s.update_task(GUILD, "dogs", description="d"),
    "rename": lambda s: s.rename_task(GUILD, "dogs", "wolves"),
    "delete": lambda s: s.delete_task(GUILD, "dogs"),
    "add": lambda s: s.add_example(GUILD, "dogs", b"jpeg", "t", max_examples=MAX, max_image_bytes=2**30, added_by=42),
    "edit": lambda s: s.edit_example(GUILD, "dogs", 1, "t"),
    "remove": lambda s: s.remove_example(GUILD, "dogs", 1),
    "move": lambda s: s.move_example(GUILD, "dogs", 1, 2),
}


@pytest.mark.parametrize("call", UNKNOWN_TASK_CALLS.values(), ids=UNKNOWN_TASK_CALLS.keys())
async def test_changes_to_an_unknown_task_raise_unknown_task(
    store: TaskStore, call: Callable[[TaskStore], Awaitable[object]]
) -> None:
    await make_cats(store, guild_id=OTHER_GUILD, name="dogs")
    with pytest.raises(UnknownTask, match="This server has no task called “dogs”"):
        await call(store)


# Examples


async def test_add_example_appends_and_stops_at_the_cap(store: TaskStore) -> None:
    await make_cats(store, count=1)
    assert (
        await store.add_example(GUILD, "CATS", b"jpeg-2", "text 2", max_examples=2, max_image_bytes=2**30, added_by=42)
        == 2
    )
    with pytest.raises(LimitReached, match="“Cats” already has 2 examples, the most a task may have"):
        await store.add_example(GUILD, "cats", b"jpeg-3", "text 3", max_examples=2, max_image_bytes=2**30, added_by=42)
    task = await store.get_task(GUILD, "cats")
    assert task is not None
    assert task.examples[1].image_sha256 == hashlib.sha256(b"jpeg-2").hexdigest()
    assert await texts(store) == ["text 1", "text 2"]


async def test_edit_example_changes_only_that_text(store: TaskStore) -> None:
    await make_cats(store)
    await store.edit_example(GUILD, "cats", 2, "edited")
    assert await texts(store) == ["text 1", "edited", "text 3"]


@pytest.mark.parametrize(
    ("position", "expected"), [(1, ["text 2", "text 3"]), (2, ["text 1", "text 3"]), (3, ["text 1", "text 2"])]
)
async def test_remove_example_moves_later_examples_up(store: TaskStore, position: int, expected: list[str]) -> None:
    await make_cats(store)
    await store.remove_example(GUILD, "cats", position)
    assert await texts(store) == expected


@pytest.mark.parametrize(("position", "new_position"), [(1, 4), (4, 1), (2, 3), (3, 2), (1, 2), (2, 2)])
async def test_move_example_shifts_the_others(store: TaskStore, position: int, new_position: int) -> None:
    await make_cats(store, count=4)
    expected = ["text 1", "text 2", "text 3", "text 4"]
    expected.insert(new_position - 1, expected.pop(position - 1))
    await store.move_example(GUILD, "cats", position, new_position)
    assert await texts(store) == expected


POSITION_CALLS: dict[str, Callable[[TaskStore, int], Awaitable[object]]] = {
    "edit": lambda s, p: s.edit_example(GUILD, "cats", p, "t"),
    "remove": lambda s, p: s.remove_example(GUILD, "cats", p),
    "move from": lambda s, p: s.move_example(GUILD, "cats", p, 1),
    "move to": lambda s, p: s.move_example(GUILD, "cats", 1, p),
}


@pytest.mark.parametrize("position", [0, 4, -1])
@pytest.mark.parametrize("call", POSITION_CALLS.values(), ids=POSITION_CALLS.keys())
async def test_a_position_outside_the_examples_raises_example_not_found(
    store: TaskStore, call: Callable[[TaskStore, int], Awaitable[object]], position: int
) -> None:
    await make_cats(store)
    with pytest.raises(ExampleNotFound, match=f"Task “Cats” has no example {position}; it has 3"):
        await call(store, position)
    assert await texts(store) == ["text 1", "text 2", "text 3"]
    assert await revision(store) == 1


async def test_every_change_bumps_the_revision(store: TaskStore) -> None:
    await make_cats(store)
    changes: list[Callable[[], Awaitable[object]]] = [
        lambda: store.update_task(GUILD, "cats", description="d"),
        lambda: store.rename_task(GUILD, "cats", "CATS"),
        lambda: store.add_example(
            GUILD, "cats", b"jpeg-4", "text 4", max_examples=MAX, max_image_bytes=2**30, added_by=42
        ),
        lambda: store.edit_example(GUILD, "cats", 1, "t"),
        lambda: store.move_example(GUILD, "cats", 1, 2),
        lambda: store.remove_example(GUILD, "cats", 1),
    ]
    for expected, change in enumerate(changes, start=2):
        await change()
        assert await revision(store) == expected


async def test_concurrent_add_example_calls_get_contiguous_positions(store: TaskStore) -> None:
    await make_cats(store, count=0)
    positions = await asyncio.gather(
        *(
            store.add_example(
                GUILD, "cats", f"jpeg-{i}".encode(), f"text {i}", max_examples=100, max_image_bytes=2**30, added_by=42
            )
            for i in range(40)
        )
    )
    assert sorted(positions) == list(range(1, 41))
    task = await store.get_task(GUILD, "cats")
    assert task is not None
    assert [e.position for e in task.examples] == list(range(1, 41))
    assert sorted(e.text for e in task.examples) == sorted(f"text {i}" for i in range(40))
    assert task.revision == 41


# Isolation between guilds


async def snapshot(store: TaskStore, guild_id: int) -> tuple[StoredTask | None, list, str | None]:
    return (
        await store.get_task(guild_id, "cats"),
        await store.list_tasks(guild_id),
        await store.get_default_task(guild_id),
    )


GUILD_CHANGES: dict[str, Callable[[TaskStore], Awaitable[object]]] = {
    "create": lambda s: s.create_task(GUILD, "Dogs", "d", "p", 1, max_tasks=MAX, max_image_bytes=2**30),
    "update": lambda s: s.update_task(GUILD, "cats", description="changed", prompt_template="changed"),
    "rename": lambda s: s.rename_task(GUILD, "cats", "Kittens"),
    "delete": lambda s: s.delete_task(GUILD, "cats"),
    "add": lambda s: s.add_example(
        GUILD, "cats", b"jpeg-9", "text 9", max_examples=MAX, max_image_bytes=2**30, added_by=42
    ),
    "edit": lambda s: s.edit_example(GUILD, "cats", 1, "edited"),
    "remove": lambda s: s.remove_example(GUILD, "cats", 1),
    "move": lambda s: s.move_example(GUILD, "cats", 1, 3),
    "default": lambda s: s.set_default_task(GUILD, "caption"),
}


@pytest.mark.parametrize("change", GUILD_CHANGES.values(), ids=GUILD_CHANGES.keys())
async def test_a_change_in_one_guild_leaves_a_same_named_task_in_another_untouched(
    store: TaskStore, change: Callable[[TaskStore], Awaitable[object]]
) -> None:
    for guild_id in (GUILD, OTHER_GUILD):
        await make_cats(store, guild_id=guild_id)
        await store.set_default_task(guild_id, "Cats")
    before, other_before = await snapshot(store, GUILD), await snapshot(store, OTHER_GUILD)
    await change(store)
    assert await snapshot(store, GUILD) != before
    assert await snapshot(store, OTHER_GUILD) == other_before


# Crash safety and backups

CRASH_SCRIPT = """
import asyncio, json, os, sys
from pathlib import Path
from core.storage.task_store import TaskStore

async def main(path, operation):
    store = await TaskStore.open(Path(path))

    async def crash_instead_of_commit():
        rows = await store._db.execute_fetchall("SELECT text, length(image) FROM examples ORDER BY position")
        print(json.dumps([list(row) for row in rows]), flush=True)
        os._exit(1)

    store._db.commit = crash_instead_of_commit
    if operation == "add":
        await store.add_example(1, "cats", b"jpeg-new", "new", max_examples=10, max_image_bytes=2**30, added_by=42)
    else:
        await store.move_example(1, "cats", 1, 3)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("operation", "uncommitted"),
    [
        ("add", [["text 1", 6], ["text 2", 6], ["text 3", 6], ["new", 8]]),
        ("move", [["text 2", 6], ["text 3", 6], ["text 1", 6]]),
    ],
)
async def test_a_crash_before_commit_leaves_the_old_state(
    db_path: Path, operation: str, uncommitted: list[list[object]]
) -> None:
    store = await TaskStore.open(db_path)
    await make_cats(store)
    await store.close()

    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(db_path), operation],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert crashed.returncode == 1, crashed.stderr
    assert json.loads(crashed.stdout) == uncommitted  # the change was written, only the commit never ran

    store = await TaskStore.open(db_path)
    try:
        assert await texts(store) == ["text 1", "text 2", "text 3"]
        assert await revision(store) == 1
    finally:
        await store.close()
    assert raw(db_path, "PRAGMA integrity_check") == [("ok",)]


async def test_backup_holds_only_committed_changes_while_the_bot_writes(
    store: TaskStore, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_cats(store, count=1)
    commit = store._db.commit

    async def backup_then_commit() -> None:
        backup_database(db_path, tmp_path / "during.db")
        await commit()

    monkeypatch.setattr(store._db, "commit", backup_then_commit)
    await store.add_example(GUILD, "cats", b"jpeg-2", "text 2", max_examples=MAX, max_image_bytes=2**30, added_by=42)
    backup_database(db_path, tmp_path / "backups" / "after.db")

    for backup, expected in (
        (tmp_path / "during.db", ["text 1"]),
        (tmp_path / "backups" / "after.db", ["text 1", "text 2"]),
    ):
        assert raw(backup, "PRAGMA integrity_check") == [("ok",)]
        copy = await TaskStore.open(backup)
        try:
            assert await texts(copy) == expected
        finally:
            await copy.close()


def test_backup_of_a_missing_database_fails_instead_of_copying_an_empty_one(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        backup_database(tmp_path / "missing.db", tmp_path / "backup.db")
    assert not (tmp_path / "missing.db").exists()


async def test_a_cancelled_change_leaves_the_store_usable(store: TaskStore) -> None:
    await make_cats(store, count=0)
    for yields in range(12):  # cancel at a different await inside the change each time
        change = asyncio.create_task(
            store.add_example(
                GUILD, "cats", b"jpeg", "cancelled", max_examples=MAX * 10, max_image_bytes=2**30, added_by=42
            )
        )
        for _ in range(yields):
            await asyncio.sleep(0)
        change.cancel()
        await asyncio.gather(change, return_exceptions=True)
        await store.add_example(
            GUILD, "cats", b"jpeg", "kept", max_examples=MAX * 10, max_image_bytes=2**30, added_by=42
        )
    assert (await texts(store)).count("kept") == 12
