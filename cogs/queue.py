"""``/queue`` (everyone, privately): the model's line, how long answers take, and the asker's quota."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from cogs.utils.answering import asker_of
from cogs.utils.bot import FlamingoBot, Interaction
from core.line_view import LineView, view_line
from core.quotas import QuotaLeft, wait_words
from core.serving.model_choice import short_name
from core.wording import duration, plural, quota_period

_COLOUR = discord.Colour.blurple()


def _seconds(seconds: float) -> str:
    """Tenths only where they matter (a small model answers in under a second)."""
    if seconds < 0.1:
        return "under 0.1 s"
    return f"{seconds:.1f} s" if seconds < 10 else wait_words(seconds)


def _places(places: tuple[int, ...]) -> str:
    numbers = [str(place) for place in places]
    listed = numbers[0] if len(numbers) == 1 else f"{', '.join(numbers[:-1])} and {numbers[-1]}"
    return f"number {listed} in line"


def _line(view: LineView) -> str:
    line = view.line
    if not line.waiting and not line.running:
        return "Empty: a request starts at once."
    return f"{line.waiting} waiting · {line.running} being answered"


def _lately(view: LineView) -> str:
    typical = view.line.typical
    if typical is None:
        return "No answers lately."
    return (
        f"A request typically waits {_seconds(typical.waited)} in line and takes {_seconds(typical.answering)} "
        f"to answer (the median of {plural(typical.answers, 'answer')} in the last "
        f"{duration(typical.window_seconds)})."
    )


def _yours(view: LineView) -> str:
    parts = [_places(view.places)] if view.places else []
    if view.running:
        parts.append(f"{view.running} being answered")
    return " · ".join(parts) or "Nothing in line."


def _quota(quota: QuotaLeft) -> str:
    period = quota_period(quota.period_seconds)
    left = quota.per_period - quota.used
    back = f" (one more back in {wait_words(quota.next_back_seconds)})" if quota.next_back_seconds is not None else ""
    return (
        f"{quota.in_flight} of {quota.in_flight_limit} answered or waiting at once\n"
        f"{left} of {quota.per_period} left per {period}{back}\n"
        + (
            f"You can ask again in {wait_words(quota.cooldown_seconds)}."
            if quota.cooldown_seconds
            else "You can ask now."
        )
    )


def queue_embed(view: LineView, in_dms: bool) -> discord.Embed:
    embed = discord.Embed(title="The model's line", colour=_COLOUR)
    chosen = " (this server's choice)" if view.chosen else ""
    embed.add_field(name="Model", value=f"**{short_name(view.model)}**{chosen}", inline=False)
    embed.add_field(name="Line", value=_line(view))
    embed.add_field(name="Your requests", value=_yours(view))
    embed.add_field(name="Lately", value=_lately(view), inline=False)
    embed.add_field(name="Your quota" if in_dms else "This server's quota", value=_quota(view.quota), inline=False)
    if view.refusal is not None:
        embed.add_field(name="Asking here", value=view.refusal, inline=False)
    return embed


class Queue(commands.Cog):
    def __init__(self, bot: FlamingoBot) -> None:
        self.bot = bot

    @app_commands.command(name="queue", description="The model's line, how long answers take, and your quota")
    async def queue(self, interaction: Interaction) -> None:
        view = await view_line(self.bot.asking, asker_of(interaction), self.bot.waiting.values())
        await interaction.response.send_message(embed=queue_embed(view, interaction.guild_id is None), ephemeral=True)


async def setup(bot: FlamingoBot) -> None:
    await bot.add_cog(Queue(bot))
