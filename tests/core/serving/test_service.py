"""The service: one worker owns the model; callers never see each other's answers."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from core.errors import (
    BadParameter,
    BadPrompt,
    GenerationFailed,
    RequestCancelled,
    RequestExpired,
    ServiceBusy,
    ServiceClosed,
)
from core.generation import GenerationParams
from core.model.engine import holds_conditioning
from core.prompts import Example, Task
from tests.helpers.gated_engine import GatedEngine


@pytest.fixture(scope="module")
def task(photos) -> Task:
    return Task("t", "", "<image>Output:", (Example(photos["astronaut"], "<image>Output:An astronaut."),))


async def test_concurrent_callers_each_get_their_own_answer(llama_engine, make_service, photos, task):
    requests = [
        ([photos[name]], prompt, GenerationParams(max_new_tokens=tokens, num_beams=beams))
        for name, prompt, tokens, beams in [
            ("rocket", "<image>Output:", 8, 1),
            ("chelsea", "<image>Output:", 6, 1),
            ("camera", "A photo: <image>Output:", 8, 2),
            ("coffee", "<image>Question:What is this? Short answer:", 5, 1),
            ("rocket", "<image>Question:Is it day? Short answer:", 7, 3),
            ("chelsea", "<image>Output:", 9, 2),
        ]
    ]
    expected = [
        llama_engine.run(llama_engine.prepare(images, prompt, task, params)) for images, prompt, params in requests
    ]
    service = make_service(llama_engine, max_queue=16)
    answers = await asyncio.gather(
        *(service.answer(images, prompt, task, params) for images, prompt, params in requests)
    )
    assert [a.token_ids for a in answers] == [e.token_ids for e in expected]
    assert [a.prompt for a in answers] == [e.prompt for e in expected]
    assert len({a.token_ids for a in answers}) > 1


async def test_full_queue_is_refused_as_busy(llama_engine, make_service, photos, task):
    gated = GatedEngine(llama_engine)
    service = make_service(gated, max_queue=2)
    params = GenerationParams(max_new_tokens=2)
    ask = lambda server: service.submit([photos["rocket"]], "<image>Output:", task, params, party=server).answer()  # noqa: E731
    running = asyncio.create_task(ask(1))
    await asyncio.to_thread(gated.started.wait, 10)
    waiting = [asyncio.create_task(ask(server)) for server in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(ServiceBusy, match=r"busy \(2 requests are already waiting\)"):
        await ask(3)
    gated.gate.set()
    answers = await asyncio.gather(running, *waiting)
    assert len(answers) == 3


async def test_another_server_goes_before_a_servers_flood(llama_engine, make_service, photos, task):
    """The line is fair between servers: one server's queued requests do not push another's first
    request to the back, and direct messages, however many accounts write, are one party."""
    gated = GatedEngine(llama_engine)
    service = make_service(gated, max_queue=32)
    params = GenerationParams(max_new_tokens=2)
    submit = lambda party: service.submit([photos["rocket"]], "<image>Output:", task, params, party=party)  # noqa: E731
    running = submit(1)
    await asyncio.to_thread(gated.started.wait, 10)
    flood = [submit(1) for _ in range(4)] + [submit(None) for _ in range(6)]
    other = submit(2)
    # Server 1 already runs one request, so the others' first requests go before its next: then turns.
    assert [ticket.position for ticket in flood] == [3, 5, 7, 9, 1, 4, 6, 8, 10, 11]
    assert other.position == 2
    gated.gate.set()
    answers = await asyncio.gather(*(ticket.answer() for ticket in [running, *flood, other]))
    assert all(answer.token_ids for answer in answers)


async def held_at_the_gate(llama_engine, make_service, photos, task, max_new_tokens: int):
    """A service whose worker has taken one request and waits at the gate before running it."""
    gated = GatedEngine(llama_engine)
    service = make_service(gated)
    params = GenerationParams(max_new_tokens=max_new_tokens)
    running = asyncio.create_task(service.answer([photos["rocket"]], "<image>Output:", task, params))
    await asyncio.to_thread(gated.started.wait, 10)
    return gated, service, running


async def test_cancelled_request_never_reaches_the_model(llama_engine, make_service, photos, task):
    gated, service, first = await held_at_the_gate(llama_engine, make_service, photos, task, 2)
    withdrawn = asyncio.create_task(service.answer([photos["chelsea"]], "<image>Withdrawn:", task, GenerationParams()))
    await asyncio.sleep(0)
    withdrawn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await withdrawn
    gated.gate.set()
    await first
    after = await service.answer([photos["coffee"]], "<image>After:", task, GenerationParams(max_new_tokens=2))
    assert after.prompt.endswith("<image>After:")
    assert [prompt.rsplit(">", 1)[-1] for prompt in gated.ran] == ["Output:", "After:"]


async def test_a_batch_running_past_the_grace_is_stopped_and_its_askers_told(llama_engine, make_service, photos, task):
    """Shutdown cut off a long answer on a CPU: the bot disconnected and closed the database under it."""
    gated, service, running = await held_at_the_gate(llama_engine, make_service, photos, task, 200)

    def release_once_stopped() -> None:  # the run goes on only after the grace has passed
        deadline = time.monotonic() + 30
        while not any(job.cancelled.is_set() for job in service._running) and time.monotonic() < deadline:
            time.sleep(0.01)
        gated.gate.set()

    watcher = threading.Thread(target=release_once_stopped)
    watcher.start()
    await asyncio.to_thread(service.close, 0.2)
    watcher.join()
    with pytest.raises(ServiceClosed, match="was stopped before it finished"):
        await running
    assert not service._worker.is_alive()


def test_stop_request_ends_generation_between_tokens(llama_engine, photos, task):
    prepared = llama_engine.prepare([photos["rocket"]], "<image>Output:", task, GenerationParams(max_new_tokens=50))
    assert len(llama_engine.run(prepared, should_stop=lambda: True).token_ids) <= 1
    assert len(llama_engine.run(prepared).token_ids) > 1


async def test_bad_input_is_refused_before_queueing(llama_engine, make_service, photos, task):
    gated = GatedEngine(llama_engine)
    service = make_service(gated)
    with pytest.raises(BadPrompt, match="has 0 <image> markers"):
        await service.answer([photos["rocket"]], "Output:", task, GenerationParams())
    assert service.waiting == 0
    assert not gated.started.is_set()


def upstream_vision_x(engine, request) -> torch.Tensor:
    """All the prompt's images as upstream takes them: (1, images, frames=1, channels, height, width)."""
    frames = [engine._pixels(image) for image in (*request.example_images, *request.request_images)]
    return torch.stack(frames).unsqueeze(1).unsqueeze(0).to(engine.loaded.device, engine.loaded.precision.dtype)


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam-search"])
async def test_failed_request_leaves_no_conditioned_state(
    llama_engine, make_service, photos, task, monkeypatch, num_beams
):
    model = llama_engine.loaded.model
    params = GenerationParams(max_new_tokens=6, num_beams=num_beams)
    baseline = llama_engine.run(llama_engine.prepare([photos["rocket"]], "<image>Output:", task, params))
    final_norm = model.lang_encoder.model.norm

    def broken(*args, **kwargs):
        raise RuntimeError("simulated fault after the layers were conditioned")

    monkeypatch.setattr(final_norm, "forward", broken)
    prepared = llama_engine.prepare([photos["rocket"]], "<image>Output:", task, params)
    # Upstream alone keeps the failed request's images on the layers...
    with pytest.raises(RuntimeError, match="simulated fault"):
        model.generate(vision_x=upstream_vision_x(llama_engine, prepared), lang_x=prepared.input_ids, max_new_tokens=2)
    assert holds_conditioning(model)
    with pytest.raises(AssertionError, match="Expect vision_x to be None"), torch.inference_mode():
        model(vision_x=upstream_vision_x(llama_engine, prepared), lang_x=prepared.input_ids)
    # ...and the service clears them.
    service = make_service(llama_engine)
    with pytest.raises(GenerationFailed, match="Something went wrong while the model was answering"):
        await service.answer([photos["rocket"]], "<image>Output:", task, params)
    assert not holds_conditioning(model)
    monkeypatch.undo()
    again = await service.answer([photos["rocket"]], "<image>Output:", task, params)
    assert again.token_ids == baseline.token_ids
    with torch.inference_mode():
        logits = model(vision_x=upstream_vision_x(llama_engine, prepared), lang_x=prepared.input_ids).logits
    assert logits.shape[1] == prepared.input_ids.shape[1]
    assert not holds_conditioning(model)


