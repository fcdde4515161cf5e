"""The bot's side of the Ray backend, against a stand-in handle: what it does before a replica sees a request."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

import core.serving.ray.wire
from core.config import RaySettings, ServiceSettings
from core.errors import BadParameter, BadPrompt, ClusterUnavailable, RequestCancelled, RequestExpired, ServiceBusy
from core.generation import GenerationParams
from core.model.engine import Answer
from core.prompts import Example, Task
from core.serving.line_times import RecentTimes
from core.serving.ray.backend import RayInferenceService
from tests.helpers.settings import tiny_settings


class RequestCancelledError(Exception):
    """What Serve raises to the caller of a request it cancelled (matched by name, as Serve's is)."""


class StandInStream:
    """``handle.options(stream=True).answer_stream.remote(request)``: items as the test puts them."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[str | Answer | BaseException] = asyncio.Queue()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.items.put_nowait(RequestCancelledError())

    async def __aiter__(self):
        while True:
            item = await self.items.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Answer):
                return


class StandInHandle:
    """``handle.answer.remote(request)``: each request is kept, and answered only when told; with
    ``options(stream=True)``, each streamed request gets a ``StandInStream``."""

    def __init__(self) -> None:
        self.answer = self
        self.sent: list[core.serving.ray.wire.WireRequest] = []
        self.responses: list[asyncio.Future[Answer]] = []
        self.streams: list[StandInStream] = []

    def remote(self, request: core.serving.ray.wire.WireRequest) -> asyncio.Future[Answer]:
        self.sent.append(request)
        self.responses.append(asyncio.get_running_loop().create_future())
        return self.responses[-1]

    def options(self, stream: bool = False) -> SimpleNamespace:
        assert stream
        return SimpleNamespace(answer_stream=SimpleNamespace(remote=self._streamed))

    def _streamed(self, request: core.serving.ray.wire.WireRequest) -> StandInStream:
        self.sent.append(request)
        self.streams.append(StandInStream())
        return self.streams[-1]


@pytest.fixture
def service(model_dirs, llama_engine):
    settings = tiny_settings(model_dirs["llama"])
    settings.service = ServiceSettings(backend="ray", max_queue=1)
    settings.ray = RaySettings(max_ongoing_requests=1, replicas=1)
    service = RayInferenceService(settings, {None: llama_engine.rules}, StandInHandle())
    yield service
    service.close()


async def test_requests_are_encoded_off_the_event_loop_and_a_task_once(service, photos, monkeypatch):
    """PNG-encoding a task's examples took a second on the event loop, which every server's
    interactions share; and it was done again for each request."""
    encoded_on = []
    encode = core.serving.ray.wire.WireImage.of

    def recorded(image):
        encoded_on.append(threading.get_ident())
        return encode(image)

    monkeypatch.setattr(core.serving.ray.wire.WireImage, "of", recorded)
    task = Task("pets", "", "<image>Pet:", (Example(photos["chelsea"], "<image>Pet:a cat"),), key="guild/1/pets/x/1")
    handle = service._handle
    for sent, query in enumerate(("rocket", "coffee"), 1):
        ticket = service.submit([photos[query]], "<image>Pet:", task, GenerationParams())
        answering = asyncio.create_task(ticket.answer())
        while len(handle.responses) < sent:
            await asyncio.sleep(0.01)
        handle.responses[-1].set_result(Answer("a cat", (1,), "", 3, True, 0.1))
        assert (await answering).text == "a cat"
    assert len(encoded_on) == 3  # the example once, each query once
    assert threading.get_ident() not in encoded_on
    assert handle.sent[0].task is handle.sent[1].task


async def test_the_line_kept_for_the_cluster_is_bounded(service, photos):
    """Serve queues without bound: the bot sends what the replicas take at once and keeps a line of
    its own, with places shown, refusing beyond it."""
    task = Task("t", "", "<image>Output:")
    tickets = [service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams()) for _ in range(2)]
    waiting = [asyncio.create_task(ticket.answer()) for ticket in tickets]
    while len(service._handle.sent) < 1:
        await asyncio.sleep(0.01)
    assert len(service.line) == 1
    assert [ticket.position for ticket in tickets] == [None, 1]
    with pytest.raises(ServiceBusy, match=r"^The model is busy \(1 request is already waiting\)"):
        service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams())
    for answering in waiting:
        answering.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert service.in_flight == 0 and len(service.line) == 0


async def test_the_replicas_take_requests_in_a_line_fair_between_servers(model_dirs, llama_engine, photos):
    """First come, first served at Serve let one server's flood hold every replica."""
    settings = tiny_settings(model_dirs["llama"])
    settings.service = ServiceSettings(backend="ray", max_queue=8)
    settings.ray = RaySettings(max_ongoing_requests=1, replicas=1)
    service = RayInferenceService(settings, {None: llama_engine.rules}, StandInHandle())
    task = Task("t", "", "<image>Output:")
    try:
        tickets = [
            service.submit([photos["rocket"]], f"<image>Server {party}:", task, GenerationParams(), party=party)
            for party in (1, 1, 1, 2)
        ]
        answering = [asyncio.create_task(ticket.answer()) for ticket in tickets]
        assert [ticket.position for ticket in tickets] == [None, 1, 3, 2]
        handle = service._handle
        for answered in range(1, 5):
            while len(handle.responses) < answered:
                await asyncio.sleep(0.01)
            handle.responses[-1].set_result(Answer("a cat", (1,), "", 3, True, 0.1))
        await asyncio.gather(*answering)
        assert [request.prompt for request in handle.sent] == [f"<image>Server {n}:" for n in (1, 1, 2, 1)]
    finally:
        service.close()


async def test_a_request_waiting_in_the_bots_line_can_be_cancelled_or_expire(service, photos):
    task = Task("t", "", "<image>Output:")
    service.line.capacity = 4
    first = service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams(), party=1)
    running = asyncio.create_task(first.answer())
    cancelled = service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams(), party=2)
    waiting = asyncio.create_task(cancelled.answer())
    late = service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams(), time.monotonic() + 0.2)
    with pytest.raises(RequestExpired):
        await late.answer()
    assert cancelled.position == 1
    cancelled.cancel()
    with pytest.raises(RequestCancelled):
        await waiting
    assert len(service.line) == 0 and len(service._handle.sent) == 1
    service._handle.responses[0].set_result(Answer("a cat", (1,), "", 3, True, 0.1))
    assert (await running).text == "a cat"
    assert service.in_flight == 0 and service._sent == 0


