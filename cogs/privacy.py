"""``/forget-me``: everything stored about the person who runs it goes, in every server.

Their requests go at once. Examples they added to a server's tasks are shared work, so those go
only after a confirmation button (kept working across restarts as a dynamic item).
"""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from cogs.utils.bot import FlamingoBot, Interaction
from cogs.utils.buttons import ForgetExamplesButton
from core.errors import NotAllowedHere
from core.wording import plural


class Privacy(commands.Cog):
    def __init__(self, bot: FlamingoBot) -> None:
        self.bot = bot

    @app_commands.command(name="forget-me", description="Delete everything this bot stores about you")
    async def forget_me(self, interaction: Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # deleting many requests takes a while
        user_id = interaction.user.id
        forgotten = await self.bot.store.forget_user(user_id)
        requests, examples = forgotten.requests, forgotten.examples
        if requests:
            which = "your recent request" if requests == 1 else f"your {requests} recent requests"
            done = (
                f"Deleted the pictures and prompts of {which}. Answers already posted stay in their channels: "
                "delete yours with 🗑️ Delete, or ask a server's moderators."
            )
        else:
            done = "No pictures or prompts of yours were stored."
        if not examples:
            await interaction.followup.send(f"{done} Nothing else is stored about you.", ephemeral=True)
            return
        them = "it" if examples == 1 else "them"
        view = discord.ui.View(timeout=None)
        view.add_item(ForgetExamplesButton(user_id))
        await interaction.followup.send(
            f"{done} You also added {plural(examples, 'example')} to servers' tasks; "
            f"deleting {them} changes those tasks for everyone. Delete {them}?",
            view=view,
            ephemeral=True,
        )

    async def on_forget_examples(self, interaction: Interaction, user_id: int) -> None:
        if interaction.user.id != user_id:
            raise NotAllowedHere("Only the person who asked to be forgotten can confirm it.")
        deleted = await self.bot.store.delete_user_examples(user_id)
        await interaction.response.edit_message(content=f"Deleted {plural(deleted, 'example')}.", view=None)

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(ForgetExamplesButton)  # the same class on every load


async def setup(bot: FlamingoBot) -> None:
    await bot.add_cog(Privacy(bot))
