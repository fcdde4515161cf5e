"""The one model service of a process: many asyncio callers, one worker thread that owns the model.

Upstream's Flamingo conditions its layers by mutating them, so two overlapping calls would read
each other's images. Every model call therefore happens on a single thread, fed by a bounded line
of waiting requests, fair between servers (``fair_line``); callers wait on a future of their own, so
answers cannot mix, and can see their place in line, withdraw, or follow the answer's text as it is
decoded while they wait.

Background requests (a task's evaluation) wait in a line of their own and run only beside members'
requests, never in their place (``InferenceService._joiners``): a member's request waits at most one
step longer for them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from core.config import Settings
from core.errors import (
    BadParameter,
    FlamingoError,
    GenerationFailed,
    RequestCancelled,
    RequestExpired,
    ServiceBusy,
    ServiceClosed,
    unexpected_failure,
)
from core.generation import GenerationParams
from core.model.engine import Answer, Deliver, EngineStatus, FlamingoEngine, Joining, PreparedRequest, PromptRules
from core.model.resources import load_checked
from core.prompts import Task
from core.serving.fair_line import FairLine, Party
from core.serving.line_times import RecentTimes
from core.serving.protocol import LineStatus, ServiceStatus

log = logging.getLogger(__name__)

# A stopped batch ends at its next token: a few seconds at most, even for the 9B model on a CPU.
_STOPPING_SECONDS = 30.0

_STOPPED_BY_CLOSING = "The bot is shutting down; your request was stopped before it finished."
_ONE_MODEL = "This bot runs one model in its own process; it cannot answer with another."

# Background requests waiting: an evaluation queues its examples one at a time, so this is about how many
# servers may evaluate at once. Small, as each place holds a prepared request (its images) for as long as
# members keep the model busy, and members' own line bounds theirs apart (``max_queue``).
BACKGROUND_QUEUE = 8


class Engine(Protocol):
    rules: PromptRules

    def status(self) -> EngineStatus: ...

    def partial_text(self, new_tokens: Sequence[int]) -> str: ...

    def prepare(
        self, images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams, background: bool = False
    ) -> PreparedRequest: ...

    def run_many(
        self,
        requests: Sequence[PreparedRequest],
        stops: Sequence[Callable[[], bool]],
        deliver: Deliver,
        joining: Joining | None = None,
    ) -> None: ...


@dataclass(eq=False)
class _Job:
    request: PreparedRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Answer]
    deadline: float | None = None  # time.monotonic() past which the answer could no longer be delivered
    cancelled: threading.Event = field(default_factory=threading.Event)
    stopped_by: FlamingoError | None = None  # why it was stopped while it ran, when not by its asker
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when the worker took it
    party: Party = None
    background: bool = False
    yielding: bool = False  # a background request stopped for a member's beam search, to run again after it

    def should_stop(self) -> bool:
        """Its asker withdrew it, or it makes way for a member's beam search."""
        return self.cancelled.is_set() or self.yielding


def _notify(job: _Job, outcome: Answer | BaseException) -> None:
    """Hand the answer, or why there is none, to the caller's event loop, from the worker thread."""
    try:
        job.loop.call_soon_threadsafe(_settle, job, outcome)
    except RuntimeError:
        log.debug("caller's event loop closed before its answer was ready")


def _settle(job: _Job, outcome: Answer | BaseException) -> None:
    """Runs on the caller's loop; the caller may have stopped waiting already."""
    if job.future.done():
        return
    if isinstance(outcome, BaseException):
        job.future.set_exception(outcome)
    else:
        job.future.set_result(outcome)


def _still_wanted(jobs: list[_Job]) -> list[_Job]:
    """Those neither withdrawn nor past their deadline; the others are told so (a request withdrawn
    while the worker took it was no longer waiting to be told by ``_withdraw``)."""
    now = time.monotonic()
    wanted = []
    for job in jobs:
        if job.cancelled.is_set():
            _notify(job, RequestCancelled("The request was cancelled before it ran."))
        elif job.deadline is not None and now > job.deadline:
            _notify(job, RequestExpired("Your request waited too long in the queue; please ask again."))
        else:
            wanted.append(job)
    return wanted


