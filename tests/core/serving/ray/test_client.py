"""The bot's side of the Ray backend, against a stand-in handle: what it does before a replica sees a request."""

from __future__ import annotations

import asyncio
import threading

import pytest

import core.serving.ray.wire
from core.config import RaySettings, ServiceSettings
from core.errors import ClusterUnavailable, RequestCancelled, ServiceBusy
from core.generation import GenerationParams
from core.model.engine import Answer
from core.prompts import Example, Task
from core.serving.ray.backend import RayInferenceService
from tests.helpers.settings import tiny_settings


class StandInHandle:
    """``handle.answer.remote(request)``: each request is kept, and answered only when told."""

    def __init__(self) -> None:
        self.answer = self
        self.sent: list[core.serving.ray.wire.WireRequest] = []
        self.responses: list[asyncio.Future[Answer]] = []

    def remote(self, request: core.serving.ray.wire.WireRequest) -> asyncio.Future[Answer]:
        self.sent.append(request)
        self.responses.append(asyncio.get_running_loop().create_future())
        return self.responses[-1]


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
    """Serve queues without bound; the bot refuses beyond its own line and the replicas' batches."""
    task = Task("t", "", "<image>Output:")
    waiting = [
        asyncio.create_task(service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams()).answer())
        for _ in range(2)
    ]
    while service.in_flight < 2:
        await asyncio.sleep(0.01)
    with pytest.raises(ServiceBusy, match=r"^The model is busy \(2 requests are already in line\)"):
        service.submit([photos["rocket"]], "<image>Output:", task, GenerationParams())
    for answering in waiting:
        answering.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


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
