"""``/settings`` (Manage Server): where the bot answers, who may use it, how answers show, quotas, reports,
and how much the server used it.

The default task stays under ``/manage-tasks set-default``, next to the tasks it names.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from cogs.utils.autocomplete import model_names
from cogs.utils.bot import FlamingoBot, Interaction
from cogs.utils.checks import ManageServerGroup, ManageServerSubgroup, server_id
from cogs.utils.options import limit_options
from cogs.utils.replies import EMBED_FIELD_LIMIT, clip
from core.config import QuotaSettings
from core.errors import BadParameter, NotAllowedHere
from core.guild_settings import MAX_COOLDOWN_SECONDS, GuildSettings, check_quota_change
from core.serving.model_choice import ModelCatalog
from core.tasks.builtin import DEFAULT_TASK
from core.usage import KEPT_DAYS, NO_TASK, OUTCOMES, ReportDays, Tally, UsageReport, usage_chart
from core.wording import plural, quota_period

_COLOUR = discord.Colour.blurple()


def settings_embed(
    rules: GuildSettings, defaults: QuotaSettings, models: ModelCatalog, guild: discord.Guild | None
) -> discord.Embed:
    """``guild``: the cached server, to point out a channel or role deleted since it was set (they
    keep restricting until a moderator changes them); None when not known."""
    quotas = rules.quotas(defaults)
    own = any(v is not None for v in (rules.user_cooldown_seconds, rules.guild_in_flight, rules.guild_per_period))
    deleted = {c for c in rules.answer_channels if guild is not None and guild.get_channel(c) is None}
    channels = ", ".join(f"<#{c}>" + (" (deleted)" if c in deleted else "") for c in sorted(rules.answer_channels))
    if deleted and deleted == rules.answer_channels:
        channels += "\n⚠️ Nobody can use the bot until you add a channel or run `/settings channels clear`."
    role = f"<@&{rules.required_role}>" if rules.required_role else "none"
    if rules.required_role and guild is not None and guild.get_role(rules.required_role) is None:
        role += " (deleted)\n⚠️ Only members with Manage Server can use the bot until you choose another."
    embed = discord.Embed(title="Settings for this server", colour=_COLOUR)
    default = rules.default_task or DEFAULT_TASK
    embed.add_field(name="Default task", value=f"**{default}** (`/manage-tasks set-default`)")
    model = models.in_force(rules.model)
    gone = " (the one chosen is no longer offered)" if rules.model not in (None, model) else ""
    embed.add_field(name="Model", value=models.describe(model) + gone)
    embed.add_field(name="Answers in", value=channels or "every channel", inline=False)
    embed.add_field(name="Required role", value=role)
    embed.add_field(name="Answers are", value="private to the asker" if rules.ephemeral_answers else "public")
    embed.add_field(
        name="Quotas" + (" (this server's)" if own else " (the bot's defaults)"),
        value=(
            (
                f"{quotas.user_cooldown_seconds:g} s between a member's requests"
                if quotas.user_cooldown_seconds
                else "no wait between a member's requests"
            )
            + f" · up to {quotas.guild_in_flight} answered or waiting at once"
            f" · {quotas.guild_per_period} per {quota_period(quotas.period_seconds)}"
        ),
        inline=False,
    )
    embed.add_field(name="Reports go to", value=f"<#{rules.report_channel}>" if rules.report_channel else "not set")
    return embed


_TASKS_SHOWN = 10
_CHART = "usage.png"


def _outcomes(tally: Tally) -> str:
    return ", ".join(f"{tally.outcomes[outcome]:,} {outcome}" for outcome in OUTCOMES if tally.outcomes[outcome])


def _task_line(task: str, tally: Tally) -> str:
    name = f"**{task}**" if task != NO_TASK else "*refused before a task was read*"
    tokens = f", {tally.tokens:,} tokens" if tally.tokens else ""
    return f"{name}: {plural(tally.requests, 'request')} ({_outcomes(tally)}{tokens})"


def usage_embed(report: UsageReport) -> discord.Embed:
    """The report in words; the chart (attached as ``usage.png``) shows it per day and per hour."""
    total = report.total
    first, today = report.days[0], report.days[-1]
    span = f"from {first.day} {first:%b} to today, {today.day} {today:%b %Y} (UTC)"
    embed = discord.Embed(title=f"Use of the bot on this server: the last {len(report.days)} days", colour=_COLOUR)
    embed.set_image(url=f"attachment://{_CHART}")
    embed.set_footer(
        text=f"Counted per hour without naming anyone, kept {KEPT_DAYS} days; direct messages are not counted. "
        "Refused: this server's channels or role, a quota, the input, or a full line."
    )
    if not total.requests:
        embed.description = f"No requests {span}."
        return embed
    embed.description = (
        f"**{plural(total.requests, 'request')}** {span}: {_outcomes(total)}.\n**{total.tokens:,}** tokens generated."
    )
    tasks = list(report.per_task().items())
    lines = [_task_line(task, tally) for task, tally in tasks[:_TASKS_SHOWN]]
    rest = sum(tally.requests for _, tally in tasks[_TASKS_SHOWN:])
    if rest:
        lines.append(f"and {plural(rest, 'request')} with {plural(len(tasks) - _TASKS_SHOWN, 'other task')}")
    embed.add_field(name="By task", value=clip("\n".join(lines), EMBED_FIELD_LIMIT), inline=False)
    day, requests = report.busiest_day()
    embed.add_field(name="Busiest day", value=f"{day:%a} {day.day} {day:%b}: {plural(requests, 'request')}")
    hours = ", ".join(f"{hour:02d}:00 ({requests:,})" for hour, requests in report.busiest_hours())
    embed.add_field(name="Busiest hours (UTC)", value=hours)
    return embed


# Every channel members can write in; threads and forum posts follow their channel.
AnswerChannel = discord.TextChannel | discord.VoiceChannel | discord.StageChannel | discord.ForumChannel


class ServerSettings(commands.Cog):
    group = ManageServerGroup(name="settings", description="How the bot behaves on this server")

    def __init__(self, bot: FlamingoBot) -> None:
        self.bot = bot
        defaults = bot.settings.quotas
        quotas = self.group.get_command("quotas")
        assert isinstance(quotas, app_commands.Command)
        limit_options(
            quotas,
            cooldown_seconds=(defaults.user_cooldown_seconds, MAX_COOLDOWN_SECONDS),
            in_flight=(1, defaults.guild_in_flight),
            per_period=(1, defaults.guild_per_period),
        )

    async def _change(
        self, interaction: Interaction, change: Callable[[GuildSettings], GuildSettings], note: str
    ) -> None:
        guild_id = interaction.guild_id
        assert guild_id is not None  # the group is guild-only
        changed = await self.bot.store.change_guild_settings(guild_id, change)
        embed = settings_embed(changed, self.bot.settings.quotas, self.bot.models, self.bot.get_guild(guild_id))
        if interaction.response.is_done():
            await interaction.followup.send(note, embed=embed, ephemeral=True)
        else:
            await interaction.response.send_message(note, embed=embed, ephemeral=True)

    @group.command(name="show", description="This server's settings")
    async def show(self, interaction: Interaction) -> None:
        rules = await self.bot.store.guild_settings(server_id(interaction))
        guild = self.bot.get_guild(server_id(interaction))
        embed = settings_embed(rules, self.bot.settings.quotas, self.bot.models, guild)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    channels = ManageServerSubgroup(
        name="channels", description="Channels where the bot answers (none set: every channel)", parent=group
    )

    @channels.command(name="add", description="Answer in this channel too (and in its threads and posts)")
    @app_commands.describe(channel="A text, announcement, voice, stage, forum or media channel")
    async def add_channel(self, interaction: Interaction, channel: AnswerChannel) -> None:
        rules = await self.bot.store.guild_settings(server_id(interaction))
        if channel.id in rules.answer_channels:
            await interaction.response.send_message(
                f"{channel.mention} is already on the list; nothing changed.", ephemeral=True
            )
            return
        change = lambda r: replace(r, answer_channels=r.answer_channels | {channel.id})  # noqa: E731
        await self._change(interaction, change, f"Added {channel.mention}.")

    @channels.command(name="remove", description="Stop answering in this channel")
    @app_commands.describe(channel="One of the channels the bot answers in")
    async def remove_channel(self, interaction: Interaction, channel: AnswerChannel) -> None:
        rules = await self.bot.store.guild_settings(server_id(interaction))
        if channel.id not in rules.answer_channels:
            where = "only in the listed channels" if rules.answer_channels else "in every channel"
            await interaction.response.send_message(
                f"{channel.mention} is not on the list (I answer {where}); nothing changed.", ephemeral=True
            )
            return
        change = lambda r: replace(r, answer_channels=r.answer_channels - {channel.id})  # noqa: E731
        await self._change(interaction, change, f"Removed {channel.mention}.")

    @channels.command(name="clear", description="Answer in every channel again")
    async def clear_channels(self, interaction: Interaction) -> None:
        everywhere = lambda r: replace(r, answer_channels=frozenset())  # noqa: E731
        await self._change(interaction, everywhere, "I answer in every channel now.")

    @group.command(name="role", description="A role members need to use the bot (empty: everyone)")
    @app_commands.describe(role="The role; leave empty to let everyone use the bot")
    async def role(self, interaction: Interaction, role: discord.Role | None = None) -> None:
        if role is not None and role.is_default():
            role = None  # @everyone is no restriction
        note = f"Members need {role.mention} to use the bot." if role else "Everyone can use the bot."
        await self._change(interaction, lambda r: replace(r, required_role=role.id if role else None), note)

    @group.command(name="answers", description="Whether answers are public or seen only by the asker")
    @app_commands.describe(visibility="public: everyone in the channel sees them; private: only the asker")
    async def answers(self, interaction: Interaction, visibility: Literal["public", "private"]) -> None:
        private = visibility == "private"
        note = "Answers are now seen only by the asker." if private else "Answers are now public."
        await self._change(interaction, lambda r: replace(r, ephemeral_answers=private), note)

    @group.command(name="quotas", description="Stricter limits than the bot's defaults for this server")
    @app_commands.describe(
        cooldown_seconds="Least time between two requests of one member",
        in_flight="Requests of this server being answered or waiting at once",
        per_period="Requests of this server per period",
        reset="Go back to the bot's defaults",
    )
    async def quotas(
        self,
        interaction: Interaction,
        cooldown_seconds: int | None = None,
        in_flight: int | None = None,
        per_period: int | None = None,
        reset: bool = False,
    ) -> None:
        if reset:
            defaults = partial(replace, user_cooldown_seconds=None, guild_in_flight=None, guild_per_period=None)
            await self._change(interaction, defaults, "Quotas are back to the bot's defaults.")
            return
        if (cooldown_seconds, in_flight, per_period) == (None, None, None):
            raise BadParameter("Give cooldown_seconds, in_flight or per_period to change, or reset to go back.")
        check_quota_change(self.bot.settings.quotas, cooldown_seconds, in_flight, per_period)

        def change(rules: GuildSettings) -> GuildSettings:
            return replace(
                rules,
                user_cooldown_seconds=cooldown_seconds if cooldown_seconds is not None else rules.user_cooldown_seconds,
                guild_in_flight=in_flight if in_flight is not None else rules.guild_in_flight,
                guild_per_period=per_period if per_period is not None else rules.guild_per_period,
            )

        await self._change(interaction, change, "Quotas updated.")

    @group.command(name="model", description="The model that answers on this server")
    @app_commands.describe(model="A model this bot offers; the default one if left empty")
    @app_commands.autocomplete(model=model_names)
    async def model(self, interaction: Interaction, model: str | None = None) -> None:
        models = self.bot.models
        chosen = models.default if model is None else models.lookup(model)
        models.check_choice(chosen)
        stored = None if chosen == models.default else chosen
        note = f"This server's answers now come from {models.describe(chosen)}."
        await self._change(interaction, lambda r: replace(r, model=stored), note)

    @group.command(name="reports", description="The channel where reported answers are posted (empty: none)")
    @app_commands.describe(channel="A channel only moderators read; leave empty to turn reports off")
    async def reports(self, interaction: Interaction, channel: discord.TextChannel | None = None) -> None:
        if channel is not None:
            # Tried now, so a channel the bot cannot post in is found by the moderator setting it,
            # not by the first member whose report is lost.
            await interaction.response.defer(ephemeral=True, thinking=True)
            try:
                await channel.send("Answers that members report will be posted here.")
            except discord.HTTPException:
                raise NotAllowedHere(
                    f"I cannot post in {channel.mention}; let me view it, send messages and embed links there, "
                    "then set it again."
                ) from None
        note = (
            f"Reports go to {channel.mention}."
            if channel
            else "Reports are off; members who press Report are told this server takes none."
        )
        await self._change(interaction, lambda r: replace(r, report_channel=channel.id if channel else None), note)

    @group.command(name="usage", description="Requests on this server per day, task and outcome, with a chart")
    @app_commands.describe(days="How many days back, today (UTC) included")
    async def usage(self, interaction: Interaction, days: ReportDays = 7) -> None:
        # Acknowledged first: the chart takes a moment to draw, more on a busy machine.
        await interaction.response.defer(ephemeral=True, thinking=True)
        report = await self.bot.store.usage(server_id(interaction), days)
        chart = await asyncio.to_thread(usage_chart, report)  # matplotlib blocks: never on the event loop
        await interaction.followup.send(
            embed=usage_embed(report), file=discord.File(io.BytesIO(chart), _CHART), ephemeral=True
        )


async def setup(bot: FlamingoBot) -> None:
    await bot.add_cog(ServerSettings(bot))
