"""The service and engine when things go wrong at the worst moment: races with the worker, a request
that fails inside a batch, and a batch that runs for a long time."""

from __future__ import annotations

import asyncio
import gc
import re
import threading
import weakref

import pytest
import torch

import core.serving.local as service_module
from core.errors import FlamingoError, GenerationFailed, RequestCancelled, ServiceClosed
from core.generation import GenerationParams
from core.model.decode.state import Running
from core.model.engine import Answer, PreparedRequest
from core.prompts import Example, Task
from tests.helpers.gated_engine import GatedEngine


@pytest.fixture(scope="module")
def task(photos) -> Task:
    return Task("t", "", "<image>Output:", (Example(photos["astronaut"], "<image>Output:An astronaut."),))


@pytest.fixture(scope="module")
def huge(photos) -> Task:
    """A task whose prefix the tests make run out of memory."""
    return Task("huge", "", "<image>Output:", (Example(photos["coffee"], "<image>Output:A cup."),), key="tests/huge")


async def test_a_request_withdrawn_as_the_worker_takes_it_is_told_so(
    llama_engine, make_service, photos, task, monkeypatch
):
    taken, withdrawn = threading.Event(), threading.Event()
    still_wanted = service_module._still_wanted

    def slow_check(jobs):  # the worker has taken the request off the line and not yet checked it
        if jobs:
            taken.set()
            assert withdrawn.wait(10)
        return still_wanted(jobs)

    monkeypatch.setattr(service_module, "_still_wanted", slow_check)
    service = make_service(llama_engine)
    ticket = service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams(max_new_tokens=2))
    await asyncio.to_thread(taken.wait, 10)
    ticket.cancel()
    withdrawn.set()
    with pytest.raises(RequestCancelled, match="cancelled before it ran"):
        await asyncio.wait_for(ticket.answer(), 10)


async def test_a_request_submitted_while_the_service_closes_is_refused(llama_engine, make_service, photos, task):
    class ClosingWhilePreparing(GatedEngine):
        def prepare(self, *args, **kwargs) -> PreparedRequest:
            prepared = super().prepare(*args, **kwargs)
            closing = threading.Thread(target=service.close)  # as the bot's shutdown does, from another thread
            closing.start()
            closing.join()
            return prepared

    engine = ClosingWhilePreparing(llama_engine)
    service = make_service(engine)
    with pytest.raises(ServiceClosed, match="shutting down"):
        service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams(max_new_tokens=2))
    assert service.waiting == 0 and not engine.started.is_set()


async def test_a_greedy_request_is_not_held_behind_a_beam_search_queued_after_it(
    llama_engine, make_service, photos, task
):
    gated = GatedEngine(llama_engine)
    service = make_service(gated)
    beams = GenerationParams(max_new_tokens=3, num_beams=3)
    first = service.submit([photos["rocket"]], "<image>First:", task, beams)
    await asyncio.to_thread(gated.started.wait, 10)
    short = service.submit([photos["coffee"]], "<image>Short:", task, GenerationParams(max_new_tokens=2))
    long = service.submit(
        [photos["chelsea"]], "<image>Long:", task, GenerationParams(max_new_tokens=30, min_new_tokens=30, num_beams=3)
    )
    gated.gate.set()
    await asyncio.gather(first.answer(), short.answer(), long.answer())
    assert [[p.rsplit(">", 1)[-1] for p in run] for run in gated.runs] == [["First:"], ["Short:"], ["Long:"]]


def outcomes_of(engine, requests, joiners=()) -> dict[int, Answer | FlamingoError]:
    """Every request's outcome from one ``run_many``; ``joiners`` join one per step."""
    outcomes: dict[int, Answer | FlamingoError] = {}
    waiting = list(joiners)

    def joining(running: int):
        return [(waiting.pop(0), lambda: False)] if waiting else []

    engine.run_many(requests, [lambda: False] * len(requests), outcomes.__setitem__, joining)
    return outcomes


