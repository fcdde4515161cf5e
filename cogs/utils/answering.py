"""Answers as Discord shows them: who asks, the place in line, the answer itself, and what its buttons show.

The use case (``core.asking``) decides; this module presents: the asker's facts for it, the
deferred reply and the place in line with its Cancel button, the answer's embed and files, and what
the Prompt (to its asker) and Report (to moderators) buttons show.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable
from datetime import timedelta

import discord

from cogs.utils.bot import FlamingoBot, Interaction
from cogs.utils.buttons import ActionButton, button_view
from cogs.utils.replies import EMBED_DESCRIPTION_LIMIT, EMBED_FIELD_LIMIT, PLACE_SHOWN, clip, defer_answer, verbatim
from core.asking import Answered, Asker
from core.config import GenerationSettings
from core.generation import GenerationParams
from core.model.engine import Answer
from core.serving import QueuedRequest
from core.serving.model_choice import ModelCatalog, short_name
from core.storage.request_store import StoredRequest
from core.streaming import shown_while_written

log = logging.getLogger(__name__)

ANSWER_COLOUR = discord.Colour.from_rgb(232, 93, 117)
# Interaction tokens die after 15 minutes; a request must start early enough to be answered before that.
ANSWER_DEADLINE = timedelta(minutes=12)
# An answer being written stops being shown a minute before the token expires, which the final answer needs.
STREAM_DEADLINE = timedelta(minutes=14)
WRITING = "⏳ Still writing… The asker (or a moderator) can cancel."
_POLL_SECONDS = 0.5
UNSTORED_NOTE = "Not stored: the bot cannot save right now, so this answer has no Re-roll or Prompt button."


def answer_message(user: discord.abc.User, shown: Answered, heading: str) -> dict:
    """The reply: the answer as an embed under the user's (first) image; a long answer also as a file."""
    text = shown.text or "*(the model gave an empty answer)*"
    embed = discord.Embed(description=clip(text, EMBED_DESCRIPTION_LIMIT), colour=ANSWER_COLOUR)
    embed.set_author(name=f"{user.display_name} {heading}", icon_url=user.display_avatar.url)
    prompt = clip(discord.utils.escape_markdown(shown.prompt), EMBED_FIELD_LIMIT)
    embed.add_field(name="Prompt", value=prompt, inline=False)
    embed.set_image(url="attachment://image.jpg")
    model = f"model: {short_name(shown.model)} · " if shown.model else ""
    footer = f"{model}task: {shown.task} · {len(shown.answer.token_ids)} tokens · {shown.answer.seconds:.1f} s"
    embed.set_footer(text=footer if shown.request_id is not None else f"{footer}\n{UNSTORED_NOTE}")
    names = ["image.jpg"] + [f"image-{n}.jpg" for n in range(2, len(shown.images) + 1)]
    files = [discord.File(io.BytesIO(data), filename=name) for data, name in zip(shown.images, names, strict=True)]
    if len(text) > EMBED_DESCRIPTION_LIMIT:
        files.append(discord.File(io.BytesIO(shown.text.encode()), filename="answer.txt"))
    return {"embed": embed, "attachments": files}


def partial_message(user: discord.abc.User, text: str, heading: str) -> dict:
    """An answer still being written: its text so far in the answer's embed, marked as unfinished."""
    embed = discord.Embed(description=clip(text, EMBED_DESCRIPTION_LIMIT), colour=ANSWER_COLOUR)
    embed.set_author(name=f"{user.display_name} {heading}", icon_url=user.display_avatar.url)
    embed.set_footer(text="writing…")
    return {"content": WRITING, "embed": embed}


def asker_of(interaction: Interaction) -> Asker:
    """Who asks and where, as the use case needs it (``core.asking``)."""
    channel = interaction.channel
    # Only a guild the bot has cached knows its channels and roles (interaction.guild may be a stub).
    guild = interaction.client.get_guild(interaction.guild_id) if interaction.guild_id else None
    return Asker(
        user_id=interaction.user.id,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        parent_channel_id=getattr(channel, "parent_id", None),
        role_ids=frozenset(role.id for role in getattr(interaction.user, "roles", [])),
        manages_server=interaction.permissions.manage_guild,
        nsfw_channel=bool(channel is not None and getattr(channel, "is_nsfw", lambda: False)()),
        server=guild,
    )


def answer_deadline(interaction: Interaction, after: timedelta = ANSWER_DEADLINE) -> float:
    """The ``time.monotonic()`` after which a request of this interaction should not start (or, with
    ``STREAM_DEADLINE``, its answer no longer be shown while written)."""
    left = interaction.created_at + after - discord.utils.utcnow()
    return time.monotonic() + left.total_seconds()


def queue_notice(position: int, wait_seconds: float) -> str:
    about = f", about {max(1, round(wait_seconds / 60))} min" if wait_seconds >= 60 else ""
    return f"⏳ Waiting for the model: number {position} in line{about}. The asker (or a moderator) can cancel."


