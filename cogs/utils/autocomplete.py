"""Task and model names offered as the user types, wherever a command asks for one."""

from __future__ import annotations

from discord import app_commands

from cogs.utils.answering import asker_of
from cogs.utils.bot import Interaction
from core.errors import NotAllowedHere
from core.serving.model_choice import short_name

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


async def model_names(interaction: Interaction, current: str) -> list[app_commands.Choice[str]]:
    """Every model this bot knows, those that cannot run here too: choosing one says why."""
    models = interaction.client.models
    typed = current.casefold()
    # A choice's value holds at most 100 characters: a longer folder name can still be typed.
    names = [m for m in models.choices if typed in short_name(m).casefold() and len(short_name(m)) <= 100]
    offered = models.offered()
    return [
        app_commands.Choice(
            name=(models.describe(m) if m in offered else f"{short_name(m)} (cannot run here)")[:100],
            value=short_name(m),
        )
        for m in names[:MAX_CHOICES]
    ]
