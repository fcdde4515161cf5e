"""A Ray cluster lost while the bot runs: waiting users are told at once, and the bot rejoins it when it is back."""

from __future__ import annotations

import asyncio
import time

import pytest

from core.config import RaySettings
from core.errors import ClusterUnavailable
from core.generation import GenerationParams
from core.prompts import Task
from tests.helpers.ray import RayHead
from tests.helpers.settings import tiny_settings

pytestmark = pytest.mark.ray


async def test_a_lost_cluster_is_told_at_once_and_rejoined_when_it_is_back(
    tmp_path_factory, model_dirs, llama_engine, photos
):
    from core.serving.ray.backend import RayInferenceService

    head = RayHead(tmp_path_factory.mktemp("ray-outage"))  # its own head: the shared one stays up
    head.start()
    settings = tiny_settings(model_dirs["llama"])
    settings.service.backend = "ray"
    settings.ray = RaySettings(address=head.address, app_name="outage", num_cpus=0.5, probe_seconds=0.5)
    service = await asyncio.to_thread(RayInferenceService.connect, settings)
    task = Task("t", "", "<image>Output:")
    # Small pictures travel inside the calls: a call whose arguments Ray keeps in the object store of
    # the node that dies makes Ray end the calling process (here, the test run) as it tries to recover them.
    photos = {name: photo.resize((64, 64)) for name, photo in photos.items()}
    short = GenerationParams(max_new_tokens=8)
    expected = llama_engine.run(llama_engine.prepare([photos["rocket"]], "<image>Output:", task, short)).token_ids
    try:
        assert (await service.answer([photos["rocket"]], "<image>Output:", task, short)).token_ids == expected

        # Beam search runs one request at a time, so most of these are still waiting when the head goes.
        long = GenerationParams(max_new_tokens=256, min_new_tokens=256, num_beams=3)
        waiting = [
            asyncio.create_task(service.answer([photos[name]], "<image>Output:", task, long))
            for name in ("rocket", "coffee", "chelsea", "astronaut", "camera", "rocket")
        ]
        await asyncio.sleep(0.5)
        lost_at = time.monotonic()
        await asyncio.to_thread(head.kill)
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        told = [o for o in outcomes if isinstance(o, ClusterUnavailable)]
        assert len(told) >= 4 and time.monotonic() - lost_at < 15
        assert all(isinstance(o, ClusterUnavailable) or o.token_ids for o in outcomes)
        assert "It reconnects by itself as soon as they are back" in str(told[0])
        with pytest.raises(ClusterUnavailable):
            service.submit([photos["rocket"]], "<image>Output:", task, short)

        await asyncio.to_thread(head.start)
        async with asyncio.timeout(180):
            while not service.reachable:
                await asyncio.sleep(0.2)
        assert (await service.answer([photos["rocket"]], "<image>Output:", task, short)).token_ids == expected

        # Closing lets an answer in flight arrive before leaving the cluster.
        running = asyncio.create_task(service.answer([photos["rocket"]], "<image>Output:", task, long))
        async with asyncio.timeout(60):
            while not service.in_flight:
                await asyncio.sleep(0.05)
        await asyncio.to_thread(service.close)
        assert len((await running).token_ids) == 256
    finally:
        await asyncio.to_thread(service.close)
        await asyncio.to_thread(head.kill)
