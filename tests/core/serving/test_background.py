"""Background requests (a task's evaluation): answered as a member's request would be, but never in
a member's way. Steps are counted on a stepped engine, not timed: the machine may be busy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from core.errors import BadParameter, RequestCancelled, RequestExpired, ServiceBusy, ServiceClosed
from core.generation import GenerationParams
from core.model.lru_cache import LruCache
from core.prompts import Example, Task
from core.serving.local import BACKGROUND_QUEUE, InferenceService, Ticket
from tests.helpers.gated_engine import GatedEngine

SHORT = GenerationParams(max_new_tokens=3, min_new_tokens=3)
LONG = GenerationParams(max_new_tokens=30, min_new_tokens=30)


@pytest.fixture(scope="module")
def task(photos) -> Task:
    return Task("t", "", "<image>Output:", (Example(photos["astronaut"], "<image>Output:An astronaut."),))


@pytest.fixture
def stepped(llama_engine) -> Iterator[Callable[..., tuple[GatedEngine, InferenceService]]]:
    """A service over an engine that stops at each step's end until the test lets it go on."""
    made: list[tuple[GatedEngine, InferenceService]] = []

    def make(max_batch: int = 16, max_queue: int = 8) -> tuple[GatedEngine, InferenceService]:
        gated = GatedEngine(llama_engine, stepped=True)
        gated.gate.set()
        made.append((gated, InferenceService(gated, max_queue, max_batch)))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for gated, service in made:
        gated.run_freely()
        service.close()


def ask(service, photos, task, name: str, params=SHORT, party=None, background=False) -> Ticket:
    """A request whose prompt ends in ``name``, as ``said`` reads it back."""
    return service.submit([photos["rocket"]], f"<image>{name}:", task, params, party=party, background=background)


def said(prompts: list[str]) -> list[str]:
    return [prompt.rsplit(">", 1)[-1].rstrip(":") for prompt in prompts]


def alone(engine, photos, task, name: str, params=SHORT) -> tuple[int, ...]:
    return engine.run(engine.prepare([photos["rocket"]], f"<image>{name}:", task, params)).token_ids


async def step_ends_until_answered(gated: GatedEngine, answer: asyncio.Task, parked: bool) -> int:
    """The step ends the run reaches from the request's submission to its answer; ``parked``: it was
    submitted while the run stood at a step's end, which is not counted."""
    ends = 0
    while not answer.done():
        await asyncio.to_thread(gated.step if parked or ends else gated.at_step)
        await asyncio.sleep(0)
        ends += 1
    return ends


async def test_background_answers_are_the_same_requests_answers_as_a_members(llama_engine, make_service, photos, task):
    service = make_service(llama_engine)
    tickets = [
        ask(service, photos, task, "Eval A", LONG, party=1, background=True),
        ask(service, photos, task, "Eval B", SHORT, party=2, background=True),
        ask(service, photos, task, "Member", LONG, party=3),
    ]
    answers = await asyncio.gather(*(ticket.answer() for ticket in tickets))
    expected = [
        alone(llama_engine, photos, task, name, params)
        for name, params in [("Eval A", LONG), ("Eval B", SHORT), ("Member", LONG)]
    ]
    assert [answer.token_ids for answer in answers] == expected


async def test_a_member_arriving_during_an_evaluation_waits_no_longer_than_on_an_idle_service(stepped, photos, task):
    idle_engine, idle = stepped()
    answer = asyncio.create_task(ask(idle, photos, task, "Member", party=3).answer())
    idle_ends = await step_ends_until_answered(idle_engine, answer, parked=False)

    gated, service = stepped(max_batch=1)  # the evaluation's row is on top: the member still has the one place
    first = ask(service, photos, task, "Eval A", LONG, party=1, background=True)
    second = ask(service, photos, task, "Eval B", SHORT, party=2, background=True)
    await asyncio.to_thread(gated.at_step)  # the first evaluation runs; the second waits its turn
    answer = asyncio.create_task(ask(service, photos, task, "Member", party=3).answer())
    ends = await step_ends_until_answered(gated, answer, parked=True)
    assert ends == idle_ends
    running, joiners = gated.joins[-ends]  # the first step's end after it came took it
    assert (running, said(joiners)) == (1, ["Member"])
    assert (first.position, second.position) == (None, 1)  # the evaluation ran on, the next one still waits
    gated.run_freely()
    await asyncio.gather(first.answer(), second.answer())
    assert said(gated.ran) == ["Eval A", "Member", "Eval B"]


