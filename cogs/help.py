"""``/help``: what the bot does and how to ask it, short enough to read in Discord."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from cogs.utils.bot import FlamingoBot, Interaction
from core.config import PrivacySettings
from core.guild_settings import GuildSettings
from core.wording import duration

_COLOUR = discord.Colour.blurple()


def _server_line(default_task: str, task_count: int, rules: GuildSettings) -> str:
    parts = [f"Default task: **{default_task}**", f"{task_count} tasks"]
    if rules.answer_channels:
        parts.append("answers only in " + ", ".join(f"<#{c}>" for c in sorted(rules.answer_channels)))
    if rules.required_role:
        parts.append(f"for members with <@&{rules.required_role}>")
    if rules.ephemeral_answers:
        parts.append("answers are private")
    return " · ".join(parts)


def help_embed(
    default_task: str,
    task_count: int,
    rules: GuildSettings | None,
    privacy: PrivacySettings,
    privacy_url: str | None,
    terms_url: str | None,
) -> discord.Embed:
    embed = discord.Embed(
        title="flamingo-bot",
        description=(
            "I answer questions about images with OpenFlamingo, guided by a **task**: example images with "
            "texts that show the model what kind of answer you want."
        ),
        colour=_COLOUR,
    )
    embed.add_field(
        name="Ask",
        value=(
            f"`/comprehend image:<your picture>` describes it with the task **{default_task}**.\n"
            "Write your own prompt with `<image>` where the picture is read, for example "
            "`<image>Question: What is the cat doing? Short answer:` with `task:vqa`.\n"
            "Several pictures: attach `image2`…`image4` and put one `<image>` for each, in order.\n"
            "Or use **Apps → Describe image** on any message with an attached picture. "
            "Under each answer: 🎲 re-roll, 📝 the full prompt, 🗑️ delete, 🚩 report."
        ),
        inline=False,
    )
    embed.add_field(
        name="Tasks",
        value=(
            "`/tasks list` and `/tasks show` browse them. Members with Manage Server build this server's "
            "own with `/manage-tasks` (create, add-example, copy a built-in, import, set-default, evaluate, …) "
            "and choose channels, a role, quotas and the model with `/settings`."
        ),
        inline=False,
    )
    if rules is not None:  # in a server; direct messages have only the built-in tasks
        embed.add_field(name="This server", value=_server_line(default_task, task_count, rules), inline=False)
    embed.add_field(
        name="Your data",
        value=(
            f"Each answer's picture and prompt are kept up to {duration(privacy.request_retention_hours * 3600)}, "
            "for its buttons. "
            "`/forget-me` deletes everything stored about you."
        ),
        inline=False,
    )
    links = [f"[Privacy policy]({privacy_url})" if privacy_url else "", f"[Terms]({terms_url})" if terms_url else ""]
    if any(links):
        embed.add_field(name="About", value=" · ".join(link for link in links if link), inline=False)
    return embed


class Help(commands.Cog):
    def __init__(self, bot: FlamingoBot) -> None:
        self.bot = bot

    @app_commands.command(name="help", description="What this bot does and how to ask it")
    async def help_command(self, interaction: Interaction) -> None:
        library = self.bot.library
        default = await library.default_task_name(interaction.guild_id)
        tasks = await library.list_tasks(interaction.guild_id)
        guild_id = interaction.guild_id
        rules = await self.bot.store.guild_settings(guild_id) if guild_id is not None else None
        settings = self.bot.settings
        links = settings.discord.privacy_url, settings.discord.terms_url
        embed = help_embed(default, len(tasks), rules, settings.privacy, *links)
        await interaction.response.send_message(embed=embed, ephemeral=True)


async def setup(bot: FlamingoBot) -> None:
    await bot.add_cog(Help(bot))