def test_a_request_that_fails_alone_fails_only_itself(llama_engine, photos, task, huge, monkeypatch, caplog):
    """A prefix out of memory, whether the request starts the batch, joins it or searches beams,
    refuses that request; the others answer as they would alone."""
    prefix = llama_engine.decoder.prefix

    def short_of_memory(task_key, *args):
        if task_key == "tests/huge":
            with llama_engine.decoder.conditioning.reading(None):  # in its forward, layers conditioned on its images
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return prefix(task_key, *args)

    greedy = GenerationParams(max_new_tokens=12, min_new_tokens=12)
    beams = GenerationParams(max_new_tokens=4, num_beams=2)
    requests = {
        name: llama_engine.prepare([photos[photo]], "<image>Output:", chosen, params)
        for name, photo, chosen, params in [
            ("greedy", "rocket", task, greedy),
            ("greedy, huge", "chelsea", huge, greedy),
            ("beams", "camera", task, beams),
            ("beams, huge", "coffee", huge, beams),
            ("joiner, huge", "camera", huge, greedy),
            ("joiner", "coffee", task, GenerationParams(max_new_tokens=3)),
        ]
    }
    alone = {name: llama_engine.run(request) for name, request in requests.items() if "huge" not in name}
    monkeypatch.setattr(llama_engine.decoder, "prefix", short_of_memory)
    names = list(requests)
    outcomes = outcomes_of(llama_engine, [requests[name] for name in names[:4]], [requests[name] for name in names[4:]])
    assert sorted(outcomes) == list(range(6))
    for number, name in enumerate(names):
        if "huge" in name:
            assert isinstance(outcomes[number], GenerationFailed), name
            assert "ran out of memory" in str(outcomes[number])
        else:
            assert outcomes[number].token_ids == alone[name].token_ids, name
    assert "generation failed" not in caplog.text  # running out of memory is expected, not a bug


def test_an_unexpected_error_in_one_request_is_logged_and_refuses_it(
    llama_engine, photos, task, huge, monkeypatch, caplog
):
    prefix = llama_engine.decoder.prefix

    def broken(task_key, *args):
        if task_key == "tests/huge":
            raise KeyError("a bug")
        return prefix(task_key, *args)

    monkeypatch.setattr(llama_engine.decoder, "prefix", broken)
    params = GenerationParams(max_new_tokens=3)
    requests = [llama_engine.prepare([photos["rocket"]], "<image>Output:", chosen, params) for chosen in (huge, task)]
    outcomes = outcomes_of(llama_engine, requests)
    assert isinstance(outcomes[0], GenerationFailed)
    error_id = re.search(r"error id `([0-9a-f]{8})`", str(outcomes[0]))
    assert error_id and f"generation failed (error {error_id[1]})" in caplog.text  # the owner finds it by its id
    assert isinstance(outcomes[1], Answer)


def test_an_answered_request_is_let_go_while_the_batch_runs_on(llama_engine, photos, task):
    """A batch that keeps taking joiners can run for hours: it must not hold every request it answered."""
    long = llama_engine.prepare(
        [photos["rocket"]], "<image>Output:", task, GenerationParams(max_new_tokens=30, min_new_tokens=30)
    )
    short = llama_engine.prepare([photos["coffee"].copy()], "<image>Output:", task, GenerationParams(max_new_tokens=2))
    short_alive = weakref.ref(short)
    image_alive = weakref.ref(short.request_images[0])
    handed = [short]
    del short
    answered: list[int] = []
    after_answer: list[tuple[bool, int]] = []  # per step: the short request or its image alive; rows alive

    def joining(running: int):
        if answered and len(after_answer) < 3:
            gc.collect()
            rows = sum(type(thing) is Running for thing in gc.get_objects())
            after_answer.append((short_alive() is not None or image_alive() is not None, rows))
        arrived = [(request, lambda: False) for request in handed]
        handed.clear()
        return arrived

    llama_engine.run_many([long], [lambda: False], lambda index, outcome: answered.append(index), joining)
    assert answered == [1, 0]  # the short one first, while the long one ran on
    assert after_answer[1:] == [(False, 1), (False, 1)]  # from the next step, only the long one's row


async def test_a_run_that_ends_without_answering_tells_its_askers_and_logs_it(
    llama_engine, make_service, photos, task, caplog
):
    """The message says it has been logged: so it must be."""
    gated = GatedEngine(llama_engine)
    gated.gate.set()
    gated.run_many = lambda requests, stops, deliver, joining=None: None  # answers nobody
    service = make_service(gated)
    with pytest.raises(GenerationFailed, match=r"^The model gave no answer; it has been logged\.$"):
        await service.answer([photos["rocket"]], "<image>Output:", task, GenerationParams(max_new_tokens=2))
    assert "the engine ended its run without answering 1 request(s)" in caplog.text