async def test_a_cluster_lost_or_a_cancel_while_encoding_ends_the_request_at_once(service, photos, monkeypatch):
    """Sent anyway, it waited for its deadline; a cancel was reported as the server failing."""
    task = Task("t", "", "<image>Output:")
    encode = service._wire.request

    def lost_meanwhile(*args):
        service.reachable = False
        return encode(*args)

    monkeypatch.setattr(service._wire, "request", lost_meanwhile)
    with pytest.raises(ClusterUnavailable):
        await service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams(), deadline=None).answer()
    service.reachable = True
    tickets = []

    def cancelled_meanwhile(*args):
        tickets[0].cancel()
        return encode(*args)

    monkeypatch.setattr(service._wire, "request", cancelled_meanwhile)
    tickets.append(service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams()))
    with pytest.raises(RequestCancelled):
        await tickets[0].answer()
    assert service._handle.sent == [] and service.in_flight == 0


async def _sent_stream(handle: StandInHandle, count: int = 1) -> StandInStream:
    """The ``count``-th request streamed, once it is sent."""
    while len(handle.streams) < count:
        await asyncio.sleep(0.01)
    return handle.streams[count - 1]


async def _read(texts, count: int, into: list[str]) -> None:
    while len(into) < count:
        into.append(await anext(texts))


async def test_a_followed_request_is_streamed_from_the_replica_and_its_texts_shown_as_they_come(service, photos):
    task = Task("t", "", "<image>Output:")
    ticket = service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams())
    texts, shown = ticket.partial_texts(), []
    reading = asyncio.create_task(_read(texts, 1, shown))
    answering = asyncio.create_task(ticket.answer())
    stream = await _sent_stream(service._handle)
    assert service._handle.responses == []  # streamed, not sent whole
    for count, text in enumerate(("a", "a black"), 1):
        stream.items.put_nowait(text)
        await asyncio.wait_for(reading, 5)
        assert shown[-1] == text
        reading = asyncio.create_task(_read(texts, count + 1, shown))
    stream.items.put_nowait(Answer("a black cat", (1, 2, 3), "", 3, True, 0.1))
    assert (await answering).text == "a black cat"
    reading.cancel()
    assert [text async for text in texts] == [] and shown == ["a", "a black"]
    assert service.in_flight == 0


async def test_an_unfollowed_request_or_a_beam_search_is_sent_whole(service, photos):
    task = Task("t", "", "<image>Output:")
    beams = service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams(num_beams=2))
    assert [text async for text in beams.partial_texts()] == []  # its best beam can change until it ends
    answering = asyncio.create_task(beams.answer())
    while not service._handle.responses:
        await asyncio.sleep(0.01)
    service._handle.responses[0].set_result(Answer("a cat", (1,), "", 3, True, 0.1))
    assert (await answering).text == "a cat" and service._handle.streams == []