async def test_closing_withdraws_waiting_requests_and_refuses_new_ones(llama_engine, make_service, photos, task):
    gated = GatedEngine(llama_engine)
    service = make_service(gated)
    params = GenerationParams(max_new_tokens=2)
    running = asyncio.create_task(service.answer([photos["rocket"]], "<image>Output:", task, params))
    await asyncio.to_thread(gated.started.wait, 10)
    waiting = asyncio.create_task(service.answer([photos["chelsea"]], "<image>Output:", task, params))
    await asyncio.sleep(0)
    gated.gate.set()
    await asyncio.to_thread(service.close)
    assert len((await running).token_ids) <= 2
    with pytest.raises(ServiceClosed, match="was not run"):
        await waiting
    with pytest.raises(ServiceClosed, match="shutting down"):
        await service.answer([photos["chelsea"]], "<image>Output:", task, params)


async def test_waiting_requests_are_decoded_together_and_a_short_one_leaves_early(
    llama_engine, make_service, photos, task
):
    gated = GatedEngine(llama_engine)
    service = make_service(gated, max_queue=8)
    first = asyncio.create_task(
        service.answer([photos["rocket"]], "<image>Output:", task, GenerationParams(max_new_tokens=1))
    )
    await asyncio.to_thread(gated.started.wait, 10)
    long = asyncio.create_task(
        service.answer(
            [photos["chelsea"]], "<image>Long:", task, GenerationParams(max_new_tokens=60, min_new_tokens=60)
        )
    )
    short = asyncio.create_task(
        service.answer([photos["coffee"]], "<image>Short:", task, GenerationParams(max_new_tokens=2))
    )
    await asyncio.sleep(0.05)
    gated.gate.set()
    await first
    done, _ = await asyncio.wait({long, short}, return_when=asyncio.FIRST_COMPLETED)
    assert done == {short}
    assert not long.done()
    assert len((await long).token_ids) == 60
    assert [p.rsplit(">", 1)[-1] for p in gated.ran] == ["Output:", "Long:", "Short:"]


