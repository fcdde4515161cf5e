"""What two buttons under an answer show: the full prompt (to its asker), and the report (to moderators)."""

from __future__ import annotations

import io

import discord

from cogs.utils.answering import ANSWER_COLOUR
from cogs.utils.replies import EMBED_FIELD_LIMIT, clip, verbatim
from core.config import GenerationSettings
from core.generation import GenerationParams
from core.storage.request_store import StoredRequest


def params_text(params: GenerationParams, settings: GenerationSettings) -> str:
    """How the answer was made, in words: as stored, never checked again (the operator's ranges may
    have changed since), with the default length where none was given."""
    given = {name: value for name, value in vars(params).items() if value is not None}
    how = "sampled" if params.do_sample else "greedy"
    if params.num_beams > 1:
        how = f"beam search over {params.num_beams} beams" + (", sampled" if params.do_sample else "")
    shown = [how, f"up to {given.pop('max_new_tokens', settings.max_new_tokens_default)} new tokens"]
    shown += [f"{name} {value}" for name, value in given.items() if name not in ("do_sample", "num_beams")]
    return " · ".join(shown)


def prompt_embed(stored: StoredRequest, full_prompt: str, model: str, settings: GenerationSettings) -> discord.Embed:
    embed = discord.Embed(title="Full prompt", colour=ANSWER_COLOUR)
    embed.description = clip(f"```\n{verbatim(full_prompt)}\n```", 4000)
    embed.add_field(name="Task", value=stored.task)
    embed.add_field(name="Model", value=model)
    embed.add_field(
        name="Parameters", value=clip(params_text(stored.params, settings), EMBED_FIELD_LIMIT), inline=False
    )
    return embed


def report_message(
    interaction: discord.Interaction, stored: StoredRequest | None
) -> tuple[discord.Embed, list[discord.File]]:
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
