"""``/comprehend``: an image and a prompt in, the model's answer out."""

from __future__ import annotations

import asyncio
import io
import logging

import discord
from discord import app_commands
from discord.ext import commands

from cogs.utils.autocomplete import task_names
from cogs.utils.bot import FlamingoBot
from cogs.utils.replies import EMBED_DESCRIPTION_LIMIT, EMBED_FIELD_LIMIT, clip, defer_publicly
from core.engine import Answer
from core.errors import BadImage, BadPrompt
from core.generation import GenerationParams, generation_kwargs
from core.images import check_file_size, encode_for_storage, load_image

log = logging.getLogger(__name__)

_ANSWER_COLOUR = discord.Colour.from_rgb(232, 93, 117)


def answer_message(user: discord.abc.User, prompt: str, task: str, answer: Answer, images: list[bytes]) -> dict:
    """The reply: the answer as an embed under the user's (first) image; a long answer also as a file."""
    text = answer.text or "*(the model gave an empty answer)*"
    embed = discord.Embed(description=clip(text, EMBED_DESCRIPTION_LIMIT), colour=_ANSWER_COLOUR)
    embed.set_author(name=f"{user.display_name} asked", icon_url=user.display_avatar.url)
    embed.add_field(name="Prompt", value=clip(discord.utils.escape_markdown(prompt), EMBED_FIELD_LIMIT), inline=False)
    embed.set_image(url="attachment://image.jpg")
    embed.set_footer(text=f"task: {task} · {len(answer.token_ids)} tokens · {answer.seconds:.1f} s")
    names = ["image.jpg"] + [f"image-{n}.jpg" for n in range(2, len(images) + 1)]
    files = [discord.File(io.BytesIO(data), filename=name) for data, name in zip(images, names, strict=True)]
    if len(text) > EMBED_DESCRIPTION_LIMIT:
        files.append(discord.File(io.BytesIO(answer.text.encode()), filename="answer.txt"))
    return {"embed": embed, "attachments": files}


class Inference(commands.Cog):
    def __init__(self, bot: FlamingoBot) -> None:
        self.bot = bot
        self._describe_menu = app_commands.ContextMenu(name="Describe image", callback=self.describe_image)

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
        self.bot.track(asyncio.current_task())  # type: ignore[arg-type]
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
        for attachment in images:
            check_file_size(attachment.size, settings.images)
        if prompt is None and len(images) > 1:
            raise BadPrompt(
                f"With {len(images)} images, write a prompt with one `<image>` for each, in order, "
                f"e.g. `{'<image>' * len(images)}Output:`."
            )
        if prompt is not None:
            self.bot.service.engine.check_text(prompt, len(images))

        await self._answer(interaction, images, prompt, task, params)

    async def describe_image(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """The message menu's "Describe image": the server's default task on the message's first image.

        Only attachments are read: fetching links from a message would let anyone make the bot
        request any address.
        """
        self.bot.track(asyncio.current_task())  # type: ignore[arg-type]
        images = [a for a in message.attachments if (a.content_type or "").startswith("image/")]
        if not images:
            raise BadImage("That message has no attached image; I only read attached images, not links.")
        check_file_size(images[0].size, self.bot.settings.images)
        await self._answer(interaction, images[:1], None, None, GenerationParams())

    async def _answer(
        self,
        interaction: discord.Interaction,
        attachments: list[discord.Attachment],
        prompt: str | None,
        task: str | None,
        params: GenerationParams,
    ) -> None:
        settings = self.bot.settings
        with self.bot.quotas.admit(interaction.guild_id, interaction.user.id):
            await defer_publicly(interaction)
            chosen = await self.bot.library.resolve(interaction.guild_id, task)
            text = prompt if prompt is not None else chosen.prompt_template
            pictures = [await asyncio.to_thread(load_image, await a.read(), settings.images) for a in attachments]
            if settings.logging.log_prompts:
                log.info("request by %s in %s: %r", interaction.user.id, interaction.guild_id, text)
            answer = await self.bot.service.answer(pictures, text, chosen, params)
            shown = [await asyncio.to_thread(encode_for_storage, picture) for picture in pictures]
        message = answer_message(interaction.user, text, chosen.name, answer, shown)
        await interaction.edit_original_response(**message)

    async def cog_load(self) -> None:
        # Context menus cannot be cog methods: added here and removed on unload, so reloads work.
        self.bot.tree.add_command(self._describe_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self._describe_menu.name, type=self._describe_menu.type)


async def setup(bot: FlamingoBot) -> None:
    await bot.add_cog(Inference(bot))
