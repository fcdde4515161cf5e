"""``/comprehend`` and the message menu's Describe image: images and a prompt in, the model's answer out.

Every answer carries buttons (re-roll, prompt, delete, report) and every waiting request a cancel
button (``cogs/utils/buttons.py``); their clicks are handled here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import discord
from discord import app_commands
from discord.ext import commands

from cogs.utils.answer_views import prompt_embed, report_message
from cogs.utils.answering import (
    WITHHELD,
    Shown,
    answer_deadline,
    answer_message,
    check_rules,
    is_nsfw,
    wait_in_line,
)
from cogs.utils.autocomplete import task_names
from cogs.utils.bot import FlamingoBot
from cogs.utils.buttons import ActionButton, answer_view, button_view
from cogs.utils.options import drop_options, limit_options
from cogs.utils.replies import defer_answer
from core.config import Range
from core.errors import (
    BadImage,
    BadPrompt,
    FlamingoError,
    GenerationFailed,
    NotAllowedHere,
    RequestCancelled,
    UnknownTask,
)
from core.generation import GenerationParams, generation_kwargs
from core.guild_settings import GuildSettings
from core.images import check_file_size, check_signature, encode_for_storage, load_image
from core.prompts import assemble_prompt
from core.serving.model_choice import short_name
from core.storage.request_store import RequestBudget, StoredRequest
from core.wording import duration, quoted

log = logging.getLogger(__name__)

ImageReader = Callable[[], Awaitable[list[bytes]]]


@contextmanager
def _about_image(index: int, count: int, filename: str | None = None) -> Iterator[None]:
    """With several images, a refusal says which one it is about."""
    try:
        yield
    except BadImage as error:
        if count == 1:
            raise
        raise BadImage(f"Image {index}{f' ({quoted(filename, 60)})' if filename else ''}: {error}") from None


def _reader(attachments: list[discord.Attachment]) -> ImageReader:
    async def read() -> list[bytes]:
        return [await attachment.read() for attachment in attachments]

    return read


def _stored(images: tuple[bytes, ...]) -> ImageReader:
    async def read() -> list[bytes]:
        return list(images)

    return read


def reroll_params(params: GenerationParams) -> GenerationParams:
    """A new sample of the same request: sampling on, beam search off (it would give the same answer)."""
    if params.do_sample:
        return params
    return replace(params, do_sample=True, num_beams=1, length_penalty=None)


class Inference(commands.Cog):
    def __init__(self, bot: FlamingoBot) -> None:
        self.bot = bot
        self._describe_menu = app_commands.ContextMenu(name="Describe image", callback=self.describe_image)
        settings = bot.settings
        ranges = {name: (value.low, value.high) for name, value in settings.generation if isinstance(value, Range)}
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
        max_new_tokens="Longest answer, in tokens",
        min_new_tokens="Shortest answer, in tokens (the model tends to answer briefly)",
        do_sample="Sample instead of taking the most likely words",
        temperature="Sampling randomness (needs do_sample)",
        top_p="Nucleus sampling mass (needs do_sample)",
        top_k="Sample among this many likeliest tokens (needs do_sample)",
        num_beams="Beam search width",
        repetition_penalty="Above 1 discourages repeating",
        length_penalty="Beam search preference for longer answers (needs num_beams > 1)",
        no_repeat_ngram_size="Never repeat a sequence of this many tokens",
    )
    @app_commands.autocomplete(task=task_names)
    async def comprehend(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
        image4: discord.Attachment | None = None,
        prompt: str | None = None,
        task: str | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        num_beams: int = 1,
        repetition_penalty: float | None = None,
        length_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> None:
        settings = self.bot.settings
        params = GenerationParams(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            num_beams=num_beams,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        # Refusals that need no download and no model are given at once, privately.
        generation_kwargs(params, settings.generation)
        images = [a for a in (image, image2, image3, image4) if a is not None]
        if len(images) > settings.images.max_per_request:
            raise BadImage(f"At most {settings.images.max_per_request} images can be read at once.")
        for index, attachment in enumerate(images, 1):
            with _about_image(index, len(images), attachment.filename):
                check_file_size(attachment.size, settings.images)
        if prompt is None and len(images) > 1:
            raise BadPrompt(
                f"With {len(images)} images, write a prompt with one `<image>` for each, in order, "
                f"e.g. `{'<image>' * len(images)}Output:`."
            )
        if prompt is not None:
            self.bot.service.rules.check_text(prompt, len(images))

        await self._answer(interaction, _reader(images), prompt, task, params, "asked")

    async def describe_image(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """The message menu's "Describe image": the server's default task on the message's first image.

        Only attachments are read: fetching links from a message would let anyone make the bot
        request any address.
        """
        images = [a for a in message.attachments if (a.content_type or "").startswith("image/")]
        if not images:
            raise BadImage("That message has no attached image; I only read attached images, not links.")
        check_file_size(images[0].size, self.bot.settings.images)
        await self._answer(
            interaction, _reader(images[:1]), None, None, GenerationParams(), "asked", origin=message.author.id
        )

    async def _answer(
        self,
        interaction: discord.Interaction,
        read_images: ImageReader,
        prompt: str | None,
        task: str | None,
        params: GenerationParams,
        heading: str,
        rerolled: StoredRequest | None = None,
        origin: int | None = None,
    ) -> None:
        """Answer and post; a re-roll keeps the model of the answer it re-rolls, while that is offered.

        ``origin``: whose images these are, when not the asker's (see ``StoredRequest.origin_user_id``).
        """
        bot, settings = self.bot, self.bot.settings
        guild_id = interaction.guild_id
        rules = await bot.store.guild_settings(guild_id) if guild_id is not None else GuildSettings()
        check_rules(interaction, rules)
        with bot.quotas.admit(guild_id, interaction.user.id, rules.quotas(settings.quotas)) as admission:
            await defer_answer(interaction, ephemeral=rules.ephemeral_answers)
            chosen = await bot.library.resolve(guild_id, task)
            text = prompt if prompt is not None else chosen.prompt_template
            uploads = await read_images()
            for index, data in enumerate(uploads, 1):  # a file that is plainly not an image costs no cooldown
                with _about_image(index, len(uploads)):
                    check_signature(data, settings.images)
            admission.spent()  # reading headers and pixels is work a refusal must not let be repeated at once
            pictures = []
            for index, data in enumerate(uploads, 1):
                with _about_image(index, len(uploads)):
                    pictures.append(await asyncio.to_thread(load_image, data, settings.images))
            if settings.logging.log_prompts:
                log.info("request by %s in %s: %r", interaction.user.id, guild_id, text)
            started = time.monotonic()
            model = bot.models.in_force(rules.model if rerolled is None else rerolled.model)
            other = None if model == bot.models.default else model
            try:
                ticket = bot.service.submit(pictures, text, chosen, params, answer_deadline(interaction), other)
                bot.waiting[interaction.id] = (ticket, interaction.user.id)
                cancel = button_view(ActionButton("cancel", interaction.id))
                answer = await wait_in_line(
                    interaction, ticket, cancel, settings.service.queue_update_seconds, bot.service.estimated_wait
                )
            except RequestCancelled:
                bot.metrics.ended("cancelled")
                return  # the cancel button has said so already
            except GenerationFailed:  # the model's failure, told to the asker: not a refusal
                bot.metrics.ended("failed")
                raise
            except FlamingoError:  # busy, expired, out of time, a model not offered
                bot.metrics.ended("refused")
                raise
            except Exception:
                bot.metrics.ended("failed")
                raise
            finally:
                bot.waiting.pop(interaction.id, None)
            elapsed = time.monotonic() - started
            bot.metrics.answered(elapsed)
            images = [await asyncio.to_thread(encode_for_storage, picture) for picture in pictures]
            channel_id = interaction.channel_id or 0
            request_id = await bot.store.save_request(
                guild_id,
                channel_id,
                interaction.user.id,
                chosen.name,
                text,
                params,
                images,
                other,
                origin,
                budget=RequestBudget.of(settings.storage),
            )
            # What happened, never what was asked: prompts are logged above only when allowed.
            log.info(
                "request %d answered in guild %s: task %s, model %s, %d image(s), %d tokens in %.1f s "
                "after %.1f s in line",
                request_id,
                guild_id,
                chosen.name,
                short_name(model),
                len(pictures),
                len(answer.token_ids),
                answer.seconds,
                max(0.0, elapsed - answer.seconds),
            )
        withheld = not is_nsfw(interaction) and bot.answer_filter.blocks(answer.text)
        shown = Shown(WITHHELD if withheld else answer.text, chosen.name, text, answer, images, other)
        message = answer_message(interaction.user, shown, heading)
        await interaction.edit_original_response(content=None, **message, view=answer_view(request_id))

    # Buttons

    async def _request(self, interaction: discord.Interaction, request_id: int) -> StoredRequest:
        stored = await self.bot.store.get_request(request_id, interaction.guild_id)
        if stored is None:
            kept = duration(self.bot.settings.privacy.request_retention_hours)
            raise RequestCancelled(
                f"This answer's request is no longer stored: pictures and prompts are kept up to {kept} (less "
                "when a server's stored requests reach their space limit), and may be deleted sooner. "
                "Ask again with /comprehend."
            )
        return stored

    async def on_reroll(self, interaction: discord.Interaction, request_id: int) -> None:
        stored = await self._request(interaction, request_id)
        params = reroll_params(stored.params)
        images = _stored(stored.images)
        origin = stored.origin_user_id or stored.user_id
        await self._answer(interaction, images, stored.prompt, stored.task, params, "re-rolled", stored, origin)

    async def on_prompt(self, interaction: discord.Interaction, request_id: int) -> None:
        stored = await self._request(interaction, request_id)
        try:
            task = await self.bot.library.resolve(interaction.guild_id, stored.task)
            full = assemble_prompt([example.text for example in task.examples], stored.prompt)
        except UnknownTask:
            full = f"{stored.prompt}\n(task “{stored.task}” has since been deleted)"
        embed = prompt_embed(
            stored, full, short_name(stored.model or self.bot.models.default), self.bot.settings.generation
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)

    async def on_delete(self, interaction: discord.Interaction, request_id: int) -> None:
        stored = await self.bot.store.get_request(request_id, interaction.guild_id)
        # Once the request is gone (forgotten, expired, or beyond the storage budget), Discord still knows who asked.
        metadata = interaction.message.interaction_metadata if interaction.message else None
        owners = stored.owners if stored is not None else {metadata.user.id} if metadata else set()
        if interaction.user.id not in owners and not interaction.permissions.manage_messages:
            raise NotAllowedHere("Only the person who asked, or a member with Manage Messages, can delete this answer.")
        await interaction.response.defer()
        await interaction.delete_original_response()
        await self.bot.store.delete_request(request_id, interaction.guild_id)

    async def on_report(self, interaction: discord.Interaction, request_id: int) -> None:
        rules = await self.bot.store.guild_settings(interaction.guild_id) if interaction.guild_id else GuildSettings()
        if rules.report_channel is None:
            raise NotAllowedHere("This server has no report channel; a moderator can set one with /settings reports.")
        # Acknowledged first: posting may wait on the report channel's rate limit past Discord's 3 seconds.
        await interaction.response.defer(ephemeral=True, thinking=True)
        if not self.bot.reports.first(request_id, interaction.user.id):
            raise NotAllowedHere("You have already reported this answer; the moderators have it.")
        try:
            stored = await self.bot.store.get_request(request_id, interaction.guild_id)
            embed, files = report_message(interaction, stored)
            await self.bot.get_partial_messageable(rules.report_channel).send(embed=embed, files=files)
        except BaseException as error:  # not posted, whatever stopped it: the member may report again
            self.bot.reports.forget(request_id, interaction.user.id)
            if isinstance(error, discord.HTTPException):
                raise NotAllowedHere(
                    "I could not post in this server's report channel; ask a moderator to check /settings reports."
                ) from None
            raise
        await interaction.followup.send("Thank you; the moderators have been told.", ephemeral=True)

    async def on_cancel(self, interaction: discord.Interaction, interaction_id: int) -> None:
        waiting = self.bot.waiting.get(interaction_id)
        if waiting is None:
            raise RequestCancelled("That request is no longer waiting: it has been answered or withdrawn.")
        ticket, requester = waiting
        if interaction.user.id != requester and not interaction.permissions.manage_messages:
            raise NotAllowedHere(
                "Only the person who asked, or a member with Manage Messages, can cancel this request."
            )
        ticket.cancel()
        await interaction.response.edit_message(content=f"Cancelled by {interaction.user.mention}.", view=None)

    async def cog_load(self) -> None:
        # Context menus cannot be cog methods: added here and removed on unload, so reloads work.
        self.bot.tree.add_command(self._describe_menu)
        self.bot.add_dynamic_items(ActionButton)  # the same class on every load (cogs/utils/buttons.py)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self._describe_menu.name, type=self._describe_menu.type)


async def setup(bot: FlamingoBot) -> None:
    await bot.add_cog(Inference(bot))
