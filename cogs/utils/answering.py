"""What every answer goes through: the server's rules, the queue with its visible place in line, the reply.

Shared by ``/comprehend``, the message menu and the re-roll button, so a server's channel, role,
quota and visibility settings apply to all three alike.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import discord

from cogs.utils.replies import EMBED_DESCRIPTION_LIMIT, EMBED_FIELD_LIMIT, PLACE_SHOWN, clip
from core.errors import NotAllowedHere
from core.guild_settings import GuildSettings
from core.model.engine import Answer
from core.serving import QueuedRequest
from core.serving.model_choice import short_name

ANSWER_COLOUR = discord.Colour.from_rgb(232, 93, 117)
# Interaction tokens die after 15 minutes; a request must start early enough to be answered before that.
ANSWER_DEADLINE = timedelta(minutes=12)
_POLL_SECONDS = 0.5
WITHHELD = "*(The answer was withheld: it contained words this server's bot does not post outside NSFW channels.)*"


@dataclass(frozen=True)
class Shown:
    """An answer as posted: its text after moderation, and the images it was about (as stored)."""

    text: str
    task: str
    prompt: str
    answer: Answer
    images: list[bytes]
    model: str | None = None  # a model the server chose instead of the default


def answer_message(user: discord.abc.User, shown: Shown, heading: str) -> dict:
    """The reply: the answer as an embed under the user's (first) image; a long answer also as a file."""
    text = shown.text or "*(the model gave an empty answer)*"
    embed = discord.Embed(description=clip(text, EMBED_DESCRIPTION_LIMIT), colour=ANSWER_COLOUR)
    embed.set_author(name=f"{user.display_name} {heading}", icon_url=user.display_avatar.url)
    prompt = clip(discord.utils.escape_markdown(shown.prompt), EMBED_FIELD_LIMIT)
    embed.add_field(name="Prompt", value=prompt, inline=False)
    embed.set_image(url="attachment://image.jpg")
    model = f"model: {short_name(shown.model)} · " if shown.model else ""
    footer = f"{model}task: {shown.task} · {len(shown.answer.token_ids)} tokens · {shown.answer.seconds:.1f} s"
    embed.set_footer(text=footer)
    names = ["image.jpg"] + [f"image-{n}.jpg" for n in range(2, len(shown.images) + 1)]
    files = [discord.File(io.BytesIO(data), filename=name) for data, name in zip(shown.images, names, strict=True)]
    if len(text) > EMBED_DESCRIPTION_LIMIT:
        files.append(discord.File(io.BytesIO(shown.text.encode()), filename="answer.txt"))
    return {"embed": embed, "attachments": files}


def check_rules(interaction: discord.Interaction, rules: GuildSettings) -> None:
    """The server's answer channels and required role; members who manage the server are never locked out."""
    channel = interaction.channel
    # Only a guild the bot has cached knows its channels and roles (interaction.guild may be a stub).
    guild = interaction.client.get_guild(interaction.guild_id) if interaction.guild_id else None
    if not rules.allows_channel(interaction.channel_id, getattr(channel, "parent_id", None)):
        if guild is not None and all(guild.get_channel(c) is None for c in rules.answer_channels):
            raise NotAllowedHere(
                "The channels this server lets me answer in were deleted; a moderator can add others with "
                "/settings channels add, or let me answer everywhere with /settings channels clear."
            )
        listed = ", ".join(f"<#{channel_id}>" for channel_id in sorted(rules.answer_channels))
        raise NotAllowedHere(f"I only answer in {listed} on this server.")
    if rules.required_role is None or interaction.permissions.manage_guild:
        return
    roles = getattr(interaction.user, "roles", [])
    if all(role.id != rules.required_role for role in roles):
        if guild is not None and guild.get_role(rules.required_role) is None:
            raise NotAllowedHere(
                "The role this server requires was deleted; a moderator can choose another with /settings role."
            )
        raise NotAllowedHere(f"You need the <@&{rules.required_role}> role to use the bot on this server.")


def is_nsfw(interaction: discord.Interaction) -> bool:
    channel = interaction.channel
    return bool(channel is not None and getattr(channel, "is_nsfw", lambda: False)())


def answer_deadline(interaction: discord.Interaction) -> float:
    """The ``time.monotonic()`` after which a request of this interaction should not start."""
    left = interaction.created_at + ANSWER_DEADLINE - discord.utils.utcnow()
    return time.monotonic() + left.total_seconds()


def queue_notice(position: int, wait_seconds: float) -> str:
    about = f", about {max(1, round(wait_seconds / 60))} min" if wait_seconds >= 60 else ""
    return f"⏳ Waiting for the model: number {position} in line{about}. The asker (or a moderator) can cancel."


async def wait_in_line(
    interaction: discord.Interaction,
    ticket: QueuedRequest,
    cancel_view: discord.ui.View,
    min_edit_seconds: float,
    eta: Callable[[int], float],
) -> Answer:
    """Wait for the answer, showing the place in line (at most one edit per ``min_edit_seconds``)."""
    answer = asyncio.ensure_future(ticket.answer())
    shown: int | None = None
    last_edit = -min_edit_seconds
    try:
        while True:
            done, _ = await asyncio.wait({answer}, timeout=_POLL_SECONDS)
            if done:
                return answer.result()
            position = ticket.position
            now = time.monotonic()
            if position is not None and position != shown and now - last_edit >= min_edit_seconds:
                await interaction.edit_original_response(
                    content=queue_notice(position, eta(position)), view=cancel_view
                )
                interaction.extras[PLACE_SHOWN] = True
                shown, last_edit = position, now
    finally:
        answer.cancel()