async def wait_in_line(
    interaction: Interaction,
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


class InteractionFront:
    """The use case's front (``core.asking.Front``) for one interaction: a deferred reply, then the
    place in line with a Cancel button, then the answer as it is written, until the answer is posted
    before the interaction expires."""

    def __init__(self, bot: FlamingoBot, interaction: Interaction, heading: str) -> None:
        self.bot = bot
        self.interaction = interaction
        self.heading = heading

    @property
    def deadline(self) -> float:
        return answer_deadline(self.interaction)

    async def accepted(self, private: bool) -> None:
        await defer_answer(self.interaction, ephemeral=private)

    async def in_line(self, ticket: QueuedRequest) -> Answer:
        interaction, bot = self.interaction, self.bot
        bot.waiting[interaction.id] = (ticket, interaction.user.id)
        try:
            cancel = button_view(ActionButton("cancel", interaction.id))
            updates = bot.settings.service.queue_update_seconds
            stream = asyncio.ensure_future(self._stream(ticket, cancel))
            try:
                return await wait_in_line(interaction, ticket, cancel, updates, bot.service.estimated_wait)
            finally:
                stream.cancel()  # an edit under way is finished first, so the final answer comes after it
                await asyncio.gather(stream, return_exceptions=True)
        finally:
            bot.waiting.pop(interaction.id, None)

    async def _stream(self, ticket: QueuedRequest, cancel_view: discord.ui.View) -> None:
        """Show the answer as it is written (``core.streaming``), in the reply the final answer will
        replace. It stops quietly when an edit fails or the text cannot be followed: the answer
        itself is waited for, and posted, apart from it."""
        interaction, bot = self.interaction, self.bot
        filtered = not asker_of(interaction).nsfw_channel  # where the final answer is filtered, so is each part

        def shows(text: str) -> bool:
            return not (filtered and bot.asking.answer_filter.blocks(text))

        stop_at = answer_deadline(interaction, STREAM_DEADLINE)
        try:
            partials = ticket.partial_texts()
            async with contextlib.aclosing(
                shown_while_written(partials, bot.settings.answers, stop_at, shows)
            ) as texts:
                async for text in texts:
                    if interaction.id not in bot.waiting:
                        return  # cancelled: its message says so, and keeps what was written
                    message = partial_message(interaction.user, text, self.heading)
                    edit = asyncio.ensure_future(interaction.edit_original_response(**message, view=cancel_view))
                    try:
                        await asyncio.shield(edit)
                    except asyncio.CancelledError:
                        await asyncio.gather(edit, return_exceptions=True)
                        raise
                    interaction.extras[PLACE_SHOWN] = True
        except discord.HTTPException as error:
            log.info("stopped showing an answer as it is written: Discord refused an edit (%s)", error.status)
        except Exception:  # the answer's own wait reports whatever went wrong
            log.debug("stopped showing an answer as it is written", exc_info=True)


def params_text(params: GenerationParams, settings: GenerationSettings) -> str:
    """How the answer was made, in words: as stored, never checked again (the operator's ranges may
    have changed since), with the default length where none was given."""
    given = {name: value for name, value in params.as_dict().items() if value is not None}
    how = "sampled" if params.do_sample else "greedy"
    if params.num_beams > 1:
        how = f"beam search over {params.num_beams} beams" + (", sampled" if params.do_sample else "")
    shown = [how, f"up to {given.pop('max_new_tokens', settings.max_new_tokens_default)} new tokens"]
    shown += [f"{name} {value}" for name, value in given.items() if name not in ("do_sample", "num_beams")]
    return " · ".join(shown)


def prompt_embed(
    stored: StoredRequest, full_prompt: str, models: ModelCatalog, settings: GenerationSettings
) -> discord.Embed:
    embed = discord.Embed(title="Full prompt", colour=ANSWER_COLOUR)
    embed.description = clip(f"```\n{verbatim(full_prompt)}\n```", 4000)
    embed.add_field(name="Task", value=stored.task)
    # A stored model is one a server chose, never the default, which is shown as configured now.
    embed.add_field(name="Model", value=clip(models.shown(stored.model or models.default), EMBED_FIELD_LIMIT))
    embed.add_field(
        name="Parameters", value=clip(params_text(stored.params, settings), EMBED_FIELD_LIMIT), inline=False
    )
    return embed


def report_message(interaction: Interaction, stored: StoredRequest | None) -> tuple[discord.Embed, list[discord.File]]:
    """What moderators need to judge an answer without opening it (a private one they cannot):
    the answer, who asked what, with which task, and the picture; ``stored`` None once it is gone."""
    message = interaction.message
    answer = message.embeds[0] if message and message.embeds else None
    embed = discord.Embed(title="Answer reported", colour=discord.Colour.red())
    embed.description = clip(answer.description or "", 2000) if answer else "(no answer text)"
    embed.add_field(name="Reported by", value=interaction.user.mention)
    files = []
    if stored is not None:
        embed.add_field(name="Asked by", value=f"<@{stored.user_id}>")
        if stored.origin_user_id is not None:  # a re-roll of their answer, or a description of their picture
            embed.add_field(name="Picture and prompt from", value=f"<@{stored.origin_user_id}>")
        embed.add_field(name="Task", value=stored.task)
        embed.add_field(name="Prompt", value=f"`{clip(verbatim(stored.prompt), EMBED_FIELD_LIMIT - 2)}`", inline=False)
        if stored.images:
            files = [discord.File(io.BytesIO(stored.images[0]), filename="reported.jpg")]
            embed.set_thumbnail(url="attachment://reported.jpg")
    if message is not None:
        seen = " (seen only by the asker)" if message.flags.ephemeral else ""
        embed.add_field(name="Where", value=f"[Jump to the answer]({message.jump_url}){seen}", inline=False)
    return embed, files
