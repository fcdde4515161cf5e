"""``/comprehend`` and the message menu's Describe image: images and a prompt in, the model's answer out.

Every answer carries buttons (re-roll, prompt, delete, report; only the last two when the database
refused to store it) and every waiting request a cancel button (``cogs/utils/buttons.py``); their
clicks are handled here.
"""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from cogs.utils.answering import InteractionFront, answer_message, asker_of, prompt_embed, report_message
from cogs.utils.attachments import download
from cogs.utils.autocomplete import task_names
from cogs.utils.bot import FlamingoBot, Interaction
from cogs.utils.buttons import UNSTORED, ActionButton, answer_view, answered_request
from cogs.utils.options import drop_options, generation_options, limit_options
from core.asking import ImageReader, Question
from core.errors import NotAllowedHere, RequestCancelled, UnknownTask
from core.generation import GenerationParams, Value, reroll_params
from core.prompts import assemble_prompt


def _stored(images: tuple[bytes, ...]) -> ImageReader:
    async def read() -> list[bytes]:
        return list(images)

    return read


class Inference(commands.Cog):
    def __init__(self, bot: FlamingoBot) -> None:
        self.bot = bot
        self._describe_menu = app_commands.ContextMenu(name="Describe image", callback=self.describe_image)
        settings = bot.settings
        ranges = {name: (value.low, value.high) for name, value in settings.generation.ranges.items()}
        limit_options(self.comprehend, prompt=(1, settings.prompts.max_chars), **ranges)
        drop_options(self.comprehend, *("image2", "image3", "image4")[settings.images.max_per_request - 1 :])

    @app_commands.command(description="Ask OpenFlamingo about an image.")
    @app_commands.describe(
        image="The picture to read",
        image2="A second picture, for the second <image> of your prompt",
        image3="A third picture",
        image4="A fourth picture",
        prompt="Your text, with <image> where the picture is read (default: the task's prompt)",
        task="Whose examples guide the answer (default: this server's default task, else caption)",
    )
    @app_commands.autocomplete(task=task_names)
    @generation_options
    async def comprehend(
        self,
        interaction: Interaction,
        image: discord.Attachment,
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
        image4: discord.Attachment | None = None,
        prompt: str | None = None,
        task: str | None = None,
        **options: Value,
    ) -> None:
        params = GenerationParams(**options)
        images = [a for a in (image, image2, image3, image4) if a is not None]
        # Refusals that need no download and no model are given at once, privately.
        await self.bot.asking.check(asker_of(interaction), prompt, [(a.size, a.filename) for a in images], params)
        await self._answer(interaction, Question(self._reader(images), prompt, task, params), "asked")

    async def describe_image(self, interaction: Interaction, message: discord.Message) -> None:
        """The message menu's "Describe image": the server's default task on the message's first image.

        Only attachments are read: fetching links from a message would let anyone make the bot
        request any address.
        """
        images = [a for a in message.attachments if (a.content_type or "").startswith("image/")][:1]
        await self.bot.asking.check(
            asker_of(interaction), None, [(a.size, a.filename) for a in images], GenerationParams()
        )
        owner = await self._picture_owner(interaction, message)
        question = Question(self._reader(images), None, None, GenerationParams(), origin=owner)
        await self._answer(interaction, question, "asked")

    async def _picture_owner(self, interaction: Interaction, message: discord.Message) -> int:
        """Whose picture a message shows, for /forget-me: its author's; on the bot's own answer, the
        person's whose picture that answer was about (else who asked for it)."""
        if self.bot.user is None or message.author.id != self.bot.user.id:
            return message.author.id
        request_id = answered_request(message)
        stored = (
            await self.bot.store.get_request(request_id, interaction.guild_id, interaction.user.id)
            if request_id is not None
            else None
        )
        if stored is not None:
            return stored.origin_user_id or stored.user_id
        metadata = message.interaction_metadata
        return metadata.user.id if metadata is not None else message.author.id

    def _reader(self, attachments: list[discord.Attachment]) -> ImageReader:
        seconds = self.bot.settings.images.download_seconds

        async def read() -> list[bytes]:
            return [await download(attachment, seconds) for attachment in attachments]

        return read

    async def _answer(self, interaction: Interaction, question: Question, heading: str) -> None:
        """Answer through the use case (``core.asking``) and post it with its buttons."""
        front = InteractionFront(self.bot, interaction, heading)
        shown = await self.bot.asking.ask(asker_of(interaction), question, front)
        if shown is None:
            return  # cancelled while it waited: the cancel button has said so already
        message = answer_message(interaction.user, shown, heading)
        await interaction.edit_original_response(content=None, **message, view=answer_view(shown.request_id))

    # Buttons

    async def on_reroll(self, interaction: Interaction, request_id: int) -> None:
        stored = await self.bot.asking.stored(request_id, asker_of(interaction))
        origin = stored.origin_user_id or stored.user_id
        question = Question(
            _stored(stored.images), stored.prompt, stored.task, reroll_params(stored.params), stored, origin
        )
        await self._answer(interaction, question, "re-rolled")

    async def on_prompt(self, interaction: Interaction, request_id: int) -> None:
        stored = await self.bot.asking.stored(request_id, asker_of(interaction))
        try:
            task = await self.bot.library.resolve(interaction.guild_id, stored.task)
            full = assemble_prompt([example.text for example in task.examples], stored.prompt)
        except UnknownTask:
            full = f"{stored.prompt}\n(task “{stored.task}” has since been deleted)"
        embed = prompt_embed(stored, full, self.bot.asking.models, self.bot.settings.generation)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    async def on_delete(self, interaction: Interaction, request_id: int) -> None:
        stored = await self.bot.store.get_request(request_id, interaction.guild_id, interaction.user.id)
        # Once the request is gone (forgotten, expired, or beyond the storage budget), Discord still knows who asked.
        metadata = interaction.message.interaction_metadata if interaction.message else None
        owners = stored.owners if stored is not None else {metadata.user.id} if metadata else set()
        if interaction.user.id not in owners and not interaction.permissions.manage_messages:
            raise NotAllowedHere("Only the person who asked, or a member with Manage Messages, can delete this answer.")
        await interaction.response.defer()
        await interaction.delete_original_response()
        if request_id != UNSTORED:
            await self.bot.store.delete_request(request_id, interaction.guild_id, interaction.user.id)

    async def on_report(self, interaction: Interaction, request_id: int) -> None:
        rules = await self.bot.asking.rules(interaction.guild_id)
        if rules.report_channel is None:
            raise NotAllowedHere("This server has no report channel; a moderator can set one with /settings reports.")
        # Acknowledged first: posting may wait on the report channel's rate limit past Discord's 3 seconds.
        await interaction.response.defer(ephemeral=True, thinking=True)
        # An unstored answer is told apart from others by its message (whose id is far above any request's).
        answer = request_id if request_id != UNSTORED or interaction.message is None else interaction.message.id
        if not self.bot.reports.first(answer, interaction.user.id):
            raise NotAllowedHere("You have already reported this answer; the moderators have it.")
        try:
            stored = await self.bot.store.get_request(request_id, interaction.guild_id, interaction.user.id)
            embed, files = report_message(interaction, stored)
            await self.bot.get_partial_messageable(rules.report_channel).send(embed=embed, files=files)
        except BaseException as error:  # not posted, whatever stopped it: the member may report again
            self.bot.reports.forget(answer, interaction.user.id)
            if isinstance(error, discord.HTTPException):
                raise NotAllowedHere(
                    "I could not post in this server's report channel; ask a moderator to check /settings reports."
                ) from None
            raise
        await interaction.followup.send("Thank you; the moderators have been told.", ephemeral=True)

    async def on_cancel(self, interaction: Interaction, interaction_id: int) -> None:
        waiting = self.bot.waiting.get(interaction_id)
        if waiting is None:
            raise RequestCancelled("That request is no longer waiting: it has been answered or withdrawn.")
        ticket, requester = waiting
        if interaction.user.id != requester and not interaction.permissions.manage_messages:
            raise NotAllowedHere(
                "Only the person who asked, or a member with Manage Messages, can cancel this request."
            )
        del self.bot.waiting[interaction_id]  # no more of its answer is shown: what was written stays
        ticket.cancel()
        written = interaction.message.embeds[:1] if interaction.message else []  # an answer being written
        for embed in written:
            embed.set_footer(text="cancelled")
        await interaction.response.edit_message(
            content=f"Cancelled by {interaction.user.mention}.", embeds=written, view=None
        )

    async def cog_load(self) -> None:
        # Context menus cannot be cog methods: added here and removed on unload, so reloads work.
        self.bot.tree.add_command(self._describe_menu)
        self.bot.add_dynamic_items(ActionButton)  # the same class on every load (cogs/utils/buttons.py)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self._describe_menu.name, type=self._describe_menu.type)


async def setup(bot: FlamingoBot) -> None:
    await bot.add_cog(Inference(bot))
