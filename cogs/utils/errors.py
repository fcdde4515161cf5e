"""One place that turns any failure of a command into a short private reply.

Known errors (the domain's, and Discord's check failures) are explained; anything else is logged
once with an id the user can quote to the bot's owner.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import discord
from discord import app_commands

from cogs.utils.checks import NotOwner
from cogs.utils.replies import send_private
from core.errors import FlamingoError
from core.wording import quoted

log = logging.getLogger(__name__)

_PERMISSION_NAMES = {"manage_guild": "Manage Server", "manage_messages": "Manage Messages"}


def explain(error: Exception) -> str | None:
    """The message for an expected failure, or None for a bug."""
    cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
    if isinstance(cause, FlamingoError):
        return str(cause)
    if isinstance(cause, app_commands.MissingPermissions):
        names = " and ".join(_PERMISSION_NAMES.get(p, p.replace("_", " ").title()) for p in cause.missing_permissions)
        return f"You need the {names} permission in this server to do that."
    if isinstance(cause, app_commands.NoPrivateMessage):
        return "This command only works in a server."
    if isinstance(cause, NotOwner):
        return "Only the bot's owner can use this command."
    if isinstance(cause, app_commands.CommandNotFound | app_commands.CommandSignatureMismatch):
        return "This command is being updated; try again in a moment."
    if isinstance(cause, app_commands.TransformerError):
        return f"{quoted(str(cause.value))} is not a valid value for that option."
    if isinstance(cause, app_commands.CheckFailure):
        return "You are not allowed to use this command here."
    return None


async def reply_with_error(interaction: discord.Interaction[Any], error: Exception) -> None:
    """For commands (through the tree's on_error) and for buttons, whose errors discord.py only logs."""
    message = explain(error)
    if message is None:
        error_id = secrets.token_hex(4)
        where = f"/{interaction.command.qualified_name}" if interaction.command else "a button"
        cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        log.error("error %s in %s (guild %s)", error_id, where, interaction.guild_id, exc_info=cause)
        message = f"Something went wrong on our side (error id `{error_id}`); the bot's owner can look it up."
    try:
        await send_private(interaction, message)
    except discord.HTTPException:
        log.warning("could not tell the user about an error", exc_info=True)
