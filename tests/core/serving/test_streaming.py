"""Following a request while it decodes: its text so far, word by word, without changing its answer."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from core.errors import GenerationFailed, RequestCancelled
from core.generation import GenerationParams
from core.model.decode.graphed_steps import StaticSteps
from core.model.decode.shared_prefix import SharedPrefixSteps
from core.model.decode.state import Running
from core.prompts import Example, Task
from tests.helpers.gated_engine import GatedEngine

# The tiny random models repeat one word forever unless kept from repeating themselves.
LONG = GenerationParams(max_new_tokens=48, min_new_tokens=48, repetition_penalty=2.0)


@pytest.fixture(scope="module")
def task(photos) -> Task:
    return Task("t", "", "<image>Output:", (Example(photos["astronaut"], "<image>Output:An astronaut."),))


async def followed(ticket) -> tuple[list[str], object]:
    """Every text the ticket streamed, read as fast as they come, and then its answer."""
    texts = [text async for text in ticket.partial_texts()]
    return texts, await ticket.answer()


def assert_streamed(texts: list[str], answer_text: str) -> None:
    """Texts that grow, each a prefix of the answer ending where a word ends, the last short of at most one word."""
    assert all(len(later) > len(earlier) for earlier, later in itertools.pairwise(texts))
    for text in texts:
        assert answer_text.startswith(text), (text, answer_text)
        rest = answer_text[len(text) :]
        assert not (rest[:1].isalnum() and text[-1].isalnum()), f"half a word: {text!r} of {answer_text!r}"
    assert not answer_text[len(texts[-1]) :].split()[1:], "the last text lacks more than the last word"


@pytest.mark.parametrize("stepping", ["eager", "static"])
async def test_a_long_greedy_answer_streams_growing_words_that_begin_it(
    llama_engine, make_service, photos, task, monkeypatch, stepping
):
    """``static``: the steps run over the fixed buffers that the GPU's CUDA graphs replay."""
    if stepping == "static":
        decoder = llama_engine.decoder
        monkeypatch.setattr(decoder, "static_steps", StaticSteps(decoder.conditioning, 8, 2**30, graphed=False))
    service = make_service(llama_engine)
    texts, answer = await followed(service.submit([photos["coffee"]], "<image>Output:", task, LONG))
    assert len(texts) >= 3, texts
    assert_streamed(texts, answer.text)
    assert len(answer.token_ids) == 48
    assert stepping == "eager" or llama_engine.decoder.static_steps.used > 0
    unfollowed = await service.answer([photos["coffee"]], "<image>Output:", task, LONG)
    assert answer.token_ids == unfollowed.token_ids


async def test_a_sampled_answer_streams_and_is_the_answer_it_would_have_been(llama_engine, make_service, photos, task):
    service = make_service(llama_engine)
    params = LONG.replace(do_sample=True, top_k=50)
    torch.manual_seed(7)
    texts, answer = await followed(service.submit([photos["chelsea"]], "<image>Output:", task, params))
    torch.manual_seed(7)
    unfollowed = await service.answer([photos["chelsea"]], "<image>Output:", task, params)
    assert len(texts) >= 2, texts
    assert_streamed(texts, answer.text)
    assert answer.token_ids == unfollowed.token_ids


async def test_beam_search_streams_nothing_its_best_beam_can_change(llama_engine, make_service, photos, task):
    service = make_service(llama_engine)
    params = GenerationParams(max_new_tokens=16, min_new_tokens=16, num_beams=3)
    texts, answer = await followed(service.submit([photos["rocket"]], "<image>Output:", task, params))
    assert texts == []
    assert len(answer.token_ids) == 16


async def batched(llama_engine, make_service, photos, task, follow: bool) -> list[tuple[list[str], object]]:
    """Two requests decoded in one batch (both wait while a one-token request runs), followed or not."""
    gated = GatedEngine(llama_engine)
    service = make_service(gated)
    first = service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams(max_new_tokens=1))
    await asyncio.to_thread(gated.started.wait, 10)
    together = [
        service.submit([photos[name]], prompt, task, LONG)
        for name, prompt in [("coffee", "<image>Output:"), ("chelsea", "<image>Question:What is it? Answer:")]
    ]
    gated.gate.set()
    await first.answer()
    results = await asyncio.gather(*(followed(ticket) if follow else unfollowed(ticket) for ticket in together))
    assert len(gated.runs) == 1, "the two joined the first run and decoded together"
    return results


