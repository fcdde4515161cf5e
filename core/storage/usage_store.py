"""Each server's usage counts (``core.usage``): one UPSERT per request's outcome, read back as a report.

A row per server, day and hour (UTC), task and outcome holds a number of requests and the tokens
their answers generated; no row names a member.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from core.storage.database import Database
from core.usage import KEPT_DAYS, Outcome, UsageCount, UsageReport

_COUNT = """INSERT INTO usage_counts (guild_id, day, hour, task, outcome, requests, tokens) VALUES (?, ?, ?, ?, ?, 1, ?)
    ON CONFLICT (guild_id, day, hour, task, outcome)
    DO UPDATE SET requests = requests + 1, tokens = tokens + excluded.tokens"""


class UsageStore(Database):
    async def count_request(
        self, guild_id: int, task: str, outcome: Outcome, tokens: int = 0, at: datetime | None = None
    ) -> None:
        """One request of a server ended as ``outcome``, now (or ``at``), having generated ``tokens``."""
        at = (at or datetime.now(UTC)).astimezone(UTC)
        async with self._transaction() as db:
            await db.execute(_COUNT, (guild_id, at.date().isoformat(), at.hour, task, outcome, tokens))

    async def usage(self, guild_id: int, days: int, today: date | None = None) -> UsageReport:
        """The server's counts over the last ``days`` days, today (UTC) included."""
        today = today or datetime.now(UTC).date()
        first = today - timedelta(days=days - 1)
        async with self._lock:
            rows = await self._db.execute_fetchall(
                """SELECT day, hour, task, outcome, requests, tokens FROM usage_counts
                WHERE guild_id = ? AND day BETWEEN ? AND ?""",
                (guild_id, first.isoformat(), today.isoformat()),
            )
        counts = (UsageCount(date.fromisoformat(day), *rest) for day, *rest in rows)
        return UsageReport.ending(today, days, counts)

    async def _delete_old_usage(self, now: datetime) -> None:
        """Inside the caller's transaction: the days before the longest report, which nothing reads."""
        first_kept = now.astimezone(UTC).date() - timedelta(days=KEPT_DAYS - 1)
        await self._db.execute("DELETE FROM usage_counts WHERE day < ?", (first_kept.isoformat(),))
