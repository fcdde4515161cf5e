"""Task names offered as the user types, wherever a command asks for a task."""

from __future__ import annotations

from discord import app_commands

from cogs.utils.answering import asker_of
from cogs.utils.bot import Interaction
from core.errors import NotAllowedHere

# Discord shows at most 25 choices and refuses a longer list; discord.py does not cut it.
MAX_CHOICES = 25


async def task_names(interaction: Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Cannot be deferred, so it must answer from the database within Discord's 3 seconds. Members the
    server's channels or role keep from its library are offered nothing; those who manage the server
    change tasks anywhere, so they are offered every name."""
    bot = interaction.client
    if not interaction.permissions.manage_guild:
        try:
            await bot.asking.check_allowed(asker_of(interaction))
        except NotAllowedHere:
            return []
    names = await bot.library.names_like(interaction.guild_id, current, limit=MAX_CHOICES)
    return [app_commands.Choice(name=name, value=name) for name in names]
