"""The bot's one SQLite file through aiosqlite: connection, schema migrations and transactions.

Every change runs in one ``BEGIN IMMEDIATE`` transaction under an ``asyncio.Lock``: the bot shares
one connection between coroutines, and without the lock the statements of two changes would
interleave inside one transaction. Reads take the lock too, so they never see another coroutine's
uncommitted rows. The stores built on this class (tasks, guild settings, stored requests, usage
counts) each keep their own queries; every query names the guild or the user it serves.

A write SQLite cannot make at all (disk full, read-only or failing file, write lock held too long)
raises ``StorageUnavailable`` and marks the database degraded (``WriteState``) until a write is
taken again: the bot keeps answering, and says changes cannot be saved, instead of failing as on a bug.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import aiosqlite

from core.errors import StorageUnavailable

log = logging.getLogger(__name__)

# How long a write waits for another process's write lock before it is refused (``StorageUnavailable``):
# within Discord's 3 seconds to acknowledge a command, so that the refusal can still be shown.
BUSY_TIMEOUT_MS = 2000

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
    (
        "ALTER TABLE guild_settings ADD COLUMN answer_channels TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE guild_settings ADD COLUMN required_role INTEGER",
        "ALTER TABLE guild_settings ADD COLUMN ephemeral_answers INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE guild_settings ADD COLUMN user_cooldown_seconds INTEGER",
        "ALTER TABLE guild_settings ADD COLUMN guild_in_flight INTEGER",
        "ALTER TABLE guild_settings ADD COLUMN guild_per_period INTEGER",
        "ALTER TABLE guild_settings ADD COLUMN report_channel INTEGER",
        "ALTER TABLE examples ADD COLUMN added_by INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE requests (
            id INTEGER PRIMARY KEY,
            guild_id INTEGER NOT NULL,
            channel_id INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            task TEXT NOT NULL,
            prompt TEXT NOT NULL,
            params TEXT NOT NULL,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE request_images (
            request_id INTEGER NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            image BLOB NOT NULL,
            UNIQUE (request_id, position)
        )""",
        "CREATE INDEX requests_by_user ON requests (user_id)",
        "CREATE INDEX requests_by_age ON requests (created_at)",
        "CREATE TABLE departed_guilds (guild_id INTEGER PRIMARY KEY, left_at TEXT NOT NULL)",
    ),
    ("ALTER TABLE guild_settings ADD COLUMN model TEXT",),
    ("ALTER TABLE requests ADD COLUMN model TEXT",),
    (
        "ALTER TABLE requests ADD COLUMN origin_user_id INTEGER",
        "CREATE INDEX requests_by_origin ON requests (origin_user_id)",
    ),
    (
        # Request ids never come back: a button on an old answer names its request by id, and SQLite
        # reuses the largest id once its row is deleted (every id, once retention has emptied the
        # table). Ids given before this step were reused too, so new ones start past any of them: at
        # the time in milliseconds, far more than requests ever made.
        # ``image_bytes``: stored images' bytes in all; ``request_bytes`` holds them per place (a
        # server, or a user's direct messages). Triggers keep both on every insert and delete, so the
        # storage budget never sums a table.
        "CREATE TABLE request_counters (last_id INTEGER NOT NULL, image_bytes INTEGER NOT NULL)",
        "ALTER TABLE requests ADD COLUMN image_bytes INTEGER NOT NULL DEFAULT 0",
        """UPDATE requests SET image_bytes =
            (SELECT coalesce(sum(length(image)), 0) FROM request_images WHERE request_id = requests.id)""",
        """INSERT INTO request_counters
            SELECT max(coalesce(max(id), 0), CAST(strftime('%s', 'now') AS INTEGER) * 1000),
                coalesce(sum(image_bytes), 0)
            FROM requests""",
        """CREATE TABLE request_bytes (
            guild_id INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            PRIMARY KEY (guild_id, user_id)
        )""",
        """INSERT INTO request_bytes SELECT guild_id, CASE WHEN guild_id = 0 THEN user_id ELSE 0 END, sum(image_bytes)
            FROM requests GROUP BY 1, 2""",
        """CREATE TRIGGER request_added AFTER INSERT ON requests BEGIN
            INSERT INTO request_bytes VALUES
                (new.guild_id, CASE WHEN new.guild_id = 0 THEN new.user_id ELSE 0 END, new.image_bytes)
            ON CONFLICT (guild_id, user_id) DO UPDATE SET bytes = bytes + excluded.bytes;
            UPDATE request_counters SET last_id = max(last_id, new.id), image_bytes = image_bytes + new.image_bytes;
        END""",
        """CREATE TRIGGER request_removed AFTER DELETE ON requests BEGIN
            UPDATE request_bytes SET bytes = bytes - old.image_bytes
            WHERE guild_id = old.guild_id AND user_id = CASE WHEN old.guild_id = 0 THEN old.user_id ELSE 0 END;
            UPDATE request_counters SET image_bytes = image_bytes - old.image_bytes;
        END""",
        # The oldest of a place first: a server's requests, and a user's in direct messages.
        "CREATE INDEX requests_by_guild ON requests (guild_id, id)",
        "CREATE INDEX requests_in_direct_messages ON requests (user_id, id) WHERE guild_id = 0",
    ),
    (
        # All servers' task images' bytes together, against ``limits.max_all_task_images_mb``: kept by
        # triggers, as ``request_counters`` is, since summing them reads every example's row.
        # Deleting a task deletes its examples through the foreign key, which fires the trigger too.
        "CREATE TABLE task_image_bytes (bytes INTEGER NOT NULL)",
        "INSERT INTO task_image_bytes SELECT coalesce(sum(length(image)), 0) FROM examples",
        """CREATE TRIGGER example_added AFTER INSERT ON examples BEGIN
            UPDATE task_image_bytes SET bytes = bytes + length(new.image);
        END""",
        """CREATE TRIGGER example_removed AFTER DELETE ON examples BEGIN
            UPDATE task_image_bytes SET bytes = bytes - length(old.image);
        END""",
        """CREATE TRIGGER example_image_replaced AFTER UPDATE OF image ON examples BEGIN
            UPDATE task_image_bytes SET bytes = bytes - length(old.image) + length(new.image);
        END""",
    ),
    (
        # ``/settings usage``: a server's requests per day and hour (UTC), task and outcome, with the
        # tokens its answers generated; one row per combination, added to by one UPSERT per request.
        # Kept apart from ``requests`` and naming no user, so the counts outlive retention and
        # /forget-me; ``day`` alone is indexed for purging the days no report reads any more.
        """CREATE TABLE usage_counts (
            guild_id INTEGER NOT NULL,
            day TEXT NOT NULL,
            hour INTEGER NOT NULL,
            task TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('answered', 'refused', 'failed', 'cancelled')),
            requests INTEGER NOT NULL,
            tokens INTEGER NOT NULL,
            PRIMARY KEY (guild_id, day, hour, task, outcome)
        ) WITHOUT ROWID""",
        "CREATE INDEX usage_by_day ON usage_counts (day)",
    ),
)


