"""Per-guild task libraries: the rules for names, texts and sizes, over the store and the built-ins.

Built-in tasks are visible in every guild and read-only; a guild copies one to change it. Every
change is checked so that a saved task always fits the model's context with the default number
of new tokens. Changes that read an upload (an example's image, a task file) have quotas of their
own (``QuotaSettings.task_uploads``) and are read in the task-upload worker (``core.tasks.uploads``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

from core.config import Settings
from core.errors import (
    BadImage,
    BadName,
    BadParameter,
    BadPrompt,
    FlamingoError,
    LimitReached,
    ReadOnlyTask,
    TaskChanged,
    TaskExists,
    UnknownTask,
)
from core.images import StoredImage, check_signature, encode_for_storage, preview
from core.model.lru_cache import LruCache
from core.prompts import IMAGE_TOKEN, Example, Task, assemble_prompt
from core.quotas import TASK_UPLOADS, Admission, RequestQuotas
from core.storage.task_store import StoredTask, TaskStore
from core.tasks.archive import ArchivedExample, ArchiveLimits, BadArchive, TaskArchive, archive_limits
from core.tasks.builtin import DEFAULT_TASK
from core.tasks.uploads import stored_image, task_file
from core.tasks.views import ExampleView, LibraryUsage, TaskDetails, TaskInfo
from core.wording import quoted

T = TypeVar("T")
# An upload still to be fetched (from Discord, say): fetched only once the change is let in and checked.
UploadReader = Callable[[], Awaitable[bytes]]
# Changes at the same moment to one task are applied one after another, each checked anew; past
# this many, the last refusal is shown.
_WRITE_ATTEMPTS = 8

MAX_NAME_CHARS = 32
NAME_PATTERN = re.compile(rf"[a-z0-9][a-z0-9_-]{{0,{MAX_NAME_CHARS - 1}}}")
_NAME_RULE = (
    f"1 to {MAX_NAME_CHARS} characters: lowercase letters, digits, '-' and '_', starting with a letter or digit"
)


class TextRules(Protocol):
    """What the library needs from the model: its text checks and its token counts."""

    def check_text(self, text: str, images: int, what: str = "prompt") -> str: ...

    def count_tokens(self, text: str) -> int: ...

    @property
    def context_length(self) -> int: ...


def check_name(name: str) -> str:
    name = name.strip()
    if not NAME_PATTERN.fullmatch(name):
        raise BadName(f"{quoted(name)} is not a valid task name; use {_NAME_RULE}.")
    return name


class TaskLibrary:
    def __init__(self, store: TaskStore, builtins: dict[str, Task], rules: TextRules, settings: Settings) -> None:
        self.store = store
        self.builtins = builtins
        self.rules = rules
        self.settings = settings
        self.limits = settings.limits
        self.uploads = RequestQuotas(settings.quotas.task_uploads, wording=TASK_UPLOADS)
        # Server tasks by version (``service.task_image_cache_mb``), so that a request reads only which
        # version is stored, and each version's images are decoded at most once.
        self._tasks: LruCache[str, Task] = LruCache(settings.service.task_image_cache_mb * 2**20, _task_bytes)

    # Reading

    async def list_tasks(self, guild_id: int | None) -> list[TaskInfo]:
        stored = await self.store.list_tasks(guild_id) if guild_id is not None else []
        own = {s.name for s in stored}
        builtins = [
            TaskInfo(t.name, t.description, len(t.examples), builtin=True)
            for t in self.builtins.values()
            if t.name not in own
        ]
        return builtins + [TaskInfo(s.name, s.description, s.example_count, builtin=False) for s in stored]

    async def usage(self, guild_id: int) -> LibraryUsage:
        tasks, image_bytes = await self.store.count_tasks(guild_id), await self.store.image_bytes(guild_id)
        limits = self.limits
        return LibraryUsage(tasks, limits.max_tasks_per_guild, image_bytes, limits.max_task_image_bytes)

    async def names_like(self, guild_id: int | None, typed: str, limit: int = 25) -> list[str]:
        """Task names containing what was typed (those starting with it first): for autocomplete."""
        typed = typed.strip().lower()
        names = [task.name for task in await self.list_tasks(guild_id)]
        matching = [name for name in names if typed in name.lower()]
        matching.sort(key=lambda name: (not name.lower().startswith(typed), name.lower()))
        return matching[:limit]

    async def default_task_name(self, guild_id: int | None) -> str:
        chosen = await self.store.get_default_task(guild_id) if guild_id is not None else None
        return chosen or DEFAULT_TASK

    async def resolve(self, guild_id: int | None, name: str | None) -> Task:
        """The task to run: the one named, else the guild's default, else ``caption``."""
        if name is None:
            name = await self.default_task_name(guild_id)
        own = await self._stored_task(guild_id, name) if guild_id is not None else None
        if own is not None:
            return own
        builtin = self.builtins.get(name.strip().lower())
        if builtin is None:
            raise self._unknown(name)
        return builtin

    async def details(self, guild_id: int | None, name: str) -> TaskDetails:
        """A task with its examples' stored image bytes, for showing it."""
        builtin = await self._builtin(guild_id, name)
        if builtin is not None:
            images = await asyncio.to_thread(lambda: [encode_for_storage(e.image) for e in builtin.examples])
            pairs = zip(builtin.examples, images, strict=True)
            views = [ExampleView(i, example.text, image, added_by=0) for i, (example, image) in enumerate(pairs, 1)]
            info = TaskInfo(builtin.name, builtin.description, len(views), builtin=True)
            return TaskDetails(info, builtin.prompt_template, views)
        if guild_id is None:
            raise self._unknown(name)
        stored = await self._stored(guild_id, name)
        info = TaskInfo(stored.name, stored.description, len(stored.examples), builtin=False)
        views = [ExampleView(e.position, e.text, e.image, e.added_by) for e in stored.examples]
        return TaskDetails(info, stored.prompt_template, views)

    async def preview(self, guild_id: int | None, name: str) -> TaskDetails:
        """As ``details``, with images no larger than a preview needs: for showing, not exporting."""
        details = await self.details(guild_id, name)
        images = await asyncio.to_thread(lambda: [preview(example.image) for example in details.examples])
        examples = [replace(example, image=image) for example, image in zip(details.examples, images, strict=True)]
        return replace(details, examples=examples)

    # Changing

    async def create(self, guild_id: int, name: str, description: str, template: str, author_id: int) -> str:
        name = self._new_name(name)
        description = self._check_length(description.strip(), self.limits.max_description_chars, "description")
        template = self._check_template(template)
        return await self._save_new(guild_id, name, description, template, author_id, [])

    async def copy(self, guild_id: int, source: str, new_name: str, author_id: int) -> str:
        new_name = self._new_name(new_name)
        builtin = await self._builtin(guild_id, source)
        if builtin is not None:
            images = await asyncio.to_thread(lambda: [encode_for_storage(e.image) for e in builtin.examples])
            description, template = builtin.description, builtin.prompt_template
            examples = [(image, e.text, 0) for image, e in zip(images, builtin.examples, strict=True)]
        else:
            stored = await self._stored(guild_id, source)
            description, template = stored.description, stored.prompt_template
            examples = [(e.image, e.text, e.added_by) for e in stored.examples]  # still theirs to /forget-me
        return await self._save_new(guild_id, new_name, description, template, author_id, examples)

    async def export(self, guild_id: int | None, name: str) -> TaskArchive:
        details = await self.details(guild_id, name)
        examples = tuple(ArchivedExample(e.image, e.text, e.added_by or None) for e in details.examples)
        return TaskArchive(details.info.name, details.info.description, details.prompt_template, examples)

    async def import_task(
        self, guild_id: int, read_upload: UploadReader, author_id: int, name: str | None = None
    ) -> str:
        """A task file from an export, checked like every upload; a refused import changes nothing. Each
        example keeps the author the file names (so that their /forget-me reaches it), else the importer's."""
        with self.uploads.admit(guild_id, author_id, self.settings.quotas.task_uploads) as admission:
            upload = await read_upload()
            admission.spent()  # unpacking and hashing it is work: a refusal from here on keeps the cooldown
            archive = await task_file(upload, self.archive_limits, self.settings.images)
            return await self._import(guild_id, archive, author_id, name)

    async def _import(self, guild_id: int, archive: TaskArchive, author_id: int, name: str | None) -> str:
        try:
            new_name = self._new_name(name or archive.name)
            description = self._check_length(
                archive.description.strip(), self.limits.max_description_chars, "description"
            )
            template = self._check_template(archive.prompt_template)
            texts = [self._check_example_text(example.text) for example in archive.examples]
        except FlamingoError as error:
            raise BadArchive(f"The task file cannot be imported: {error}") from None
        self._check_fits(new_name, texts, template)
        try:
            await self.store.check_room(guild_id, new_name, max_tasks=self.limits.max_tasks_per_guild)
        except TaskExists as taken:
            raise TaskExists(f"{str(taken).removesuffix('.')} with the `name` option.") from None
        if archive.examples:
            await self.store.check_image_room(guild_id, max_image_bytes=self.limits.max_task_image_bytes)
        images = await self._stored_images(archive.examples)
        examples = [
            (image, text, example.author_id or author_id)
            for image, text, example in zip(images, texts, archive.examples, strict=True)
        ]
        return await self._save_new(guild_id, new_name, description, template, author_id, examples)

    async def _save_new(
        self,
        guild_id: int,
        name: str,
        description: str,
        template: str,
        author_id: int,
        examples: list[tuple[bytes, str, int]],
    ) -> str:
        """A whole task with its examples in one transaction, within the guild's task limit."""
        await self.store.create_task(
            guild_id,
            name,
            description,
            template,
            author_id,
            max_tasks=self.limits.max_tasks_per_guild,
            max_image_bytes=self.limits.max_task_image_bytes,
            examples=examples,
        )
        return name

    @property
    def archive_limits(self) -> ArchiveLimits:
        return archive_limits(self.limits, MAX_NAME_CHARS)

    async def _stored_images(self, examples: Sequence[ArchivedExample]) -> list[bytes]:
        """Each image decoded under the upload rules and re-encoded, one job each, so that other
        servers' uploads take their turns between them."""
        stored = []
        for position, example in enumerate(examples, 1):
            try:
                stored.append(await stored_image(example.image, self.settings.images))
            except BadImage as error:
                raise BadArchive(f"Example {position} of the task file: {error}") from None
        return stored

    async def update(self, guild_id: int, name: str, description: str | None, template: str | None) -> None:
        if description is None and template is None:
            raise BadParameter("Give a new description or template; nothing changed.")
        if description is not None:
            description = self._check_length(description.strip(), self.limits.max_description_chars, "description")
        if template is not None:
            template = self._check_template(template)

        async def write(stored: StoredTask) -> None:
            if template is not None:
                self._check_fits(stored.name, [e.text for e in stored.examples], template)
            await self.store.update_task(
                guild_id, stored.name, description=description, prompt_template=template, revision=stored.revision
            )

        await self._checked_write(guild_id, name, write)

    async def rename(self, guild_id: int, name: str, new_name: str) -> str:
        stored = await self._stored_for_change(guild_id, name, "cannot be renamed; copy it under the name you want")
        new_name = self._new_name(new_name)
        await self.store.rename_task(guild_id, stored.name, new_name)
        return new_name

    async def delete(self, guild_id: int, name: str) -> str:
        stored = await self._stored_for_change(guild_id, name, "cannot be deleted: every server has it")
        await self.store.delete_task(guild_id, stored.name)
        return stored.name

    async def add_example(self, guild_id: int, name: str, read_upload: UploadReader, text: str, author_id: int) -> int:
        """The upload is fetched and decoded once the change is let in and checked, whatever the attempts."""
        text = self._check_example_text(text)
        with self.uploads.admit(guild_id, author_id, self.settings.quotas.task_uploads) as admission:
            image: bytes | None = None

            async def write(stored: StoredTask) -> int:
                nonlocal image
                if len(stored.examples) >= self.limits.max_examples_per_task:
                    raise LimitReached(
                        f"Task “{stored.name}” already has {len(stored.examples)} examples, the most a task may have."
                    )
                self._check_fits(stored.name, [e.text for e in stored.examples] + [text], stored.prompt_template)
                if image is None:
                    await self.store.check_image_room(guild_id, max_image_bytes=self.limits.max_task_image_bytes)
                    image = await self._read_example(read_upload, admission)
                return await self.store.add_example(
                    guild_id,
                    stored.name,
                    image,
                    text,
                    max_examples=self.limits.max_examples_per_task,
                    max_image_bytes=self.limits.max_task_image_bytes,
                    added_by=author_id,
                    revision=stored.revision,  # the checks above hold for this revision
                )

            return await self._checked_write(guild_id, name, write)

    async def _read_example(self, read_upload: UploadReader, admission: Admission) -> bytes:
        """Fetch and decode an example's upload; a file plainly not an image is refused before any
        work is counted, as members' requests are."""
        upload = await read_upload()
        check_signature(upload, self.settings.images)
        admission.spent()
        return await stored_image(upload, self.settings.images)

    async def _checked_write(self, guild_id: int, name: str, write: Callable[[StoredTask], Awaitable[T]]) -> T:
        """Read the task, check and write the change at that revision; when someone else's change came
        in between, read and check again, so that changes at the same moment apply one after another
        (positions then name the examples as they are when the change applies, as for a later command)."""
        for _ in range(_WRITE_ATTEMPTS - 1):
            try:
                return await write(await self._stored_for_change(guild_id, name))
            except TaskChanged:
                continue
        return await write(await self._stored_for_change(guild_id, name))

    async def edit_example(self, guild_id: int, name: str, position: int, text: str) -> None:
        text = self._check_example_text(text)

        async def write(stored: StoredTask) -> None:
            texts = [text if e.position == position else e.text for e in stored.examples]
            self._check_fits(stored.name, texts, stored.prompt_template)
            await self.store.edit_example(guild_id, stored.name, position, text, revision=stored.revision)

        await self._checked_write(guild_id, name, write)

    async def remove_example(self, guild_id: int, name: str, position: int) -> None:
        async def write(stored: StoredTask) -> None:
            await self.store.remove_example(guild_id, stored.name, position, revision=stored.revision)

        await self._checked_write(guild_id, name, write)

    async def move_example(self, guild_id: int, name: str, position: int, new_position: int) -> None:
        async def write(stored: StoredTask) -> None:
            if position == new_position and 1 <= position <= len(stored.examples):
                raise BadParameter(f"Example {position} is already at position {position}; nothing changed.")
            await self.store.move_example(guild_id, stored.name, position, new_position, revision=stored.revision)

        await self._checked_write(guild_id, name, write)

    async def set_default(self, guild_id: int, name: str | None) -> str | None:
        if name is None:
            await self.store.set_default_task(guild_id, None)
            return None
        task = await self.resolve(guild_id, name)
        await self.store.set_default_task(guild_id, task.name)
        return task.name

    # Rules

    def _unknown(self, name: str) -> UnknownTask:
        builtins = ", ".join(sorted(self.builtins))
        return UnknownTask(
            f"There is no task called {quoted(name)} here; the built-in tasks are {builtins}, "
            "and /tasks list shows this server's."
        )

    async def _stored(self, guild_id: int, name: str) -> StoredTask:
        stored = await self.store.get_task(guild_id, name)
        if stored is None:
            raise self._unknown(name)
        return stored

    async def _builtin(self, guild_id: int | None, name: str) -> Task | None:
        """The built-in task so named, unless the server has its own by that name: one made before a
        later version shipped a built-in of the same name stays the server's to use and change."""
        builtin = self.builtins.get(name.strip().lower())
        if builtin is None or guild_id is None or not await self.store.has_task(guild_id, name):
            return builtin
        return None

    async def _stored_for_change(
        self, guild_id: int, name: str, refusal: str = "cannot be changed; copy it to make your own"
    ) -> StoredTask:
        if await self._builtin(guild_id, name) is not None:
            raise ReadOnlyTask(f"{quoted(name)} is a built-in task and {refusal}.")
        return await self._stored(guild_id, name)

    def _new_name(self, name: str) -> str:
        name = check_name(name)
        if name in self.builtins:
            raise BadName(f"{quoted(name)} is the name of a built-in task; choose another.")
        return name

    @staticmethod
    def _check_length(text: str, limit: int, what: str) -> str:
        if len(text) > limit:
            raise LimitReached(f"The {what} is {len(text)} characters long; the limit is {limit}.")
        return text

    def _check_template(self, template: str) -> str:
        template = self._check_length(template.strip(), self.limits.max_template_chars, "prompt template")
        if (markers := template.count(IMAGE_TOKEN)) != 1:  # no image is given with a template: say what it needs
            raise BadPrompt(
                f"The prompt template needs exactly one `{IMAGE_TOKEN}`, where the picture is read (it has "
                f"{markers}), e.g. `{IMAGE_TOKEN}Pet:`."
            )
        return self.rules.check_text(template, 1, what="prompt template")

    def _check_example_text(self, text: str) -> str:
        text = self._check_length(text.strip(), self.limits.max_example_chars, "example text")
        return self.rules.check_text(text, 1, what="example text")

    def _check_fits(self, name: str, texts: Sequence[str], template: str) -> None:
        """Examples, the template and the default answer length must fit the model's context."""
        tokens = self.rules.count_tokens(assemble_prompt(texts, template))
        room = self.rules.context_length - self.settings.generation.max_new_tokens_default
        if tokens > room:
            raise LimitReached(
                f"Task “{name}” would need {tokens} tokens before the answer; the model leaves room for {room}. "
                "Shorten the examples or remove one."
            )

    async def _stored_task(self, guild_id: int, name: str) -> Task | None:
        """The server's task so named, its examples read once per version (a change gives another key)."""
        version = await self.store.task_version(guild_id, name)
        if version is None:
            return None
        if (known := self._tasks.get(version.key)) is not None:
            return known
        stored = await self.store.get_task(guild_id, name)
        if stored is None:  # deleted meanwhile
            return None
        task = await asyncio.to_thread(self._to_task, stored)
        self._tasks.put(stored.version.key, task)
        return task

    def _to_task(self, stored: StoredTask) -> Task:
        """The images are decoded only when the model needs their pixels (``StoredImage``)."""
        examples = tuple(Example(StoredImage(e.image, self.settings.images), e.text) for e in stored.examples)
        return Task(stored.name, stored.description, stored.prompt_template, examples, key=stored.version.key)


def _task_bytes(task: Task) -> int:
    """What a task's examples take once decoded, with their stored bytes; one more, so that a cache of
    size 0 keeps no task."""
    images = [e.source for e in task.examples if isinstance(e.source, StoredImage)]
    return 1 + sum(image.decoded_bytes + len(image.data) for image in images)
