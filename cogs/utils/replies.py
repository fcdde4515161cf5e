"""Sending replies that respect Discord's limits and never leave an interaction 'thinking'."""

from __future__ import annotations

import logging
from typing import Any

import discord

log = logging.getLogger(__name__)

PUBLIC_DEFER = "public_defer"
PLACE_SHOWN = "place_shown"  # the deferred response shows a place in line and a Cancel button
MESSAGE_LIMIT = 2000
EMBED_DESCRIPTION_LIMIT = 4096
EMBED_TOTAL_LIMIT = 6000
EMBED_FIELD_LIMIT = 1024


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def verbatim(text: str) -> str:
    """User text for a code span or block: a backtick in it could end the span and let the rest
    render as markdown (masked links, mentions' look-alikes), so it is swapped for a look-alike."""
    return text.replace("`", "ˋ")


async def defer_answer(interaction: discord.Interaction[Any], *, ephemeral: bool = False) -> None:
    """Acknowledge within Discord's 3 seconds; a public 'thinking' is remembered so an error can replace it."""
    await interaction.response.defer(thinking=True, ephemeral=ephemeral)
    if not ephemeral:
        interaction.extras[PUBLIC_DEFER] = True


async def send_private(interaction: discord.Interaction[Any], content: str) -> None:
    """An ephemeral message, whatever state the interaction is in (and within Discord's length,
    since errors may quote what the user typed)."""
    content = clip(content, MESSAGE_LIMIT)
    if not interaction.response.is_done():
        await interaction.response.send_message(content, ephemeral=True)
        return
    place_shown = interaction.extras.pop(PLACE_SHOWN, False)
    if interaction.extras.pop(PUBLIC_DEFER, False):
        try:
            await interaction.delete_original_response()
        except discord.HTTPException:
            log.debug("could not delete the deferred response", exc_info=True)
    elif place_shown:  # private: the place in line becomes the message, its Cancel button gone
        await interaction.edit_original_response(content=content, embeds=[], attachments=[], view=None)
        return
    await interaction.followup.send(content, ephemeral=True)
