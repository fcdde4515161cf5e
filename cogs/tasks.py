"""Task libraries: ``/tasks`` to browse (everyone), ``/manage-tasks`` to change (Manage Server).

Two groups rather than one, because Discord ignores ``default_permissions`` on subcommands.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging

import discord
from discord import app_commands
from discord.ext import commands

from cogs.utils.answering import answer_deadline, asker_of
from cogs.utils.attachments import download
from cogs.utils.autocomplete import model_names, task_names
from cogs.utils.bot import FlamingoBot, Interaction
from cogs.utils.buttons import CancelEvaluationButton
from cogs.utils.checks import ManageServerGroup, server_id
from cogs.utils.options import limit_options
from cogs.utils.replies import (
    EMBED_DESCRIPTION_LIMIT,
    EMBED_FIELD_LIMIT,
    EMBED_TOTAL_LIMIT,
    PLACE_SHOWN,
    clip,
    verbatim,
)
from core.errors import LimitReached
from core.evaluation.jobs import EvaluationJob, EvaluationResult, EvaluationRunning
from core.evaluation.report import as_csv
from core.images import check_file_size
from core.serving.model_choice import ModelCatalog
from core.tasks.archive import FILENAME_SUFFIX, BadArchive, archive_filename, write_archive
from core.tasks.library import MAX_NAME_CHARS, TaskLibrary, UploadReader
from core.tasks.views import LibraryUsage, TaskDetails, TaskInfo
from core.wording import byte_size, duration, plural

log = logging.getLogger(__name__)

_COLOUR = discord.Colour.blurple()
# The least time between two edits of an evaluation's progress: Discord limits a message's edits.
PROGRESS_SECONDS = 5.0


def _line(task: TaskInfo) -> str:
    kind = "built-in" if task.builtin else "this server"
    count = plural(task.example_count, "example")
    return f"**{task.name}** ({kind}, {count}): {discord.utils.escape_markdown(task.description)}"


def task_list_embed(tasks: list[TaskInfo], default: str, usage: LibraryUsage | None) -> discord.Embed:
    lines: list[str] = []
    for index, task in enumerate(tasks):
        line = _line(task) + (" · *default*" if task.name == default else "")
        rest = len(tasks) - index
        if sum(len(x) + 1 for x in lines) + len(line) + 20 > EMBED_DESCRIPTION_LIMIT:
            lines.append(f"… and {rest} more")
            break
        lines.append(line)
    embed = discord.Embed(title="Tasks", description="\n".join(lines), colour=_COLOUR)
    if usage is not None:
        embed.set_footer(
            text=f"This server's tasks: {usage.tasks} of {usage.max_tasks} · their images: "
            f"{byte_size(usage.image_bytes)} of {byte_size(usage.max_image_bytes)}"
        )
    return embed


def task_details_message(details: TaskDetails) -> dict:
    """A header embed, then one embed per example with its image as a thumbnail (at most 10 each)."""
    info = details.info
    header = discord.Embed(title=info.name, description=discord.utils.escape_markdown(info.description), colour=_COLOUR)
    template = clip(verbatim(details.prompt_template), EMBED_FIELD_LIMIT - 2)
    header.add_field(name="Prompt template", value=f"`{template}`", inline=False)
    origin = "built-in, read-only" if info.builtin else "this server's"
    header.set_footer(text=f"{origin} · {plural(info.example_count, 'example')}")
    embeds, files = [header], []
    shown = details.examples[:9]
    # All embeds of a message share Discord's 6000 characters; the examples split what is left.
    per_example = min(1000, (EMBED_TOTAL_LIMIT - len(header) - 200) // max(1, len(shown)))
    for example in shown:
        filename = f"example-{example.position}.jpg"
        embed = discord.Embed(description=f"`{clip(verbatim(example.text), per_example - 2)}`", colour=_COLOUR)
        embed.set_author(name=f"Example {example.position}")
        embed.set_thumbnail(url=f"attachment://{filename}")
        embeds.append(embed)
        files.append(discord.File(io.BytesIO(example.image), filename=filename))
    return {"embeds": embeds, "files": files}


def evaluation_progress(job: EvaluationJob, model: str) -> str:
    """``model`` as the catalog shows it (``ModelCatalog.shown``)."""
    return (
        f"⏳ Evaluating task **{job.task}** with {model}: {job.answered} of "
        f"{plural(job.total, 'example')} answered. Members' requests go first, so this may take a while."
    )


def evaluation_embed(result: EvaluationResult, model: str) -> discord.Embed:
    """The scores as percentages, what was scored and left out, and the time the answers took;
    ``model`` as the catalog shows it, saying so when its layers sit on another language model."""
    evaluation, stopped = result.evaluation, result.stopped
    scored = len(evaluation.examples)
    lines = ["Each example answered with the others as its context, and scored as a VQA answer."]
    if stopped is not None:
        lines.insert(0, f"**Stopped early:** {stopped} The scores are of the {plural(scored, 'example')} answered.")
    colour = _COLOUR if stopped is None else discord.Colour.orange()
    embed = discord.Embed(title=f"Evaluation of {evaluation.task}", description="\n".join(lines), colour=colour)
    embed.add_field(name="Model", value=clip(model, EMBED_FIELD_LIMIT))
    if scored:
        embed.add_field(name="Exact match", value=f"{evaluation.exact_match:.1%}")
        embed.add_field(name="F1", value=f"{evaluation.f1:.1%}")
    examples = f"{scored} of {result.total} scored" if stopped is not None else f"{scored} scored"
    if evaluation.unsplit:
        examples += f" · {len(evaluation.unsplit)} left out (no answer found in the text)"
    embed.add_field(name="Examples", value=examples)
    seconds = evaluation.seconds
    took = duration(seconds) if seconds >= 60 else f"{seconds:.1f} s"
    per_example = f" ({seconds / scored:.1f} s each)" if scored else ""
    embed.add_field(name="Time", value=took + per_example)
    embed.set_footer(text="Every example, expected and answered, is in the attached file.")
    return embed


def _cancelling(job_id: int) -> discord.ui.View:
    """The Cancel button of the evaluation ``job_id``."""
    view = discord.ui.View(timeout=None)
    view.add_item(CancelEvaluationButton(job_id))
    return view


class EvaluationMessage:
    """The deferred reply as an evaluation's progress (``core.evaluation.jobs.EvaluationFront``): the
    examples answered, edited at most every ``PROGRESS_SECONDS``, with a Cancel button."""

    def __init__(self, interaction: Interaction, models: ModelCatalog) -> None:
        self.interaction = interaction
        self.models = models
        self.deadline = answer_deadline(interaction)
        self._ticker: asyncio.Task[None] | None = None

    async def started(self, job: EvaluationJob) -> None:
        self.interaction.extras[PLACE_SHOWN] = True  # a failure replaces the progress, and its button
        await self._show(job)
        self._ticker = asyncio.create_task(self._tick(job))

    async def _tick(self, job: EvaluationJob) -> None:
        shown = job.answered
        while True:
            await asyncio.sleep(PROGRESS_SECONDS)
            if job.answered != shown:
                shown = job.answered
                try:
                    await self._show(job)
                except discord.HTTPException:  # the result replaces it anyway
                    log.warning("could not show an evaluation's progress", exc_info=True)

    async def _show(self, job: EvaluationJob) -> None:
        await self.interaction.edit_original_response(
            content=evaluation_progress(job, self.models.shown(job.model)), view=_cancelling(job.id)
        )

    async def stop(self) -> None:
        """No more progress: an edit under way is finished first, so the result comes after it."""
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)


class Tasks(commands.Cog):
    browse = app_commands.Group(name="tasks", description="Browse the tasks that guide the model's answers")
    manage = ManageServerGroup(name="manage-tasks", description="Create and change this server's tasks")

    def __init__(self, bot: FlamingoBot) -> None:
        self.bot = bot
        limits = bot.settings.limits
        name, positions = (1, MAX_NAME_CHARS), (1, limits.max_examples_per_task)
        text, template, description = (
            (1, limits.max_example_chars),
            (1, limits.max_template_chars),
            (0, limits.max_description_chars),
        )
        for command_name, options in {
            "import": {"name": name},
            "create": {"name": name, "template": template, "description": description},
            "add-example": {"text": text},
            "edit-example": {"position": positions, "text": text},
            "remove-example": {"position": positions},
            "move-example": {"position": positions, "to": positions},
            "edit": {"description": description, "template": template},
            "rename": {"new_name": name},
            "copy": {"new_name": name},
        }.items():
            command = self.manage.get_command(command_name)
            assert isinstance(command, app_commands.Command)
            limit_options(command, **options)

    @property
    def library(self) -> TaskLibrary:
        return self.bot.library

    @browse.command(name="list", description="The built-in tasks and this server's")
    async def list_tasks(self, interaction: Interaction) -> None:
        await self.bot.asking.check_allowed(asker_of(interaction))
        tasks = await self.library.list_tasks(interaction.guild_id)
        default = await self.library.default_task_name(interaction.guild_id)
        usage = await self.library.usage(interaction.guild_id) if interaction.guild_id is not None else None
        await interaction.response.send_message(embed=task_list_embed(tasks, default, usage), ephemeral=True)

    @browse.command(name="show", description="A task's prompt and examples")
    @app_commands.describe(task="The task's name")
    @app_commands.autocomplete(task=task_names)
    async def show(self, interaction: Interaction, task: str) -> None:
        await self.bot.asking.check_allowed(asker_of(interaction))
        await interaction.response.defer(ephemeral=True, thinking=True)
        details = await self.library.preview(interaction.guild_id, task)
        await interaction.followup.send(**task_details_message(details), ephemeral=True)

    @browse.command(name="export", description="A task as one file, to import into another server")
    @app_commands.describe(task="The task's name")
    @app_commands.autocomplete(task=task_names)
    async def export(self, interaction: Interaction, task: str) -> None:
        await self.bot.asking.check_allowed(asker_of(interaction))
        await interaction.response.defer(ephemeral=True, thinking=True)
        archive = await self.library.export(interaction.guild_id, task)
        data = await asyncio.to_thread(write_archive, archive, discord.utils.utcnow())
        if len(data) > interaction.filesize_limit:
            raise LimitReached(
                f"Task “{archive.name}” makes a {byte_size(len(data))} file; Discord lets me attach at most "
                f"{byte_size(interaction.filesize_limit)} here. Remove an example or two and try again."
            )
        count = len(archive.examples)
        await interaction.followup.send(
            f"Task **{archive.name}** with {plural(count, 'example')}. "
            "Someone with Manage Server can add it to any server with `/manage-tasks import`.",
            file=discord.File(io.BytesIO(data), filename=archive_filename(archive.name)),
            ephemeral=True,
        )

    @manage.command(name="import", description="Add a task from a file made by /tasks export")
    @app_commands.describe(file="The .flamingo-task.zip file", name="A name for it here (default: its own)")
    async def import_task(self, interaction: Interaction, file: discord.Attachment, name: str | None = None) -> None:
        limit = self.bot.settings.limits.max_import_bytes
        if file.size > limit:
            raise BadArchive(f"The task file is {file.size:,} bytes; the limit is {limit:,} bytes.")
        await interaction.response.defer(ephemeral=True, thinking=True)
        imported = await self.library.import_task(server_id(interaction), self._reader(file), interaction.user.id, name)
        await interaction.followup.send(f"Imported task **{imported}**.", ephemeral=True)

    @manage.command(description="Create a task (add examples to it afterwards)")
    @app_commands.describe(
        name="Lowercase letters, digits, - and _",
        template="The prompt used when a request gives none; must contain <image>",
        description="What the task is for",
    )
    async def create(self, interaction: Interaction, name: str, template: str, description: str = "") -> None:
        created = await self.library.create(server_id(interaction), name, description, template, interaction.user.id)
        await self._done(interaction, f"Created task **{created}**. Add examples with `/manage-tasks add-example`.")

    @manage.command(name="add-example", description="Add an image and its text to a task")
    @app_commands.describe(task="The task", image="The example's picture", text="The example's text, with one <image>")
    @app_commands.autocomplete(task=task_names)
    async def add_example(self, interaction: Interaction, task: str, image: discord.Attachment, text: str) -> None:
        check_file_size(image.size, self.bot.settings.images)
        await interaction.response.defer(ephemeral=True, thinking=True)
        position = await self.library.add_example(
            server_id(interaction), task, self._reader(image), text, interaction.user.id
        )
        await interaction.followup.send(f"Added example {position} to **{task}**.", ephemeral=True)

    @manage.command(name="edit-example", description="Change the text of an example")
    @app_commands.describe(task="The task", position="The example's number (1 is the first)", text="Its new text")
    @app_commands.autocomplete(task=task_names)
    async def edit_example(self, interaction: Interaction, task: str, position: int, text: str) -> None:
        await self.library.edit_example(server_id(interaction), task, position, text)
        await self._done(interaction, f"Changed example {position} of **{task}**.")

    @manage.command(name="remove-example", description="Remove an example; later ones move up")
    @app_commands.describe(task="The task", position="The example's number (1 is the first)")
    @app_commands.autocomplete(task=task_names)
    async def remove_example(self, interaction: Interaction, task: str, position: int) -> None:
        await self.library.remove_example(server_id(interaction), task, position)
        await self._done(interaction, f"Removed example {position} from **{task}**.")

    @manage.command(name="move-example", description="Move an example to another position")
    @app_commands.describe(task="The task", position="Where it is now", to="Where it should be")
    @app_commands.autocomplete(task=task_names)
    async def move_example(self, interaction: Interaction, task: str, position: int, to: int) -> None:
        await self.library.move_example(server_id(interaction), task, position, to)
        await self._done(interaction, f"Moved example {position} of **{task}** to position {to}.")

    @manage.command(description="Change a task's description or prompt template")
    @app_commands.describe(
        task="The task",
        description="What the task is for",
        template="The prompt used when a request gives none; must contain <image>",
    )
    @app_commands.autocomplete(task=task_names)
    async def edit(
        self, interaction: Interaction, task: str, description: str | None = None, template: str | None = None
    ) -> None:
        await self.library.update(server_id(interaction), task, description, template)
        await self._done(interaction, f"Updated **{task}**.")

    @manage.command(description="Rename a task")
    @app_commands.describe(task="The task", new_name="Lowercase letters, digits, - and _")
    @app_commands.autocomplete(task=task_names)
    async def rename(self, interaction: Interaction, task: str, new_name: str) -> None:
        renamed = await self.library.rename(server_id(interaction), task, new_name)
        await self._done(interaction, f"Renamed **{task}** to **{renamed}**.")

    @manage.command(description="Delete a task and its examples")
    @app_commands.describe(task="The task")
    @app_commands.autocomplete(task=task_names)
    async def delete(self, interaction: Interaction, task: str) -> None:
        default = await self.library.default_task_name(interaction.guild_id)
        deleted = await self.library.delete(server_id(interaction), task)
        if deleted == default:
            now = await self.library.default_task_name(interaction.guild_id)
            await self._done(interaction, f"Deleted **{deleted}**; the default task is now **{now}**.")
            return
        await self._done(interaction, f"Deleted **{deleted}**.")

    @manage.command(description="Copy a task (built-in or this server's) under a new name, to edit it")
    @app_commands.describe(task="The task to copy", new_name="Lowercase letters, digits, - and _")
    @app_commands.autocomplete(task=task_names)
    async def copy(self, interaction: Interaction, task: str, new_name: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        copied = await self.library.copy(server_id(interaction), task, new_name, interaction.user.id)
        await interaction.followup.send(f"Copied **{task}** to **{copied}**.", ephemeral=True)

    @manage.command(name="set-default", description="The task /comprehend uses when none is given")
    @app_commands.describe(task="Leave empty to go back to caption")
    @app_commands.autocomplete(task=task_names)
    async def set_default(self, interaction: Interaction, task: str | None = None) -> None:
        chosen = await self.library.set_default(server_id(interaction), task)
        shown = chosen or await self.library.default_task_name(interaction.guild_id)
        await self._done(interaction, f"The default task is now **{shown}**.")

    @manage.command(description="Score a model on a task: each example answered with the others as context")
    @app_commands.describe(
        task="The task (at least 2 examples)", model="A model this bot offers (default: this server's)"
    )
    @app_commands.autocomplete(task=task_names, model=model_names)
    async def evaluate(self, interaction: Interaction, task: str, model: str | None = None) -> None:
        guild_id = server_id(interaction)
        await interaction.response.defer(ephemeral=True, thinking=True)
        models = self.bot.asking.models
        progress = EvaluationMessage(interaction, models)
        try:
            result = await self.bot.evaluations.evaluate(
                interaction.id, guild_id, interaction.user.id, task, model, progress
            )
        except EvaluationRunning as running:  # its own message, and its Cancel, may be another moderator's
            await interaction.edit_original_response(
                content=f"{running} You can also cancel it with this button.", view=_cancelling(running.job_id)
            )
            return
        finally:
            await progress.stop()
        filename = f"{archive_filename(result.evaluation.task).removesuffix(FILENAME_SUFFIX)}-evaluation.csv"
        await interaction.edit_original_response(
            content=None,
            embed=evaluation_embed(result, models.shown(result.model)),
            attachments=[discord.File(io.BytesIO(as_csv(result.evaluation)), filename=filename)],
            view=None,
        )

    async def on_cancel_evaluation(self, interaction: Interaction, job_id: int) -> None:
        """The evaluation's own reply shows how it ended, with what it answered: the click only acknowledges."""
        manages = interaction.permissions.manage_guild
        self.bot.evaluations.cancel(server_id(interaction), job_id, interaction.user.id, manages)
        await interaction.response.defer()

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(CancelEvaluationButton)  # the same class on every load (cogs/utils/buttons.py)

    def _reader(self, attachment: discord.Attachment) -> UploadReader:
        """The attachment's download, made only once the library lets the change in (quotas, checks)."""
        return functools.partial(download, attachment, self.bot.settings.images.download_seconds)

    @staticmethod
    async def _done(interaction: Interaction, message: str) -> None:
        await interaction.response.send_message(message, ephemeral=True)


async def setup(bot: FlamingoBot) -> None:
    await bot.add_cog(Tasks(bot))
