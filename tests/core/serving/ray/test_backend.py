"""The ray backend: two CPU replicas on a local Ray head give the local service's answers exactly."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest

from core.config import RaySettings
from core.errors import BadParameter, BadPrompt, RequestExpired
from core.generation import GenerationParams
from core.prompts import Example, Task
from tests.helpers.settings import tiny_settings

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def remote(ray_head, model_dirs):
    from core.serving.ray.backend import RayInferenceService

    settings = tiny_settings(model_dirs["llama"])
    settings.model.choices = [str(model_dirs["gptneox"])]
    settings.service.backend = "ray"
    settings.ray = RaySettings(address=ray_head, replicas=2, num_cpus=0.5, extra_model_memory_gib=1)
    settings.answers.stream_edit_seconds = 0.1  # a followed text is sent every 0.025 s: several per answer here
    service = RayInferenceService.connect(settings)
    yield service
    service.close()


async def test_answers_are_token_identical_to_the_local_engine(remote, llama_engine, photos):
    task = Task("pets", "", "<image>Output:", (Example(photos["chelsea"], "<image>Output:a cat."),), key="test/pets/1")
    cases = [
        (photos["rocket"], "<image>Output:", GenerationParams(max_new_tokens=8)),
        (photos["coffee"], "<image>Question: What is it? Short answer:", GenerationParams(max_new_tokens=6)),
        (photos["astronaut"], "A picture: <image>Output:", GenerationParams(max_new_tokens=5, num_beams=3)),
    ]
    for image, prompt, params in cases:
        local = llama_engine.run(llama_engine.prepare([image], prompt, task, params))
        answer = await remote.answer([image], prompt, task, params)
        assert (answer.token_ids, answer.text, answer.prompt) == (local.token_ids, local.text, local.prompt)


async def test_a_chosen_model_is_loaded_on_one_replica_and_answers_as_it_would_locally(
    remote, engines, model_dirs, photos
):
    chosen, engine = str(model_dirs["gptneox"]), engines["gptneox"]
    task = Task("pets", "", "<image>Output:", (Example(photos["chelsea"], "<image>Output:a cat."),), key="test/pets/1")
    params = GenerationParams(max_new_tokens=8)
    for image in ("rocket", "coffee", "astronaut"):
        local = engine.run(engine.prepare([photos[image]], "<image>Output:", task, params))
        answer = await remote.submit([photos[image]], "<image>Output:", task, params, model=chosen).answer()
        assert (answer.token_ids, answer.text) == (local.token_ids, local.text)
    holding = [replica for replica in await asyncio.to_thread(remote.replica_status) if chosen in replica["models"]]
    assert len(holding) == 1
    default = await remote.answer([photos["rocket"]], "<image>Output:", task, params)
    assert default.token_ids != answer.token_ids or default.text != answer.text

    with pytest.raises(BadParameter, match="does not offer that model"):
        remote.submit([photos["rocket"]], "<image>Output:", task, params, model=str(model_dirs["mpt"]))


async def test_a_followed_answer_streams_from_its_replica_and_ends_as_the_local_one(
    remote, engines, model_dirs, photos
):
    """Streamed from a replica, for the default model and a chosen one: texts that grow, each a
    prefix of the answer, which is token for token the local one; the replica is left with nothing."""
    task = Task("t", "", "<image>Output:")
    params = GenerationParams(max_new_tokens=96, min_new_tokens=96, repetition_penalty=2.0, no_repeat_ngram_size=1)
    for model, engine in ((None, engines["llama"]), (str(model_dirs["gptneox"]), engines["gptneox"])):
        ticket = remote.submit([photos["rocket"]], "<image>Output:", task, params, model=model)
        following = asyncio.create_task(_all(ticket.partial_texts()))
        answer = await ticket.answer()
        texts = await following
        local = engine.run(engine.prepare([photos["rocket"]], "<image>Output:", task, params))
        assert (answer.token_ids, answer.text) == (local.token_ids, local.text)
        assert len(texts) >= 2, texts
        assert all(len(earlier) < len(later) for earlier, later in itertools.pairwise(texts))
        assert all(answer.text.startswith(text) for text in texts)
    assert all(replica["ongoing"] == 0 for replica in await asyncio.to_thread(remote.replica_status))


async def test_a_background_request_is_answered_by_a_replica_as_a_members_is(remote, llama_engine, photos):
    task = Task("pets", "", "<image>Output:", (Example(photos["chelsea"], "<image>Output:a cat."),), key="test/pets/1")
    params = GenerationParams(max_new_tokens=8)
    local = llama_engine.run(llama_engine.prepare([photos["coffee"]], "<image>Output:", task, params))
    answer = await remote.submit([photos["coffee"]], "<image>Output:", task, params, background=True).answer()
    assert (answer.token_ids, answer.text) == (local.token_ids, local.text)


async def _all(texts: AsyncIterator[str]) -> list[str]:
    return [text async for text in texts]


async def test_refusals_come_back_as_the_same_errors(remote, llama_engine, photos):
    task = Task("t", "", "<image>Output:")
    with pytest.raises(BadPrompt, match="has 0 <image> markers"):
        remote.submit([photos["rocket"]], "Output:", task, GenerationParams())
    too_long = GenerationParams(max_new_tokens=256)
    prompt = "<image>" + "word " * 400
    with pytest.raises(BadPrompt) as local:
        llama_engine.prepare([photos["rocket"]], prompt, task, too_long)
    with pytest.raises(BadPrompt) as far:
        await remote.answer([photos["rocket"]], prompt, task, too_long)
    assert str(far.value) == str(local.value)


async def test_a_request_past_its_deadline_is_withdrawn(remote, photos):
    task = Task("t", "", "<image>Output:")
    late = remote.submit([photos["rocket"]], "<image>Output:", task, GenerationParams(), deadline=time.monotonic())
    with pytest.raises(RequestExpired, match="waited too long"):
        await late.answer()
    assert remote.waiting == 0


async def test_the_line_is_counted_and_its_answers_timed_for_queue(remote, photos):
    task = Task("t", "", "<image>Output:")
    before = remote.line_status().typical
    await remote.answer([photos["rocket"]], "<image>Output:", task, GenerationParams(max_new_tokens=2))
    line = remote.line_status()
    assert (line.waiting, line.running) == (0, 0)
    assert line.typical is not None and line.typical.answers == (before.answers if before else 0) + 1
    assert line.typical.answering > 0


async def test_each_task_is_computed_on_one_replica_only(remote, photos):
    """Task affinity: a task's examples are prefilled once in the cluster, not once per replica.

    With Serve's default router the same requests were prefilled 3 times (tried by hand).
    """
    tasks = [
        Task(name, "", "<image>Output:", (Example(photos[image], f"<image>Output:{name}."),), key=f"test/{name}/1")
        for name, image in (("cats", "chelsea"), ("cups", "coffee"))
    ]
    before = await asyncio.to_thread(remote.replica_status)
    for turn in range(8):
        await remote.answer([photos["rocket"]], "<image>Output:", tasks[turn % 2], GenerationParams(max_new_tokens=2))
    after = await asyncio.to_thread(remote.replica_status)
    assert len(after) == 2

    def total(stats, counter):
        return sum(replica["caches"]["prefix"][counter] for replica in stats)

    assert total(after, "misses") - total(before, "misses") == 2
    assert total(after, "hits") - total(before, "hits") == 6


async def test_a_replica_killed_mid_request_costs_a_retry_not_an_answer(remote, llama_engine, photos, caplog):
    import ray

    tasks = [
        Task(name, "", "<image>Output:", (Example(photos[image], f"<image>Output:{name}."),), key=f"test/{name}/2")
        for name, image in (("dogs", "astronaut"), ("mugs", "camera"))
    ]
    params = GenerationParams(max_new_tokens=120, min_new_tokens=120)
    requests = [(tasks[n % 2], photos[name]) for n, name in enumerate(("rocket", "coffee", "chelsea", "rocket"))]
    expected = [llama_engine.run(llama_engine.prepare([i], "<image>Output:", t, params)).token_ids for t, i in requests]
    running = [asyncio.create_task(remote.answer([i], "<image>Output:", t, params)) for t, i in requests]
    async with asyncio.timeout(60):
        while not (busy := [r for r in await asyncio.to_thread(remote.replica_status) if r["ongoing"]]):
            await asyncio.sleep(0.05)
    ray.kill(ray.get_actor(busy[0]["actor"], namespace="serve"), no_restart=False)
    answers = await asyncio.gather(*running)
    assert [answer.token_ids for answer in answers] == expected
    assert "a replica was lost during a request; retrying it once elsewhere" in caplog.text


def test_an_unreachable_cluster_is_one_clear_line_at_once(model_dirs):
    from core.errors import ModelLoadError
    from core.serving.ray.backend import RayInferenceService
    from tests.helpers.settings import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    settings = tiny_settings(model_dirs["llama"]).model_copy(update={"ray": RaySettings(address=address)})
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=f"^cannot reach the Ray cluster at {address}: "):
        RayInferenceService.connect(settings)
    assert time.monotonic() - started < 10
