"""Task names offered as the user types, wherever a command asks for a task."""

from __future__ import annotations

from discord import app_commands

from cogs.utils.bot import Interaction

# Discord shows at most 25 choices and refuses a longer list; discord.py does not cut it.
MAX_CHOICES = 25


async def task_names(interaction: Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Cannot be deferred, so it must answer from the database within Discord's 3 seconds."""
    library = interaction.client.library
    names = await library.names_like(interaction.guild_id, current, limit=MAX_CHOICES)
    return [app_commands.Choice(name=name, value=name) for name in names]