async def unfollowed(ticket) -> tuple[list[str], object]:
    return [], await ticket.answer()


async def test_requests_batched_together_stream_each_their_own_answer(llama_engine, make_service, photos, task):
    streamed = await batched(llama_engine, make_service, photos, task, follow=True)
    for texts, answer in streamed:
        assert texts, "every batched request streamed"
        assert_streamed(texts, answer.text)
    assert streamed[0][1].text != streamed[1][1].text
    unstreamed = await batched(llama_engine, make_service, photos, task, follow=False)
    assert [a.token_ids for _, a in streamed] == [a.token_ids for _, a in unstreamed]


async def test_a_request_joining_a_running_batch_streams(llama_engine, make_service, photos, task):
    gated = GatedEngine(llama_engine)
    gated.gate.set()
    service = make_service(gated)
    long = service.submit(
        [photos["chelsea"]], "<image>Long:", task, LONG.replace(max_new_tokens=200, min_new_tokens=200)
    )
    long_texts = long.partial_texts()
    assert await anext(long_texts)  # it decodes now
    joiner = service.submit(
        [photos["camera"]], "<image>Output:", task, LONG.replace(max_new_tokens=24, min_new_tokens=24)
    )
    texts, answer = await followed(joiner)
    assert texts
    assert_streamed(texts, answer.text)
    assert not long.position and len(gated.runs) == 1, "it joined the long request's batch"
    long.cancel()
    async for _ in long_texts:  # it ends, without an error, now that the long one is cancelled
        pass
    with pytest.raises(RequestCancelled):
        await long.answer()


async def test_cancelling_mid_stream_ends_the_stream_and_keeps_what_was_written(
    llama_engine, make_service, photos, task
):
    service = make_service(llama_engine)
    params = LONG.replace(max_new_tokens=200, min_new_tokens=200)
    ticket = service.submit([photos["coffee"]], "<image>Output:", task, params)
    texts = []
    async for text in ticket.partial_texts():
        texts.append(text)
        if len(texts) == 2:
            ticket.cancel()
    assert len(texts) >= 2
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    with pytest.raises(RequestCancelled, match="cancelled while it ran"):
        await ticket.answer()
    assert ticket._job.request.progress.wake is None  # nobody follows it any more


async def test_a_failed_request_fails_its_stream_with_the_answers_error(
    llama_engine, make_service, photos, task, monkeypatch
):
    step, calls = SharedPrefixSteps.step, []

    def failing_later(self: SharedPrefixSteps, rows: list[Running]) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 30:
            raise RuntimeError("simulated fault in a decode step")
        return step(self, rows)

    monkeypatch.setattr(SharedPrefixSteps, "step", failing_later)
    service = make_service(llama_engine)
    ticket = service.submit([photos["coffee"]], "<image>Output:", task, LONG)
    texts = []
    with pytest.raises(GenerationFailed) as streamed:
        async for text in ticket.partial_texts():
            texts.append(text)
    with pytest.raises(GenerationFailed) as answered:
        await ticket.answer()
    assert streamed.value is answered.value
    assert texts, "it failed mid-stream"


async def test_a_request_is_followed_by_one_reader_at_a_time(llama_engine, make_service, photos, task):
    service = make_service(llama_engine)
    ticket = service.submit([photos["coffee"]], "<image>Output:", task, LONG)
    first = ticket.partial_texts()
    assert await anext(first)  # it is followed now, while it decodes
    with pytest.raises(RuntimeError, match="one reader at a time"):
        await anext(ticket.partial_texts())
    await first.aclose()
    texts, answer = await followed(ticket)  # the first let go: another may follow
    assert_streamed(texts, answer.text)