async def test_a_streamed_request_cancelled_or_failed_ends_its_texts_as_its_answer_ends(service, photos):
    task = Task("t", "", "<image>Output:")
    ticket = service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams())
    texts = ticket.partial_texts()
    first = asyncio.create_task(anext(texts))
    answering = asyncio.create_task(ticket.answer())
    stream = await _sent_stream(service._handle)
    stream.items.put_nowait("a")
    assert await first == "a"
    ticket.cancel()
    assert stream.cancelled
    with pytest.raises(RequestCancelled):
        await answering
    assert [text async for text in texts] == []  # what was written stays written; no error

    service.line.capacity = 2
    failing = service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams())
    texts = failing.partial_texts()
    first = asyncio.create_task(anext(texts))
    answering = asyncio.create_task(failing.answer())
    stream = await _sent_stream(service._handle, 2)
    stream.items.put_nowait(BadPrompt("That prompt is too long for this model."))
    with pytest.raises(BadPrompt):
        await answering
    with pytest.raises(BadPrompt):
        await first


async def test_a_background_request_goes_to_the_cluster_only_while_no_members_request_waits(
    model_dirs, llama_engine, photos
):
    """A task's evaluation, one request at a time, in a place of its own beside members': it never
    waits for a member's place nor takes one, and it waits while members wait."""
    settings = tiny_settings(model_dirs["llama"])
    settings.service = ServiceSettings(backend="ray", max_queue=4)
    settings.ray = RaySettings(max_ongoing_requests=1, replicas=1)
    service = RayInferenceService(settings, {None: llama_engine.rules}, StandInHandle())
    task = Task("t", "", "<image>Output:")
    handle, params = service._handle, GenerationParams()
    try:
        with pytest.raises(BadParameter, match="greedy"):
            service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams(num_beams=2), background=True)
        member = service.submit([photos["rocket"]], "<image>Member 1:", task, params, party=1)
        waiting = service.submit([photos["rocket"]], "<image>Member 2:", task, params, party=2)
        jobs = [
            service.submit([photos["rocket"]], f"<image>Job {n}:", task, params, party=3, background=True)
            for n in (1, 2)
        ]
        answering = [asyncio.create_task(ticket.answer()) for ticket in (member, waiting, *jobs)]
        while len(handle.sent) < 1:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert [request.prompt for request in handle.sent] == ["<image>Member 1:"]  # a member waits: no job goes
        assert [job.position for job in jobs] == [1, 2] and service.line_status().waiting == 1
        handle.responses[0].set_result(Answer("a cat", (1,), "", 3, True, 0.1))
        while len(handle.sent) < 3:
            await asyncio.sleep(0.01)
        # The member's place went to the next member, and the first job went beside it, with its flag.
        assert [(request.prompt, request.background) for request in handle.sent[1:]] == [
            ("<image>Member 2:", False),
            ("<image>Job 1:", True),
        ]
        await asyncio.sleep(0.1)
        assert len(handle.sent) == 3  # one job at a time
        handle.responses[2].set_result(Answer("a dog", (2,), "", 3, True, 0.1))
        while len(handle.sent) < 4:
            await asyncio.sleep(0.01)
        assert handle.sent[3].prompt == "<image>Job 2:"
        for response in handle.responses[1:]:
            if not response.done():
                response.set_result(Answer("a cat", (1,), "", 3, True, 0.1))
        assert [answer.text for answer in await asyncio.gather(*answering)] == ["a cat", "a cat", "a dog", "a cat"]
        assert service.in_flight == 0 and service._sent == 0 and not service._background_sent
    finally:
        service.close()


def test_a_place_in_the_bots_line_is_given_a_wait_from_recent_answers(service):
    """It was always 0 on Ray: members in line were never told how long they would wait."""
    now = [100.0]
    service.times = RecentTimes(clock=lambda: now[0])
    assert service.estimated_wait(3) == 0.0  # nothing answered lately: no figure to give
    for answering in (2.0, 4.0, 3.0):
        service.times.record(now[0] - 1.0 - answering, now[0] - answering)
    assert service._room == 1 and service.estimated_wait(1) == 3.0 and service.estimated_wait(3) == 9.0
    service._room = 2  # two places at the replicas: a second request ahead waits for the same answer
    assert service.estimated_wait(2) == 3.0 and service.estimated_wait(3) == 6.0


def test_each_model_offered_is_read_with_its_own_rules(model_dirs, engines, photos):
    """Another model's tokenizer counts a text otherwise (an evaluation's room for each answer) and
    reserves other tokens; a model not offered is refused by name."""
    settings = tiny_settings(model_dirs["llama"])
    settings.service = ServiceSettings(backend="ray")
    rules = {None: engines["llama"].rules, "mpt": engines["mpt"].rules}
    service = RayInferenceService(settings, rules, StandInHandle())
    try:
        assert service.rules_for(None) is service.rules is rules[None]
        assert service.rules_for("mpt") is rules["mpt"]
        with pytest.raises(BadParameter, match=r"^This bot does not offer that model"):
            service.rules_for("gpt")
        with pytest.raises(BadParameter, match=r"^This bot does not offer that model"):
            service.submit(
                [photos["rocket"]], "<image>Output:", Task("t", "", "<image>Output:"), GenerationParams(), model="gpt"
            )
    finally:
        service.close()
