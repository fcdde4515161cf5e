"""Work on files from strangers in worker processes that are killed when the work runs too long.

A thread cannot be stopped, a process can. A pool keeps a few processes started ("spawn": the bot's
process has threads, and torch), gives each job to an idle one and kills a job's process once the
job runs past its time, starting another in its place. Callers wait on the pool's own threads, never
on the event loop's default executor, so a pool busy with slow jobs holds nothing else up.

A spawned worker imports the script that started the bot (``main.py``, which is light) as
multiprocessing does, so a script that uses a pool keeps its work under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, TypeVar

R = TypeVar("R")

_CONTEXT = multiprocessing.get_context("spawn")
# A worker imports its modules once, when it starts; past this it is taken for dead.
_START_SECONDS = 60.0


class TimedOut(Exception):
    """A job ran past its time; its process was killed."""


class WorkerDied(Exception):
    """A worker process ended without answering: a crash in a decoder, or the system out of memory."""


class PoolFull(Exception):
    """As many jobs wait for a worker as the pool lets wait."""


def _serve(connection: Connection, niceness: int, preload: tuple[str, ...]) -> None:
    """A worker's life: import what its jobs need, say so, then run each job sent and send back its
    result or its exception. It ends when the pool's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the bot's to handle
    os.nice(niceness)
    for module in preload:
        importlib.import_module(module)
    connection.send(None)
    while True:
        try:
            function, args = connection.recv()
        except EOFError:
            return
        try:
            outcome = (True, function(*args))
        except Exception as error:
            outcome = (False, error)
        try:
            connection.send(outcome)
        except Exception as error:  # a result or exception that cannot be pickled: nothing was sent
            connection.send((False, RuntimeError(f"the job's answer cannot be sent back: {error!r}")))


class _Worker:
    def __init__(self, niceness: int, preload: tuple[str, ...]) -> None:
        self.connection, theirs = _CONTEXT.Pipe()
        self.process = _CONTEXT.Process(target=_serve, args=(theirs, niceness, preload), daemon=True)
        self.process.start()
        theirs.close()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.connection.poll(_START_SECONDS):
            raise WorkerDied(f"a worker process did not start within {_START_SECONDS:g} s")
        self._receive()
        self.ready = True

    def run(self, seconds: float, function: Callable[..., R], args: tuple[Any, ...]) -> R:
        self.wait_ready()  # start-up is not the job's time
        try:
            self.connection.send((function, args))
        except OSError:
            raise WorkerDied("the worker process ended") from None
        if not self.connection.poll(seconds):
            raise TimedOut
        ok, value = self._receive()
        if ok:
            return value
        raise value

    def _receive(self) -> Any:
        try:
            return self.connection.recv()
        except (EOFError, OSError):
            raise WorkerDied("the worker process ended without answering") from None

    def stop(self) -> None:
        self.process.kill()
        self.process.join()
        self.connection.close()


class WorkerPool:
    """At most ``size`` jobs run at once, each in a worker process; at most ``waiting`` more wait
    their turn, so that a flood holds a bounded number of uploads in memory. Workers start when
    first needed and are kept, at ``niceness`` (a lower CPU priority than the bot's own work)."""

    def __init__(self, name: str, size: int, waiting: int, niceness: int = 0, preload: tuple[str, ...] = ()) -> None:
        self.size, self.waiting = size, waiting
        self._niceness, self._preload = niceness, preload
        self._threads = ThreadPoolExecutor(size, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._jobs = 0

    async def run(self, seconds: float, function: Callable[..., R], *args: Any) -> R:
        """``function(*args)`` in a worker process (both must pickle, the function by its module's
        name); ``TimedOut`` past ``seconds``, ``WorkerDied`` if the process ends, ``PoolFull``."""
        with self._lock:
            if self._jobs >= self.size + self.waiting:
                raise PoolFull
            self._jobs += 1
        future = self._threads.submit(self._run, seconds, function, args)
        future.add_done_callback(self._ended)  # also when the caller stops waiting
        return await asyncio.wrap_future(future)

    def _ended(self, _: Future[Any]) -> None:
        with self._lock:
            self._jobs -= 1

    def _run(self, seconds: float, function: Callable[..., R], args: tuple[Any, ...]) -> R:
        worker = self._take()
        try:
            return worker.run(seconds, function, args)
        except (TimedOut, WorkerDied):
            worker.stop()
            worker = _Worker(self._niceness, self._preload)  # starting while the refusal is told
            raise
        finally:
            with self._lock:
                self._idle.append(worker)

    def _take(self) -> _Worker:
        """An idle worker (one of at most ``size``: as many as the pool's threads), else a new one."""
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.process.is_alive():
                    return worker
                worker.stop()
        return _Worker(self._niceness, self._preload)
