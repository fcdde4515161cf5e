"""``/queue``'s typical times: medians of the recent answers' waits and runs, over a window."""

from __future__ import annotations

import asyncio

from core.generation import GenerationParams
from core.prompts import Task
from core.serving.line_times import RecentTimes, TypicalTimes
from tests.helpers.gated_engine import GatedEngine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_medians_of_the_windows_answers_are_not_swayed_by_one_long_one():
    clock = Clock()
    times = RecentTimes(window_seconds=600, clock=clock)
    assert times.typical() is None
    for waited, answering in [(2, 3), (4, 5), (300, 200)]:  # the last, one long beam search behind a flood
        times.record(clock.now - waited - answering, clock.now - answering)
        clock.now += 10
    assert times.typical() == TypicalTimes(answers=3, waited=4, answering=5, window_seconds=600)
    times.record(clock.now - 7, clock.now - 1)
    assert times.typical() == TypicalTimes(answers=4, waited=5, answering=4, window_seconds=600)


def test_answers_older_than_the_window_are_forgotten():
    clock = Clock()
    times = RecentTimes(window_seconds=600, clock=clock)
    times.record(clock.now - 60, clock.now - 50)
    clock.now += 300
    times.record(clock.now - 2, clock.now - 1)
    clock.now += 300
    assert times.typical() == TypicalTimes(answers=2, waited=5.5, answering=25.5, window_seconds=600)
    clock.now += 1
    assert times.typical() == TypicalTimes(answers=1, waited=1, answering=1, window_seconds=600)
    clock.now += 300
    assert times.typical() is None


async def test_the_local_service_counts_its_line_and_times_its_answers(llama_engine, make_service, photos):
    gated = GatedEngine(llama_engine)
    service = make_service(gated, max_queue=8)
    task = Task("t", "", "<image>Output:")
    submit = lambda beams: service.submit(  # noqa: E731
        [photos["rocket"]], "<image>Output:", task, GenerationParams(max_new_tokens=2, num_beams=beams)
    )
    running = submit(2)
    await asyncio.to_thread(gated.started.wait, 10)
    waiting = [submit(1), submit(1)]  # not batched with a beam search: they wait for it
    line = service.line_status()
    assert (line.waiting, line.running, line.typical) == (2, 1, None)
    await asyncio.sleep(0.2)
    gated.gate.set()
    await asyncio.gather(*(ticket.answer() for ticket in [running, *waiting]))
    line = service.line_status()
    assert (line.waiting, line.running) == (0, 0)
    assert line.typical is not None and line.typical.answers == 3
    assert line.typical.waited >= 0.2  # the median: one of those that waited behind the gate
