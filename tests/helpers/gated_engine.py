"""The real engine behind a gate, for the service's tests of order and timing."""

from __future__ import annotations

import threading

from core.model.engine import FlamingoEngine, PreparedRequest


class GatedEngine:
    """The real engine behind a gate, so a test decides when the worker may proceed.

    ``stepped``: a run also stops at each step's end, before it takes joiners, until ``step`` lets
    it go on, so a test counts steps instead of timing them.
    """

    def __init__(self, engine: FlamingoEngine, stepped: bool = False) -> None:
        self.engine = engine
        self.rules = engine.rules
        self.partial_text = engine.partial_text
        self.gate = threading.Event()
        self.started = threading.Event()
        self.ran: list[str] = []  # prompts in the order the engine took them
        self.runs: list[list[str]] = []  # the first requests of each run
        self.stepped = stepped
        self._at_step = threading.Semaphore(0)  # a run reached a step's end
        self._go_on = threading.Semaphore(0)
        self.joins: list[tuple[int, list[str]]] = []  # at each step's end: the rows running, the prompts joining

    def prepare(self, *args, **kwargs) -> PreparedRequest:
        return self.engine.prepare(*args, **kwargs)

    def run_many(self, requests: list[PreparedRequest], stops, deliver, joining=None) -> None:
        self.started.set()
        assert self.gate.wait(timeout=30)
        self.ran.extend(request.prompt for request in requests)
        self.runs.append([request.prompt for request in requests])

        def recorded(running: int):
            if self.stepped:
                self._at_step.release()
                assert self._go_on.acquire(timeout=30)
            joiners = joining(running) if joining is not None else []
            self.ran.extend(request.prompt for request, _ in joiners)
            self.joins.append((running, [request.prompt for request, _ in joiners]))
            return joiners

        self.engine.run_many(requests, stops, deliver, recorded)

    def at_step(self) -> None:
        """Wait, on a thread of the test's, until the run stops at a step's end."""
        assert self._at_step.acquire(timeout=30)

    def step(self) -> None:
        """Let the run stopped at a step's end take its joiners and go on to the next step's end."""
        self._go_on.release()
        self.at_step()

    def run_freely(self) -> None:
        """Stop stepping: the run goes on by itself, as an ungated one does (to end a test)."""
        self.stepped = False
        self._go_on.release()
