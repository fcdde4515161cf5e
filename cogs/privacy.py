"""``/forget-me``: everything stored about the person who runs it goes, in every server.

Their requests go at once. Examples they added to a server's tasks are shared work, so those go
only after a confirmation button (kept working across restarts as a dynamic item).
"""

from __future__ import annotations

import re
from typing import Self

import discord
from discord import app_commands
from discord.ext import commands

from cogs.utils.bot import FlamingoBot
from cogs.utils.errors import reply_with_error
from core.errors import NotAllowedHere


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


class ForgetExamplesButton(
    discord.ui.DynamicItem[discord.ui.Button], template=r"flamingo-forget:(?P<user>[0-9]{1,20})"
):
    def __init__(self, user_id: int) -> None:
        button = discord.ui.Button(
            label="Delete my examples", style=discord.ButtonStyle.danger, custom_id=f"flamingo-forget:{user_id}"
        )
        super().__init__(button)
        self.user_id = user_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> Self:
        return cls(int(match["user"]))

    async def callback(self, interaction: discord.Interaction) -> None:  # type: ignore[override]
        try:
            if interaction.user.id != self.user_id:
                raise NotAllowedHere("Only the person who asked to be forgotten can confirm it.")
            bot: FlamingoBot = interaction.client  # type: ignore[assignment]
            deleted = await bot.store.delete_user_examples(self.user_id)
            await interaction.response.edit_message(content=f"Deleted {_plural(deleted, 'example')}.", view=None)
        except Exception as error:
            await reply_with_error(interaction, error)


class Privacy(commands.Cog):
    def __init__(self, bot: FlamingoBot) -> None:
        self.bot = bot

    @app_commands.command(name="forget-me", description="Delete everything this bot stores about you")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # deleting many requests takes a while
        user_id = interaction.user.id
        requests = await self.bot.store.delete_user_requests(user_id)
        await self.bot.store.forget_task_authorship(user_id)
        examples = await self.bot.store.count_user_examples(user_id)
        done = f"Deleted {_plural(requests, 'stored request')} (the inputs behind your answers' buttons)."
        if not examples:
            await interaction.followup.send(f"{done} Nothing else is stored about you.", ephemeral=True)
            return
        view = discord.ui.View(timeout=None)
        view.add_item(ForgetExamplesButton(user_id))
        await interaction.followup.send(
            f"{done} You also added {_plural(examples, 'example')} to servers' tasks; "
            "deleting them changes those tasks for everyone. Delete them?",
            view=view,
            ephemeral=True,
        )

    async def cog_load(self) -> None:
        # Replaces the previous code's class (same template), so the button never goes unanswered.
        self.bot.add_dynamic_items(ForgetExamplesButton)


async def setup(bot: FlamingoBot) -> None:
    await bot.add_cog(Privacy(bot))
