"""Permission rules: each declares Discord's default permission and checks it at run time too.

Server admins can override ``default_permissions`` in their integration settings, so the run-time
check is what actually protects a guild's tasks.
"""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands
from discord.ext import commands


class ManageServerGroup(app_commands.Group):
    """A command group for changing a guild's data: Manage Server, in guilds only."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            guild_only=True,
            allowed_contexts=app_commands.AppCommandContext(guild=True),
            default_permissions=discord.Permissions(manage_guild=True),
            **kwargs,
        )

    async def interaction_check(self, interaction: discord.Interaction[Any]) -> bool:
        return _manages_the_server(interaction)


class ManageServerSubgroup(app_commands.Group):
    """A group inside a ``ManageServerGroup``: discord.py asks only a command's own parent."""

    async def interaction_check(self, interaction: discord.Interaction[Any]) -> bool:
        return _manages_the_server(interaction)


def server_id(interaction: discord.Interaction[Any]) -> int:
    """The server a guild-only command runs in (Discord never sends one elsewhere; a forged one is refused)."""
    if interaction.guild_id is None:
        raise app_commands.NoPrivateMessage()
    return interaction.guild_id


def _manages_the_server(interaction: discord.Interaction[Any]) -> bool:
    """Checked by the bot too: a server's admins may show the commands to anyone in its settings."""
    if interaction.guild_id is None:
        raise app_commands.NoPrivateMessage()
    if not interaction.permissions.manage_guild:
        raise app_commands.MissingPermissions(["manage_guild"])
    return True


class NotOwner(app_commands.CheckFailure):
    """Raised for anyone but the bot's owner."""


class OwnerGroup(app_commands.Group):
    """Commands for the bot's owner (from config, else the application's owner or team).

    Shown only to the admin guild's administrators, whom its admins may change in the server's
    integration settings; only the owner may run them whoever sees them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(guild_only=True, default_permissions=discord.Permissions(administrator=True), **kwargs)

    async def interaction_check(self, interaction: discord.Interaction[commands.Bot]) -> bool:  # type: ignore[override]  # discord.py declares any client; the owner is a commands.Bot's
        if not await interaction.client.is_owner(interaction.user):
            raise NotOwner()
        return True