async def test_waiting_requests_see_their_place_in_line_and_can_withdraw(llama_engine, make_service, photos, task):
    gated = GatedEngine(llama_engine)
    service = make_service(gated)
    params = GenerationParams(max_new_tokens=2)
    running = service.submit([photos["rocket"]], "<image>Output:", task, params)
    await asyncio.to_thread(gated.started.wait, 10)
    second = service.submit([photos["chelsea"]], "<image>Second:", task, params)
    third = service.submit([photos["coffee"]], "<image>Third:", task, params)
    assert (running.position, second.position, third.position) == (None, 1, 2)
    second.cancel()
    assert (second.position, third.position, service.waiting) == (None, 1, 1)
    with pytest.raises(RequestCancelled, match="cancelled before it ran"):
        await second.answer()
    gated.gate.set()
    await running.answer()
    assert (await third.answer()).prompt.endswith("<image>Third:")
    assert [p.rsplit(">", 1)[-1] for p in gated.ran] == ["Output:", "Third:"]


async def test_a_request_past_its_deadline_is_refused_instead_of_run(llama_engine, make_service, photos, task):
    gated = GatedEngine(llama_engine)
    service = make_service(gated)
    params = GenerationParams(max_new_tokens=2)
    running = service.submit([photos["rocket"]], "<image>Output:", task, params)
    await asyncio.to_thread(gated.started.wait, 10)
    late = service.submit([photos["chelsea"]], "<image>Late:", task, params, deadline=time.monotonic() + 0.05)
    await asyncio.sleep(0.1)
    gated.gate.set()
    await running.answer()
    with pytest.raises(RequestExpired, match="waited too long"):
        await late.answer()
    assert [p.rsplit(">", 1)[-1] for p in gated.ran] == ["Output:"]
    # Now a batch has taken measurable time, a queue that cannot be served before a deadline is refused at once.
    assert service.estimated_wait(1) > 0
    with pytest.raises(ServiceBusy, match="too long to answer you in time"):
        service.submit([photos["chelsea"]], "<image>Output:", task, params, deadline=time.monotonic())


async def test_a_request_joins_a_running_batch_instead_of_waiting_for_it(llama_engine, make_service, photos, task):
    gated = GatedEngine(llama_engine)
    service = make_service(gated)
    gated.gate.set()
    long_params = GenerationParams(max_new_tokens=200, min_new_tokens=200)
    long = asyncio.create_task(service.answer([photos["chelsea"]], "<image>Long:", task, long_params))
    await asyncio.to_thread(gated.started.wait, 10)
    short_params = GenerationParams(max_new_tokens=3)
    short = await service.answer([photos["coffee"]], "<image>Short:", task, short_params)
    assert not long.done()  # it joined the long one's batch and left it first
    assert len((await long).token_ids) == 200
    alone = llama_engine.run(llama_engine.prepare([photos["coffee"]], "<image>Short:", task, short_params))
    assert short.token_ids == alone.token_ids  # (the model is free again: only one thread may run it)
    assert [p.rsplit(">", 1)[-1] for p in gated.ran] == ["Long:", "Short:"]


async def test_beam_search_waiting_in_line_is_not_overtaken_by_joiners(llama_engine, make_service, photos, task):
    gated = GatedEngine(llama_engine)
    service = make_service(gated)
    long = service.submit(
        [photos["chelsea"]], "<image>Long:", task, GenerationParams(max_new_tokens=40, min_new_tokens=40)
    )
    await asyncio.to_thread(gated.started.wait, 10)
    beams = service.submit([photos["rocket"]], "<image>Beams:", task, GenerationParams(max_new_tokens=3, num_beams=3))
    after = service.submit([photos["coffee"]], "<image>After:", task, GenerationParams(max_new_tokens=3))
    gated.started.clear()
    gated.gate.set()
    await long.answer()
    await asyncio.gather(beams.answer(), after.answer())
    # The beam request starts the next run; the greedy one behind it waits for that run, not joining the first.
    assert [p.rsplit(">", 1)[-1] for p in gated.ran] == ["Long:", "Beams:", "After:"]


async def test_the_service_in_this_process_reads_only_its_own_model(make_service, llama_engine, photos):
    service = make_service(llama_engine)
    assert service.rules_for(None) is llama_engine.rules
    message = r"^This bot runs one model in its own process; it cannot answer with another\."
    with pytest.raises(BadParameter, match=message):
        service.rules_for("mpt")
    with pytest.raises(BadParameter, match=message):
        service.submit(
            [photos["rocket"]], "<image>Output:", Task("t", "", "<image>Output:"), GenerationParams(), model="mpt"
        )