class _Follower:
    """The event loop's side of following a decoding request.

    The worker wakes it at most once per step, and not again until the reader has looked: the
    reader then takes the latest tokens, so a slow reader skips texts rather than queueing them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.changed = asyncio.Event()
        self._woken = False  # set on the worker thread, cleared by the reader before it reads

    def wake(self) -> None:
        """Called on the worker thread after each token."""
        if self._woken:
            return
        self._woken = True
        try:
            self._loop.call_soon_threadsafe(self.changed.set)
        except RuntimeError:
            log.debug("a follower's event loop closed while its request decoded")

    async def next_change(self) -> None:
        await self.changed.wait()
        self.changed.clear()
        self._woken = False


class Ticket:
    """A queued request: its place in line while it waits, a way to withdraw it, its answer, and
    the answer's text so far while it is decoded."""

    def __init__(self, service: InferenceService, job: _Job) -> None:
        self._service = service
        self._job = job

    @property
    def position(self) -> int | None:
        """1 for the next to run; None once it runs, is answered or was withdrawn."""
        return self._service._position(self._job)

    def cancel(self) -> None:
        """Withdraw it: a waiting request never reaches the model, a running one stops at the next token."""
        self._service._withdraw(self._job)

    async def answer(self) -> Answer:
        try:
            return await self._job.future
        finally:
            self.cancel()

    async def partial_texts(self) -> AsyncIterator[str]:
        """The answer's text so far, up to its last complete word, each time it grew since the
        previous read (the latest only: a slow reader is not handed a backlog); each text is a
        prefix of the answer's. It ends once the answer is ready (``answer`` has it; the last text
        lacks at most its last word) or the request was cancelled (what was written stays written),
        and raises the error ``answer`` raises. Beam search yields nothing: its best beam can change
        until it ends. One reader at a time; the decoding is done here, on the reader's loop.
        """
        job, progress = self._job, self._job.request.progress
        if progress.wake is not None:
            raise RuntimeError("a request's answer is followed by one reader at a time")
        follower = _Follower(asyncio.get_running_loop())
        settled = lambda _: follower.changed.set()  # noqa: E731
        job.future.add_done_callback(settled)
        progress.wake = follower.wake
        shown = ""
        try:
            while True:
                done = job.future.done()  # once it is, every token was published: the last read has them all
                text = self._service.engine.partial_text(tuple(progress.tokens))  # a copy, made on this side
                if text != shown:
                    shown = text
                    yield text
                if done:
                    break
                await follower.next_change()
        finally:
            progress.wake = None
            job.future.remove_done_callback(settled)
        if job.future.cancelled():  # its asker stopped awaiting the answer
            return
        error = job.future.exception()
        if error is not None and not isinstance(error, RequestCancelled):
            raise error