def now_text() -> str:
    return datetime.now(UTC).isoformat()


# SQLite's primary result codes for a write it cannot make whatever the change: another process held
# the write lock past the busy timeout, the file is read-only, failing or cannot be opened, the disk
# is full. Any other error (a constraint, a wrong query) is the change's own, and a bug.
_REFUSED_WRITE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_FULL,
    }
)


def _write_refusal(error: BaseException) -> str | None:
    """SQLite's reason, when ``error`` says the database takes no writes now; None for any other error."""
    code = getattr(error, "sqlite_errorcode", None) if isinstance(error, sqlite3.Error) else None
    if code is None or code & 0xFF not in _REFUSED_WRITE_CODES:
        return None
    return f"{getattr(error, 'sqlite_errorname', code)}: {error}"


@dataclass
class WriteState:
    """Whether the database takes writes: for /health, /admin status and the metrics."""

    refusal: str | None = None  # why the last write was refused, in SQLite's words; None: writes are taken
    refused: int = 0  # writes refused since the database was opened

    @property
    def degraded(self) -> bool:
        return self.refusal is not None


class Database:
    """One connection; open it with ``await SomeStore.open(path)``."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self.schema_version = 0
        self.writes = WriteState()

    @classmethod
    async def open(cls, path: Path) -> Self:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A path that cannot be opened fails here: aiosqlite's worker thread outlives a failed connect
        # and then reports to an event loop that may be closed (a traceback after the one error line).
        await asyncio.to_thread(lambda: sqlite3.connect(path).close())
        # isolation_level=None: the store writes BEGIN itself, so sqlite3 never opens or commits behind its back.
        db = await aiosqlite.connect(path, isolation_level=None)
        db.row_factory = sqlite3.Row
        store = cls(db)
        try:
            for pragma in ("journal_mode = WAL", "foreign_keys = ON", f"busy_timeout = {BUSY_TIMEOUT_MS}"):
                await db.execute(f"PRAGMA {pragma}")
            await store._migrate()
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        """After the change in progress, if any: closing under it would lose it half-done."""
        async with self._lock:
            await self._db.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One atomic change; IMMEDIATE takes the write lock first, so no read-then-write upgrade can fail.

        BEGIN and COMMIT sit inside the ``try``: a change cancelled while either is queued still ends its
        transaction, instead of leaving the shared connection inside it. A write the database refuses
        raises ``StorageUnavailable``; one that changed rows ends the degraded state.
        """
        async with self._lock:
            changes = self._db.total_changes
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                await self._db.commit()
            except BaseException as error:
                refusal = _write_refusal(error)
                try:
                    await self._db.rollback()
                except Exception:  # the connection itself failed: what stopped the change says more
                    if refusal is None:  # a refusal's failed rollback (a failing disk) is told by the refusal
                        log.warning("rolling back failed", exc_info=True)
                if refusal is None:
                    raise
                raise self._refused(refusal) from error
            if self._db.total_changes != changes:  # a transaction that changed nothing wrote nothing
                self._taken()

    def _refused(self, refusal: str) -> StorageUnavailable:
        """Counted every time, logged once when writes stop being taken: not a traceback per request
        for as long as the disk stays full."""
        writes = self.writes
        writes.refused += 1
        if writes.refusal is None:
            log.error(
                "the database refuses writes (%s): answers are posted unstored and changes are refused "
                "until a write succeeds",
                refusal,
            )
        writes.refusal = refusal
        return StorageUnavailable(refusal)

    def _taken(self) -> None:
        if self.writes.refusal is not None:
            log.warning("the database takes writes again (it refused them: %s)", self.writes.refusal)
            self.writes.refusal = None

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


def backup_database(source: Path, target: Path) -> None:
    """Copy a consistent snapshot with SQLite's online backup API, safe while the bot writes.

    It blocks: call it through ``asyncio.to_thread`` from the bot. The source is opened read-only, so a
    wrong path fails instead of backing up a new empty file; the copy lands in one transaction on the target.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    source_uri = f"{source.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(source_uri, uri=True)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)
