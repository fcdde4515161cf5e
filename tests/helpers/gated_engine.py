"""The real engine behind a gate, for the service's tests of order and timing."""

from __future__ import annotations

import threading

from core.model.engine import FlamingoEngine, PreparedRequest


class GatedEngine:
    """The real engine behind a gate, so a test decides when the worker may proceed."""

    def __init__(self, engine: FlamingoEngine) -> None:
        self.engine = engine
        self.rules = engine.rules
        self.partial_text = engine.partial_text
        self.gate = threading.Event()
        self.started = threading.Event()
        self.ran: list[str] = []  # prompts in the order the engine took them
        self.runs: list[list[str]] = []  # the first requests of each run

    def prepare(self, *args, **kwargs) -> PreparedRequest:
        return self.engine.prepare(*args, **kwargs)

    def run_many(self, requests: list[PreparedRequest], stops, deliver, joining=None) -> None:
        self.started.set()
        assert self.gate.wait(timeout=30)
        self.ran.extend(request.prompt for request in requests)
        self.runs.append([request.prompt for request in requests])

        def recorded(running: int):
            joiners = joining(running) if joining is not None else []
            self.ran.extend(request.prompt for request, _ in joiners)
            return joiners

        self.engine.run_many(requests, stops, deliver, recorded)