async def test_members_keep_the_whole_batch_and_one_background_row_runs_on_top(stepped, photos, task):
    gated, service = stepped(max_batch=2)
    first = ask(service, photos, task, "Member 1", party=1)
    await asyncio.to_thread(gated.at_step)
    evaluations = [ask(service, photos, task, f"Eval {n}", LONG, party=10 + n, background=True) for n in (1, 2)]
    members = [ask(service, photos, task, f"Member {n}", LONG, party=n) for n in (2, 3)]
    answers = asyncio.gather(*(ticket.answer() for ticket in [first, *evaluations, *members]))
    while not answers.done():
        await asyncio.to_thread(gated.step)
        await asyncio.sleep(0)
        rows = list(service._running)
        assert sum(job.background for job in rows) <= 1
        assert len(rows) <= 3
    await answers
    # Evaluations waited while a member did; the first joined beside a full batch of members, the second after it.
    assert [(running, said(joiners)) for running, joiners in gated.joins if joiners] == [
        (1, ["Member 2"]),
        (1, ["Member 3", "Eval 1"]),
        (0, ["Eval 2"]),
    ]


async def test_background_requests_have_a_line_of_their_own(llama_engine, make_service, photos, task):
    """Members' max_queue, waiting and /queue's figures are theirs alone; the background line is
    bounded apart and fair between servers."""
    gated = GatedEngine(llama_engine)
    service = make_service(gated, max_queue=1)
    running = ask(service, photos, task, "Member 1", party=1)
    await asyncio.to_thread(gated.started.wait, 10)
    evaluations = [ask(service, photos, task, f"Eval 1.{n}", party=1, background=True) for n in range(3)]
    evaluations.append(ask(service, photos, task, "Eval 2", party=2, background=True))
    assert [ticket.position for ticket in evaluations] == [1, 3, 4, 2]
    evaluations += [ask(service, photos, task, f"Eval {n}", party=n, background=True) for n in range(3, 7)]
    assert len(evaluations) == BACKGROUND_QUEUE
    with pytest.raises(ServiceBusy, match=rf"busy \({BACKGROUND_QUEUE} requests are already waiting\)"):
        ask(service, photos, task, "Eval 7", party=7, background=True)
    waiting = ask(service, photos, task, "Member 2", party=2)
    assert (service.waiting, service.line_status().waiting, service.line_status().running) == (1, 1, 1)
    with pytest.raises(ServiceBusy, match=r"busy \(1 request is already waiting\)"):
        ask(service, photos, task, "Member 3", party=3)
    gated.gate.set()
    await asyncio.gather(*(ticket.answer() for ticket in [running, waiting, *evaluations]))
    assert said(gated.ran)[:2] == ["Member 1", "Member 2"]
    assert service.times.typical().answers == 2  # members' answers only


async def test_a_waiting_background_request_is_withdrawn_by_cancel_and_by_its_deadline(
    llama_engine, make_service, photos, task
):
    gated = GatedEngine(llama_engine)
    service = make_service(gated)
    running = ask(service, photos, task, "Member", party=1)
    await asyncio.to_thread(gated.started.wait, 10)
    cancelled = ask(service, photos, task, "Cancelled", party=1, background=True)
    late = service.submit(
        [photos["rocket"]], "<image>Late:", task, SHORT, deadline=time.monotonic() + 0.05, background=True
    )
    cancelled.cancel()
    assert (cancelled.position, late.position) == (None, 1)
    with pytest.raises(RequestCancelled, match="cancelled before it ran"):
        await cancelled.answer()
    await asyncio.sleep(0.1)
    gated.gate.set()
    await running.answer()
    with pytest.raises(RequestExpired, match="waited too long"):
        await late.answer()
    assert said(gated.ran) == ["Member"]


