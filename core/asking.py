"""A member's request, from the server's rules to the saved answer: the one use case every front end calls.

The slash command, the message menu and the re-roll button (and the offline CLI's checks) share it,
so a server's channels, role, quotas, visibility and model choice apply to all of them alike. The
front end parses, acknowledges and replies; what is allowed, counted, read, run, moderated and kept
is decided here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from core.config import Settings
from core.errors import BadImage, BadPrompt, FlamingoError, NotAllowedHere, RequestCancelled, StorageUnavailable
from core.generation import GenerationParams, generation_kwargs
from core.guild_settings import GuildSettings
from core.images import check_file_size, check_signature, encode_for_storage, read_image
from core.model.engine import Answer
from core.moderation import AnswerFilter
from core.quotas import Admission, RequestQuotas
from core.serving import ModelService, QueuedRequest
from core.serving.metrics import Metrics
from core.serving.model_choice import ModelCatalog, short_name
from core.storage import Storage
from core.storage.request_store import RequestBudget, StoredRequest
from core.tasks.library import TaskLibrary
from core.usage import NO_TASK, Outcome, outcome_of
from core.wording import duration, quoted

log = logging.getLogger(__name__)

ImageReader = Callable[[], Awaitable[list[bytes]]]
WITHHELD = "*(The answer was withheld: it contained words this server's bot does not post outside NSFW channels.)*"


class ServerView(Protocol):
    """What the front end knows of a server's channels and roles (None: deleted), as a ``discord.Guild`` does."""

    def get_channel(self, channel_id: int, /) -> object | None: ...

    def get_role(self, role_id: int, /) -> object | None: ...


@dataclass(frozen=True)
class Asker:
    """Who asks, and where."""

    user_id: int
    guild_id: int | None  # None: a direct message
    channel_id: int | None
    parent_channel_id: int | None = None  # a thread's channel
    role_ids: frozenset[int] = frozenset()
    manages_server: bool = False  # never locked out by the server's own rules
    nsfw_channel: bool = False
    server: ServerView | None = None  # None: not known, so nothing is said to be deleted


@dataclass(frozen=True)
class Question:
    """What is asked: images still to be read (a download, or stored bytes), text, task and parameters."""

    read_images: ImageReader
    prompt: str | None  # None: the task's prompt
    task: str | None  # None: the server's default task
    params: GenerationParams
    rerolled: StoredRequest | None = None  # a re-roll keeps its answer's model while that is offered
    origin: int | None = None  # whose images these are, when not the asker's (``StoredRequest.origin_user_id``)


class Front(Protocol):
    """What the front end shows at the two moments the asker sees, and how long it can wait."""

    @property
    def deadline(self) -> float | None:
        """The ``time.monotonic()`` after which the request should not start: its reply could not be posted."""
        ...

    async def accepted(self, private: bool) -> None:
        """The request passed the rules and the quota: acknowledge it (privately where the server says so)."""
        ...

    async def in_line(self, ticket: QueuedRequest) -> Answer:
        """Wait for the answer, showing the place in line (and a way to cancel)."""
        ...


@dataclass(frozen=True)
class Answered:
    """An answer as it is to be posted: its text after moderation, and what it was about (as stored)."""

    text: str
    task: str
    prompt: str
    answer: Answer
    images: list[bytes]
    model: str | None  # a model the server chose instead of the default
    request_id: int | None  # None: not stored (the database refused the write), so nothing can read it back


@dataclass
class _Reached:
    """How far a request got, for counting it however it ends: its task, once read."""

    task: str = NO_TASK


@contextmanager
def about_image(index: int, count: int, filename: str | None = None) -> Iterator[None]:
    """With several images, a refusal says which one it is about."""
    try:
        yield
    except BadImage as error:
        if count == 1:
            raise
        raise BadImage(f"Image {index}{f' ({quoted(filename, 60)})' if filename else ''}: {error}") from None


