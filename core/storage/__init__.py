"""The bot's database as one object: tasks, server settings, stored requests and usage counts on one
connection.

Also the retention rules that span them: a server's data outlives the bot's departure only for a
configured grace period (so a kick by mistake loses nothing), requests expire, and usage counts are
kept as long as the longest report reads them, whatever becomes of the requests they counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.config import PrivacySettings
from core.storage.database import now_text
from core.storage.request_store import RequestBudget, RequestStore
from core.storage.settings_store import GuildSettingsStore
from core.storage.task_store import TaskStore
from core.storage.usage_store import UsageStore

# Every table holding a server's rows: reconciling presence reads them all, and a server gone long
# enough is deleted from each.
_SERVER_TABLES = ("tasks", "guild_settings", "requests", "request_bytes", "usage_counts", "departed_guilds")
_DEPARTED = "INSERT INTO departed_guilds (guild_id, left_at) VALUES (?, ?) ON CONFLICT (guild_id) DO NOTHING"


@dataclass(frozen=True)
class Purged:
    requests: int  # past their retention
    guilds: int
    over_budget: int  # requests deleted early, their images beyond the storage budget


@dataclass(frozen=True)
class Forgotten:
    requests: int  # deleted, with their pictures and prompts
    examples: int  # the person added to servers' tasks, still stored until they confirm


class Storage(TaskStore, GuildSettingsStore, RequestStore, UsageStore):
    async def forget_user(self, user_id: int) -> Forgotten:
        """``/forget-me``: the person's requests go (a batch per transaction, so that a gigabyte of
        them never holds every server's reads and writes for seconds), then, in one transaction, their
        name leaves the tasks they created and the examples they added are counted."""
        requests = await self.delete_user_requests(user_id)
        return Forgotten(requests, await self.forget_user_tasks(user_id))

    async def mark_departed(self, guild_id: int) -> None:
        async with self._transaction() as db:
            await db.execute(_DEPARTED, (guild_id, now_text()))

    async def mark_present(self, guild_id: int) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM departed_guilds WHERE guild_id = ?", (guild_id,))

    async def reconcile_presence(self, present: set[int]) -> None:
        """After connecting: Discord sends no join or leave for what changed while the bot was away,
        so the servers it is in are marked present, and servers with data it is no longer in, departed."""
        async with self._transaction() as db:
            known = await db.execute_fetchall(" UNION ".join(f"SELECT guild_id FROM {t}" for t in _SERVER_TABLES))
            for (guild_id,) in known:
                if guild_id == 0:  # direct messages' requests, which only expire
                    continue
                if guild_id in present:
                    await db.execute("DELETE FROM departed_guilds WHERE guild_id = ?", (guild_id,))
                else:
                    await db.execute(_DEPARTED, (guild_id, now_text()))

    async def purge(self, privacy: PrivacySettings, budget: RequestBudget, now: datetime | None = None) -> Purged:
        """Delete requests past their retention or beyond the budget, usage counts older than any report,
        and every row of servers the bot left long enough ago."""
        now = now or datetime.now(UTC)
        requests = await self.delete_requests_before(now - timedelta(hours=privacy.request_retention_hours))
        cutoff = (now - timedelta(days=privacy.departed_guild_retention_days)).isoformat()
        async with self._transaction() as db:
            await self._delete_old_usage(now)
            rows = await db.execute_fetchall("SELECT guild_id FROM departed_guilds WHERE left_at < ?", (cutoff,))
            guilds = [row[0] for row in rows]
            for guild_id in guilds:
                for table in _SERVER_TABLES:
                    await db.execute(f"DELETE FROM {table} WHERE guild_id = ?", (guild_id,))
        return Purged(requests, len(guilds), await self.trim_requests(budget))
