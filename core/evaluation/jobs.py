"""A task evaluated from the bot (``/manage-tasks evaluate``): a moderator's job on the model service.

Each left-out example is a background request of the server's (``ModelService.submit(...,
background=True)``), so members' requests never wait for it by more than a decode step or one of
its prefills; each case has its own prefix, cached under its own key. The rules:

- one evaluation per server at a time: a second is refused, naming the one under way and who started it;
- it is charged to the server's per-period quota as the examples it will answer, at once, so that it
  is refused (costing nothing) when they do not fit; those it does not reach are given back;
- its starter, or a member who manages the server, can cancel it: the request under way is withdrawn
  and the examples answered so far are scored.

It is not counted in the server's usage (``core.usage``): that report shows what members asked, and a
moderator's measurement would read as members' requests of the task. Its answers are not put through
the answer filter: they are shown to the moderator who asked alone, who needs the model's own words to judge it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from core.asking import Asking
from core.errors import FlamingoError, NotAllowedHere, RequestCancelled, RequestExpired
from core.evaluation.leave_one_out import Evaluation, ExampleScore, Plan, evaluate, plan
from core.generation import GenerationParams
from core.model.engine import Answer
from core.prompts import Task
from core.wording import quoted

_LATE = "Its time ran out, with members' requests keeping the model busy: the result could not be shown later."


class EvaluationRunning(FlamingoError):
    """The server already has an evaluation under way: ``job_id``, which a front end may offer to cancel."""

    def __init__(self, message: str, job_id: int) -> None:
        super().__init__(message)
        self.job_id = job_id


class EvaluationJob:
    """One evaluation under way: whose, of what, how far it got, and a way to stop it.

    ``id`` is the front end's name for it (an interaction's id), so that a cancel from an old
    message never reaches a later evaluation."""

    def __init__(self, job_id: int, guild_id: int, user_id: int, task: str) -> None:
        self.id, self.guild_id, self.user_id = job_id, guild_id, user_id
        self.task = task  # as asked for, then the task's own name once it is read
        self.model = ""  # known once the job is let in
        self.total = 0  # the examples it answers, known once the job is let in
        self.scores: list[ExampleScore] = []
        self.cancelled_by: int | None = None
        self._runner: asyncio.Future[Evaluation] | None = None

    @property
    def answered(self) -> int:
        return len(self.scores)

    def cancel(self, user_id: int) -> None:
        self.cancelled_by = user_id
        if self._runner is not None:
            self._runner.cancel()

    def follow(self, runner: asyncio.Future[Evaluation]) -> None:
        """The answering under way, for ``cancel`` to stop (at once, if it was cancelled while shown)."""
        self._runner = runner
        if self.cancelled_by is not None:
            runner.cancel()


@dataclass(frozen=True)
class EvaluationResult:
    """The examples answered (every one, unless it stopped early) and their scores."""

    evaluation: Evaluation
    model: str
    total: int  # the examples it was to answer
    stopped: str | None  # why it stopped early, as the moderator should read it; None: it answered them all
    cancelled: bool  # stopped by a cancel


class EvaluationFront(Protocol):
    """What the front end shows once the evaluation is let in, and how long it can wait."""

    @property
    def deadline(self) -> float | None:
        """The ``time.monotonic()`` after which no example should start: the result could not be posted."""
        ...

    async def started(self, job: EvaluationJob) -> None:
        """The evaluation was let in and charged: show it (with a way to cancel); it runs once this returns."""
        ...


class TaskEvaluations:
    """The bot's evaluations, one per server at a time, over what members' requests use (``Asking``):
    the server's settings, its tasks, its quota, the models it may choose and the model service."""

    def __init__(self, asking: Asking) -> None:
        self.asking = asking
        self._running: dict[int, EvaluationJob] = {}

    def running(self, guild_id: int) -> EvaluationJob | None:
        return self._running.get(guild_id)

    async def evaluate(
        self, job_id: int, guild_id: int, user_id: int, task: str, model: str | None, front: EvaluationFront
    ) -> EvaluationResult:
        """Check, charge and run one evaluation of ``task`` by ``model`` (a short or full name; None:
        the server's). Refusals (``EvaluationRunning``, an unknown task or model, ``CannotEvaluate``,
        ``TooManyRequests``) cost nothing; a model's failure or a cancel ends it with what it answered."""
        current = self._running.get(guild_id)
        if current is not None:
            raise EvaluationRunning(
                f"<@{current.user_id}> is already evaluating task {quoted(current.task)} on this server, and "
                "one evaluation runs at a time; try again once it ends.",
                current.id,
            )
        job = self._running[guild_id] = EvaluationJob(job_id, guild_id, user_id, task)
        try:
            return await self._evaluate(job, model, front)
        finally:
            del self._running[guild_id]

    def cancel(self, guild_id: int, job_id: int, user_id: int, manages_server: bool) -> EvaluationJob:
        """Stop the evaluation ``job_id`` if it is still under way: the request being answered is withdrawn."""
        job = self._running.get(guild_id)
        if job is None or job.id != job_id:
            raise RequestCancelled("That evaluation is no longer running: it has ended or was cancelled.")
        if user_id != job.user_id and not manages_server:
            raise NotAllowedHere(
                "Only the member who started this evaluation, or one with Manage Server, can cancel it."
            )
        job.cancel(user_id)
        return job

    async def _evaluate(self, job: EvaluationJob, model: str | None, front: EvaluationFront) -> EvaluationResult:
        asking, models = self.asking, self.asking.models
        rules = await asking.rules(job.guild_id)
        chosen = models.in_force(rules.model) if model is None else models.lookup(model)
        models.check_choice(chosen)
        planned = plan(await asking.library.resolve(job.guild_id, job.task))
        job.task, job.model, job.total = planned.task.name, chosen, len(planned.cases)
        charge = asking.quotas.charge(job.guild_id, job.total, rules.quotas(asking.settings.quotas))
        try:
            await front.started(job)
            return await self._run(job, planned, front.deadline)
        finally:
            charge.give_back(job.total - job.answered)

    async def _run(self, job: EvaluationJob, planned: Plan, deadline: float | None) -> EvaluationResult:
        service = self.asking.service
        other = None if job.model == self.asking.models.default else job.model

        async def answer(images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams) -> Answer:
            ticket = service.submit(images, prompt, task, params, deadline, other, job.guild_id, background=True)
            try:
                return await ticket.answer()
            except asyncio.CancelledError:
                ticket.cancel()  # withdrawn at once, whichever backend holds it
                raise

        started = time.perf_counter()
        runner = asyncio.ensure_future(
            evaluate(
                planned,
                answer,
                service.rules_for(other).count_tokens,
                self.asking.settings.generation,
                job.scores.append,
            )
        )
        job.follow(runner)
        try:
            await asyncio.wait([runner])
        except asyncio.CancelledError:  # the front end went away: so does its evaluation
            runner.cancel()
            raise
        if runner.cancelled():
            stopped = f"Cancelled by <@{job.cancelled_by}>."
        elif (error := runner.exception()) is None:
            return EvaluationResult(runner.result(), job.model, job.total, None, False)
        elif isinstance(error, RequestExpired):  # worded for a member's request
            stopped = _LATE
        elif isinstance(error, FlamingoError):
            stopped = str(error)
        else:
            raise error
        seconds = time.perf_counter() - started
        partial = Evaluation(planned.task.name, tuple(job.scores), planned.unsplit, seconds)
        return EvaluationResult(partial, job.model, job.total, stopped, runner.cancelled())
