"""The one model service of a process: many asyncio callers, one worker thread that owns the model.

Upstream's Flamingo conditions its layers by mutating them, so two overlapping calls would read
each other's images. Every model call therefore happens on a single thread, fed by a bounded
queue; callers wait on a future of their own, so answers cannot mix.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from core.config import Settings
from core.engine import Answer, FlamingoEngine, PreparedRequest
from core.errors import FlamingoError, GenerationFailed, ServiceBusy, ServiceClosed
from core.generation import GenerationParams
from core.loading import load_model
from core.prompts import Task

log = logging.getLogger(__name__)


class Engine(Protocol):
    def prepare(
        self, images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams
    ) -> PreparedRequest: ...

    def run_many(
        self,
        requests: Sequence[PreparedRequest],
        stops: Sequence[Callable[[], bool]],
        deliver: Callable[[int, Answer], None],
    ) -> None: ...


@dataclass
class _Job:
    request: PreparedRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Answer]
    cancelled: threading.Event = field(default_factory=threading.Event)


def _notify(job: _Job, answer: Answer | None, error: BaseException | None) -> None:
    """Hand the outcome to the caller's event loop, from the worker thread."""
    try:
        job.loop.call_soon_threadsafe(_settle, job, answer, error)
    except RuntimeError:
        log.debug("caller's event loop closed before its answer was ready")


def _settle(job: _Job, answer: Answer | None, error: BaseException | None) -> None:
    """Runs on the caller's loop; the caller may have stopped waiting already."""
    if job.future.done():
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(answer)


class InferenceService:
    def __init__(self, engine: Engine, max_queue: int, max_batch: int = 16) -> None:
        self.engine = engine
        self._max_batch = max_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="flamingo-model", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    async def answer(self, images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams) -> Answer:
        """Validate, queue and wait. Cancelling the awaiting task withdraws the request."""
        if self._closed:
            raise ServiceClosed("The bot is shutting down; try again in a moment.")
        request = self.engine.prepare(images, prompt, task, params)
        loop = asyncio.get_running_loop()
        job = _Job(request, loop, loop.create_future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ServiceBusy(
                f"The model is busy ({self._queue.maxsize} requests are already waiting); try again in a minute."
            ) from None
        try:
            return await job.future
        finally:
            job.cancelled.set()

    def _work(self) -> None:
        running = True
        while running:
            job = self._queue.get()
            if job is None:
                break
            batch = [job]
            # Whatever else is already waiting is decoded together with it.
            while len(batch) < self._max_batch:
                try:
                    waiting = self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    running = False
                    break
                batch.append(waiting)
            self._run([job for job in batch if not job.cancelled.is_set()])
        self._withdraw_waiting()

    def _run(self, jobs: list[_Job]) -> None:
        delivered: set[int] = set()

        def deliver(index: int, answer: Answer) -> None:
            delivered.add(index)
            _notify(jobs[index], answer, None)

        error: BaseException | None = None
        try:
            self.engine.run_many([job.request for job in jobs], [job.cancelled.is_set for job in jobs], deliver)
        except FlamingoError as known:
            error = known
        except Exception:
            log.exception("generation failed")
            error = GenerationFailed("Something went wrong while the model was answering; it has been logged.")
        for index, job in enumerate(jobs):
            if index not in delivered:
                _notify(job, None, error or GenerationFailed("The model gave no answer; it has been logged."))

    def _withdraw_waiting(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.cancelled.set()
                _notify(job, None, ServiceClosed("The bot is shutting down; your request was not run."))

    def close(self) -> None:
        """Refuse new work, withdraw waiting requests, and stop the worker after the current one."""
        self._closed = True
        self._withdraw_waiting()
        self._queue.put(None)
        self._worker.join(timeout=60)


def start_service(settings: Settings) -> InferenceService:
    """Load the configured model and start its worker; the CLI and the bot both come through here."""
    loaded = load_model(settings.model)
    return InferenceService(FlamingoEngine(loaded, settings), settings.service.max_queue, settings.service.max_batch)