def check_rules(asker: Asker, rules: GuildSettings) -> None:
    """The server's answer channels and required role; members who manage the server are never locked out."""
    server = asker.server
    if not rules.allows_channel(asker.channel_id, asker.parent_channel_id):
        if server is not None and all(server.get_channel(c) is None for c in rules.answer_channels):
            raise NotAllowedHere(
                "The channels this server lets me answer in were deleted; a moderator can add others with "
                "/settings channels add, or let me answer everywhere with /settings channels clear."
            )
        listed = ", ".join(f"<#{channel_id}>" for channel_id in sorted(rules.answer_channels))
        raise NotAllowedHere(f"I only answer in {listed} on this server.")
    if rules.required_role is None or asker.manages_server or rules.required_role in asker.role_ids:
        return
    if server is not None and server.get_role(rules.required_role) is None:
        raise NotAllowedHere(
            "The role this server requires was deleted; a moderator can choose another with /settings role."
        )
    raise NotAllowedHere(f"You need the <@&{rules.required_role}> role to use the bot on this server.")


class Asking:
    """The bot's request use case, over its store, task library, quotas, models and model service."""

    def __init__(
        self,
        settings: Settings,
        store: Storage,
        library: TaskLibrary,
        quotas: RequestQuotas,
        models: ModelCatalog,
        service: ModelService,
        metrics: Metrics,
        answer_filter: AnswerFilter,
    ) -> None:
        self.settings = settings
        self.store = store
        self.library = library
        self.quotas = quotas
        self.models = models
        self.service = service
        self.metrics = metrics
        self.answer_filter = answer_filter

    async def check(
        self, asker: Asker, prompt: str | None, files: Sequence[tuple[int, str | None]], params: GenerationParams
    ) -> None:
        """Refusals that need no download and no model, given at once: the parameters, the number and
        sizes of the files (``(bytes, filename)`` each; none: the message held no image), and the prompt
        against them. A refusal is counted in the server's usage like any other, under no task."""
        try:
            self._check(prompt, files, params)
        except FlamingoError as error:
            await self._count(asker, NO_TASK, outcome_of(error))
            raise

    def _check(self, prompt: str | None, files: Sequence[tuple[int, str | None]], params: GenerationParams) -> None:
        settings = self.settings
        if not files:
            raise BadImage("That message has no attached image; I only read attached images, not links.")
        generation_kwargs(params, settings.generation)
        if len(files) > settings.images.max_per_request:
            raise BadImage(f"At most {settings.images.max_per_request} images can be read at once.")
        for index, (size, filename) in enumerate(files, 1):
            with about_image(index, len(files), filename):
                check_file_size(size, settings.images)
        if prompt is None and len(files) > 1:
            raise BadPrompt(
                f"With {len(files)} images, write a prompt with one `<image>` for each, in order, "
                f"e.g. `{'<image>' * len(files)}Output:`."
            )
        if prompt is not None:
            self.service.rules.check_text(prompt, len(files))

    async def rules(self, guild_id: int | None) -> GuildSettings:
        return await self.store.guild_settings(guild_id) if guild_id is not None else GuildSettings()

    async def check_allowed(self, asker: Asker) -> None:
        """The server's channels and role, for what reads its task library (listing, showing, exporting):
        a member the server keeps from asking is kept from browsing what the bot would answer with."""
        check_rules(asker, await self.rules(asker.guild_id))

    async def ask(self, asker: Asker, question: Question, front: Front) -> Answered | None:
        """Check, count, read, run, save and moderate one request; the front end is called to acknowledge
        it and to show its place in line. None: the asker cancelled it while it waited. However it ends,
        it is counted in the server's usage (``core.usage``)."""
        reached = _Reached()
        try:
            answered = await self._ask(asker, question, front, reached)
        except Exception as error:
            await self._count(asker, reached.task, outcome_of(error))
            raise
        if answered is None:
            await self._count(asker, reached.task, "cancelled")
        else:
            await self._count(asker, answered.task, "answered", len(answered.answer.token_ids))
        return answered

    async def _count(self, asker: Asker, task: str, outcome: Outcome, tokens: int = 0) -> None:
        """One UPSERT, after the request's own writes. Not for direct messages, which no server's report
        shows; not while the database refuses writes, where each try could wait seconds for its lock;
        and a count it refuses costs the request nothing (the store logs why, once)."""
        if asker.guild_id is None or self.store.writes.degraded:
            return
        with contextlib.suppress(StorageUnavailable):
            await self.store.count_request(asker.guild_id, task, outcome, tokens)

    async def _ask(self, asker: Asker, question: Question, front: Front, reached: _Reached) -> Answered | None:
        settings = self.settings
        rules = await self.rules(asker.guild_id)
        check_rules(asker, rules)
        with self.quotas.admit(asker.guild_id, asker.user_id, rules.quotas(settings.quotas)) as admission:
            await front.accepted(private=rules.ephemeral_answers)
            task = await self.library.resolve(asker.guild_id, question.task)
            reached.task = task.name
            text = question.prompt if question.prompt is not None else task.prompt_template
            pictures = await self._pictures(question.read_images, admission)
            # Encoded as stored while the model works, so that saving the answered request waits for no encoder.
            storing = asyncio.ensure_future(_encoded_for_storage(pictures))
            if settings.logging.log_prompts:
                log.info("request by %s in %s: %r", asker.user_id, asker.guild_id, text)
            started = time.monotonic()
            rerolled = question.rerolled
            model = self.models.in_force(rules.model if rerolled is None else rerolled.model)
            other = None if model == self.models.default else model
            try:
                try:
                    answer = await front.in_line(
                        self.service.submit(
                            pictures, text, task, question.params, front.deadline, other, asker.guild_id
                        )
                    )
                except BaseException:
                    storing.cancel()  # nothing will be saved
                    raise
            except RequestCancelled:
                self.metrics.ended("cancelled")
                return None  # counted in the quota like an answer: the cancel has said so already
            except Exception as error:  # busy, expired, out of time, a model not offered; or failed
                self.metrics.ended(outcome_of(error))
                raise
            elapsed = time.monotonic() - started
            self.metrics.answered(elapsed)
            images = await storing
            try:
                request_id: int | None = await self.store.save_request(
                    asker.guild_id,
                    asker.channel_id or 0,
                    asker.user_id,
                    task.name,
                    text,
                    question.params,
                    images,
                    other,
                    question.origin,
                    budget=RequestBudget.of(settings.storage),
                )
            except StorageUnavailable:  # logged by the store once while it lasts; the answer is still posted
                request_id = None
            # What happened, never what was asked: prompts are logged above only when allowed.
            log.info(
                "request %s answered in guild %s: task %s, model %s, %d image(s), %d tokens in %.1f s "
                "after %.1f s in line",
                "(not stored)" if request_id is None else request_id,
                asker.guild_id,
                task.name,
                short_name(model),
                len(pictures),
                len(answer.token_ids),
                answer.seconds,
                max(0.0, elapsed - answer.seconds),
            )
        withheld = not asker.nsfw_channel and self.answer_filter.blocks(answer.text)
        return Answered(WITHHELD if withheld else answer.text, task.name, text, answer, images, other, request_id)

    async def _pictures(self, read_images: ImageReader, admission: Admission) -> list[Image.Image]:
        """Read, check and decode the question's images. In a method of its own so that the raw files
        (up to four of 25 MiB) are let go when it returns, not held while the request waits in line."""
        settings = self.settings.images
        uploads = await read_images()
        for index, data in enumerate(uploads, 1):  # a file that is plainly not an image costs no cooldown
            with about_image(index, len(uploads)):
                check_signature(data, settings)
        admission.spent()  # reading headers and pixels is work a refusal must not let be repeated at once
        pictures = []
        for index, data in enumerate(uploads, 1):
            with about_image(index, len(uploads)):
                pictures.append(await read_image(data, settings))
        return pictures

    async def stored(self, request_id: int, asker: Asker) -> StoredRequest:
        """An answer's stored request, for its buttons; refused, saying why, once it is gone."""
        stored = await self.store.get_request(request_id, asker.guild_id, asker.user_id)
        if stored is None:
            kept = duration(self.settings.privacy.request_retention_hours * 3600)
            raise RequestCancelled(
                f"This answer's request is no longer stored: pictures and prompts are kept up to {kept} (less "
                "when a server's stored requests reach their space limit), and may be deleted sooner. "
                "Ask again with /comprehend."
            )
        return stored


async def _encoded_for_storage(pictures: list[Image.Image]) -> list[bytes]:
    """The pictures as the store keeps them (``encode_for_storage``), each in a thread."""
    return [await asyncio.to_thread(encode_for_storage, picture) for picture in pictures]