async def test_closing_withdraws_waiting_background_requests(stepped, photos, task):
    gated, service = stepped()
    running = ask(service, photos, task, "Eval 1", party=1, background=True)
    await asyncio.to_thread(gated.at_step)
    waiting = ask(service, photos, task, "Eval 2", party=2, background=True)
    closing = asyncio.create_task(asyncio.to_thread(service.close))
    with pytest.raises(ServiceClosed, match="was not run"):
        await waiting.answer()
    gated.run_freely()
    await closing
    assert len((await running.answer()).token_ids) == 3  # the running one ends as members' do: answered
    assert said(gated.ran) == ["Eval 1"]


async def test_a_running_background_request_is_cancelled_at_its_next_step(stepped, photos, task):
    gated, service = stepped()
    evaluation = ask(service, photos, task, "Eval", LONG, background=True)
    await asyncio.to_thread(gated.at_step)
    evaluation.cancel()
    await asyncio.to_thread(gated.step)
    with pytest.raises(RequestCancelled, match="cancelled while it ran"):
        await evaluation.answer()


async def test_a_members_beam_search_stops_an_evaluation_which_runs_again_after_it(llama_engine, stepped, photos, task):
    """A beam search runs apart, once the batch drains: an evaluation's row must not hold it back."""
    gated, service = stepped()
    evaluation = ask(service, photos, task, "Eval", LONG, party=1, background=True)
    await asyncio.to_thread(gated.at_step)
    beams = ask(service, photos, task, "Beams", GenerationParams(max_new_tokens=3, num_beams=2), party=2)
    await asyncio.to_thread(gated.step)  # the evaluation stops at this step and is put back, first in its line
    assert evaluation.position == 1
    gated.run_freely()
    answer = await evaluation.answer()
    await beams.answer()
    assert [said(run) for run in gated.runs] == [["Eval"], ["Beams"], ["Eval"]]
    assert answer.token_ids == alone(llama_engine, photos, task, "Eval", LONG)


@pytest.mark.parametrize("params", [GenerationParams(num_beams=2), GenerationParams(do_sample=True)])
async def test_a_background_request_is_greedy(llama_engine, make_service, photos, task, params):
    service = make_service(llama_engine)
    with pytest.raises(BadParameter, match="greedy"):
        ask(service, photos, task, "Eval", params, background=True)


def _keyed(photos, name: str, photo: str) -> Task:
    return Task(name, "", "<image>Output:", (Example(photos[photo], "<image>Output:A photo."),), key=name)


async def test_an_evaluations_prefixes_never_push_out_a_members(llama_engine, make_service, photos, monkeypatch):
    """A background request's task prefix (and its images' features) is kept only in room nobody else
    needs: a server evaluating its tasks must not cost the others their cached tasks."""
    decoder = llama_engine.decoder
    monkeypatch.setattr(decoder, "prefixes", LruCache(2**40, decoder.prefixes._size_of))
    service = make_service(llama_engine)
    members, evaluated, newer = (
        _keyed(photos, *names) for names in (("a", "chelsea"), ("b", "camera"), ("c", "coffee"))
    )
    await ask(service, photos, members, "Member").answer()
    size = decoder.prefixes.bytes
    decoder.prefixes.capacity = size * 5 // 2  # room for two of these prefixes, not three
    await ask(service, photos, evaluated, "Eval", background=True).answer()
    assert decoder.prefixes.bytes == 2 * size  # kept in the free room
    await ask(service, photos, newer, "Member").answer()  # needs room: the evaluation's goes, though newer
    misses = decoder.prefixes.misses
    await ask(service, photos, members, "Member").answer()
    assert decoder.prefixes.misses == misses  # the member's task is still there
    await ask(service, photos, evaluated, "Eval", background=True).answer()
    assert decoder.prefixes.misses == misses + 1 and decoder.prefixes.bytes == 2 * size  # no free room: not kept
    for task in (members, newer):
        await ask(service, photos, task, "Member").answer()
    assert decoder.prefixes.misses == misses + 1
