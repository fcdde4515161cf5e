"""Each server's settings in the bot's database, changed only in whole transactions."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable
from typing import Any

from core.errors import BadParameter
from core.guild_settings import MAX_ANSWER_CHANNELS, GuildSettings
from core.storage.database import Database

_COLUMNS = tuple(f.name for f in dataclasses.fields(GuildSettings))


def _from_row(row: sqlite3.Row) -> GuildSettings:
    values: dict[str, Any] = dict(zip(_COLUMNS, row, strict=True))
    values["answer_channels"] = frozenset(json.loads(values["answer_channels"]))
    values["ephemeral_answers"] = bool(values["ephemeral_answers"])
    return GuildSettings(**values)


def _to_row(settings: GuildSettings) -> tuple[object, ...]:
    values = dataclasses.asdict(settings)
    values["answer_channels"] = json.dumps(sorted(settings.answer_channels))
    values["ephemeral_answers"] = int(settings.ephemeral_answers)
    return tuple(values[column] for column in _COLUMNS)


class GuildSettingsStore(Database):
    async def guild_settings(self, guild_id: int) -> GuildSettings:
        async with self._lock:
            row = await self._one(f"SELECT {', '.join(_COLUMNS)} FROM guild_settings WHERE guild_id = ?", (guild_id,))
        return GuildSettings() if row is None else _from_row(row)

    async def change_guild_settings(
        self, guild_id: int, change: Callable[[GuildSettings], GuildSettings]
    ) -> GuildSettings:
        """Read, change and write in one transaction, so two admins' changes never undo each other."""
        async with self._transaction() as db:
            row = await self._one(f"SELECT {', '.join(_COLUMNS)} FROM guild_settings WHERE guild_id = ?", (guild_id,))
            changed = change(GuildSettings() if row is None else _from_row(row))
            if len(changed.answer_channels) > MAX_ANSWER_CHANNELS:
                raise BadParameter(f"At most {MAX_ANSWER_CHANNELS} answer channels can be set.")
            updates = ", ".join(f"{column} = excluded.{column}" for column in _COLUMNS)
            await db.execute(
                f"""INSERT INTO guild_settings (guild_id, {", ".join(_COLUMNS)})
                VALUES (?, {", ".join("?" for _ in _COLUMNS)})
                ON CONFLICT (guild_id) DO UPDATE SET {updates}""",
                (guild_id, *_to_row(changed)),
            )
        return changed