class InferenceService:
    def __init__(self, engine: Engine, max_queue: int, max_batch: int = 16, shares: bool = True) -> None:
        self.engine = engine
        self._max_batch = max_batch
        self._waiting: FairLine[_Job] = FairLine(max_queue, shares)
        self._background: FairLine[_Job] = FairLine(BACKGROUND_QUEUE, shares)
        self._ready = threading.Condition()
        self._closed = False
        self._request_seconds = 0.0  # how long the latest answer took to run, for telling users their wait
        self._running: set[_Job] = set()  # taken by the worker, not yet answered
        self.times = RecentTimes()
        self._worker = threading.Thread(target=self._work, name="flamingo-model", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        """Members' requests waiting; background ones, which never hold them back, are not counted."""
        return len(self._waiting)

    @property
    def rules(self) -> PromptRules:
        return self.engine.rules

    def rules_for(self, model: str | None) -> PromptRules:
        """The rules of the model that answers: here only the loaded one (None)."""
        if model is not None:
            raise BadParameter(_ONE_MODEL)
        return self.engine.rules

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def reachable(self) -> bool:
        return True  # in this process

    def cache_status(self) -> list[dict[str, dict[str, int]]]:
        """One entry per model copy (here, one): its caches' counters."""
        return [self.engine.status().caches]

    def status(self) -> ServiceStatus:
        engine = self.engine.status()
        return ServiceStatus(engine.model, self.waiting, reachable=True, engine=engine)

    def line_status(self) -> LineStatus:
        """Members' requests only: background ones take no member's place (``_joiners``)."""
        with self._ready:
            waiting, running = len(self._waiting), sum(not job.background for job in self._running)
        return LineStatus(waiting, running, self.times.typical())

    def estimated_wait(self, position: int) -> float:
        """Seconds until a request at ``position`` starts, from recent answers' times (0 before any ran)."""
        return math.ceil(position / self._max_batch) * self._request_seconds

    def submit(
        self,
        images: Sequence[Image.Image],
        prompt: str,
        task: Task,
        params: GenerationParams,
        deadline: float | None = None,
        model: str | None = None,
        party: Party = None,
        background: bool = False,
    ) -> Ticket:
        """Validate and queue, or refuse at once; call from the event loop. ``model``: None, the loaded one;
        ``party``: the server asking (None: direct messages), whose share of the line it takes;
        ``background``: a job's request (a task's evaluation), in a line of its own and run only beside
        members' requests; greedy, as it may be stopped and run again (``_joiners``). Its wait depends on
        members' traffic, so its deadline is only held when it is taken, never estimated up front."""
        if self._closed:
            raise ServiceClosed("The bot is shutting down; try again in a moment.")
        if model is not None:
            raise BadParameter(_ONE_MODEL)
        if background and (params.num_beams > 1 or params.do_sample):
            raise BadParameter("A background request is greedy: it may be stopped and run again from its start.")
        request = self.engine.prepare(images, prompt, task, params, background)
        loop = asyncio.get_running_loop()
        job = _Job(request, loop, loop.create_future(), deadline, party=party, background=background)
        line = self._line(job)
        with self._ready:
            if self._closed:  # closed while the request was prepared
                raise ServiceClosed("The bot is shutting down; try again in a moment.")
            line.check_room(party)
            if (
                not background
                and deadline is not None
                and time.monotonic() + self.estimated_wait(line.place_for(party)) > deadline
            ):
                raise ServiceBusy("The queue is too long to answer you in time; try again in a few minutes.")
            line.add(job, party, request.cost)
            self._ready.notify()
        return Ticket(self, job)

    async def answer(self, images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams) -> Answer:
        """Queue and wait. Cancelling the awaiting task withdraws the request."""
        return await self.submit(images, prompt, task, params).answer()

    def _line(self, job: _Job) -> FairLine[_Job]:
        return self._background if job.background else self._waiting

    def _position(self, job: _Job) -> int | None:
        """In its own line: a background request's place among background requests."""
        with self._ready:
            return self._line(job).position(job)

    def _withdraw(self, job: _Job) -> None:
        job.cancelled.set()
        with self._ready:
            waiting = self._line(job).remove(job)
        if waiting:
            _notify(job, RequestCancelled("The request was cancelled before it ran."))

    def _next_batch(self) -> list[_Job] | None:
        """The requests at the front of the line, up to a batch, decoded together; None once closed.

        Only requests of the first one's kind: beam searches run before the batch's decoding, so a
        short request queued before a long search must not wait for it. With no member's request
        waiting, one background request runs, which members join as they come.
        """
        with self._ready:
            while not self._waiting and not self._background and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            if self._waiting:
                line = list(self._waiting)
                kind = line[0].request.batchable
                taken = 1
                while taken < min(len(line), self._max_batch) and line[taken].request.batchable == kind:
                    taken += 1
                batch = self._waiting.take(taken)
            else:
                batch = self._background.take(1)
        return _still_wanted(batch)

    def _joiners(self, running: int) -> list[_Job]:
        """Requests from the front of the line that can join a running batch, while it has room.

        A request that cannot join (beam search, which runs in a search of its own) stops the
        joining, so a steady stream of short requests cannot hold it back: the batch drains and
        it runs next.

        Members have the whole ``max_batch``; one background row at most runs beside them, on top of
        it, joining only when no member's request waits, so it never takes a member's place. It
        yields to a member's beam search (stopped at the next step and put back first in its line,
        to run again from its start), so it never keeps the batch from draining either.
        """
        with self._ready:
            if self._closed:
                return []
            background = [job for job in self._running if job.background]
            members = running - len(background)
            line = list(self._waiting)
            taken = 0
            while taken < len(line) and members + taken < self._max_batch and line[taken].request.batchable:
                taken += 1
            joiners = self._waiting.take(taken)
            if taken < len(line) and not line[taken].request.batchable:
                for job in background:
                    job.yielding = True
            elif taken == len(line) and not background:
                joiners += self._background.take(1)
        return _still_wanted(joiners)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run(batch)
            del batch  # not held while the worker waits for the next

    def _run(self, jobs: list[_Job]) -> None:
        pending = dict(enumerate(jobs))  # until answered: a long run does not hold past requests
        numbers = itertools.count(len(jobs))
        self._track_running(jobs)

        def joining(running: int) -> list[tuple[PreparedRequest, Callable[[], bool]]]:
            joiners = self._joiners(running)
            self._track_running(joiners)
            pending.update((next(numbers), job) for job in joiners)  # numbered in order, as the engine does
            return [(job.request, job.should_stop) for job in joiners]

        def deliver(index: int, outcome: Answer | FlamingoError) -> None:
            job = pending.pop(index)
            with self._ready:
                self._running.discard(job)
                if job.yielding and not job.cancelled.is_set():  # stopped for a member's beam search
                    if not self._closed:
                        job.yielding = False
                        self._background.put_back(job, job.party)
                        return
                    job.stopped_by = ServiceClosed(_STOPPED_BY_CLOSING)
                    job.cancelled.set()
            if isinstance(outcome, FlamingoError):
                _notify(job, outcome)
                return
            self._request_seconds = outcome.seconds
            if job.cancelled.is_set():  # stopped early: a partial answer is no answer
                _notify(job, job.stopped_by or RequestCancelled("The request was cancelled while it ran."))
            else:
                assert job.started_at is not None  # set as the worker took it
                if not job.background:  # its wait, behind members' requests by design, says nothing of theirs
                    self.times.record(job.queued_at, job.started_at)
                _notify(job, outcome)

        error: BaseException | None = None
        try:
            requests, stops = [job.request for job in jobs], [job.should_stop for job in jobs]
            del jobs
            self.engine.run_many(requests, stops, deliver, joining)
        except FlamingoError as known:
            error = known
        except Exception as unexpected:
            error = unexpected_failure(unexpected, log)
        with self._ready:
            self._running.difference_update(pending.values())
        if pending and error is None:
            log.error("the engine ended its run without answering %d request(s)", len(pending))
        for job in pending.values():
            _notify(job, error or GenerationFailed("The model gave no answer; it has been logged."))

    def _track_running(self, jobs: list[_Job]) -> None:
        now = time.monotonic()
        with self._ready:
            for job in jobs:
                job.started_at = now
            self._running.update(jobs)

    def close(self, grace_seconds: float = 60.0) -> None:
        """Refuse new work, withdraw waiting requests (background ones too), and stop the worker after
        the current batch; a batch still running after ``grace_seconds`` (long answers on a CPU take
        minutes) is stopped at its next token, and its askers are told, before the bot disconnects."""
        with self._ready:
            self._closed = True
            withdrawn = self._waiting.clear() + self._background.clear()
            self._ready.notify_all()
        for job in withdrawn:
            job.cancelled.set()
            _notify(job, ServiceClosed("The bot is shutting down; your request was not run."))
        self._worker.join(timeout=grace_seconds)
        if not self._worker.is_alive():
            return
        with self._ready:
            running = list(self._running)
        for job in running:
            job.stopped_by = ServiceClosed(_STOPPED_BY_CLOSING)
            job.cancelled.set()
        self._worker.join(timeout=_STOPPING_SECONDS)


def start_service(settings: Settings, shares: bool = True) -> InferenceService:
    """Load the configured model in this process and start its worker (the CLI, a replica, a local bot).

    ``shares``: False on a Ray replica, whose requests the bot has already let in by server shares."""
    loaded = load_checked(settings.model)
    log.info(
        "Loaded %s (%s) in %.1f s: language model %.1f MiB, whole model %.1f MiB",
        loaded.spec.name,
        loaded.precision.name,
        loaded.load_seconds,
        loaded.language_model_bytes / 2**20,
        loaded.total_bytes / 2**20,
    )
    service = settings.service
    return InferenceService(FlamingoEngine(loaded, settings), service.max_queue, service.max_batch, shares)
