"""Requests on the wire: the same pixels arrive, damage is caught, tasks are decoded once per key."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from core.generation import GenerationParams
from core.prompts import Example, Task
from core.serving.ray.wire import WireDecoder, WireEncoder


def test_images_arrive_pixel_for_pixel_and_tasks_are_kept_by_key(photos):
    task = Task("pets", "d", "<image>Pet:", (Example(photos["chelsea"], "<image>Pet:a cat"),), key="guild/1/pets/x/2")
    encoder = WireEncoder()
    wire = encoder.request([photos["rocket"]], "<image>Pet:", task, GenerationParams(max_new_tokens=3))
    assert encoder.request([photos["coffee"]], "<image>Pet:", task, GenerationParams()).task is wire.task  # once
    decoder = WireDecoder()
    images, prompt, arrived, params = decoder.request(wire)
    assert np.array_equal(np.asarray(images[0]), np.asarray(photos["rocket"]))
    assert np.array_equal(np.asarray(arrived.examples[0].image), np.asarray(photos["chelsea"]))
    assert (prompt, arrived.key, arrived.examples[0].text, params.max_new_tokens) == (
        "<image>Pet:",
        task.key,
        "<image>Pet:a cat",
        3,
    )
    assert decoder.request(wire)[2] is arrived  # the same version of the task is not decoded again


def test_a_damaged_image_is_refused(photos):
    task = Task("t", "", "<image>Output:")
    wire = WireEncoder().request([photos["rocket"]], "<image>Output:", task, GenerationParams())
    damaged = dataclasses.replace(wire.images[0], png=wire.images[0].png[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="does not match its hash"):
        WireDecoder().image(damaged)


def test_a_replica_decodes_requests_on_threads_without_its_caches_entered_at_once(photos, monkeypatch):
    """The replica decodes off its event loop, so several threads share the decoder's caches."""
    inside, overlaps = [0], []
    lock = threading.Lock()

    def exclusive(method):
        def wrapped(*args):
            with lock:
                inside[0] += 1
                overlaps.append(inside[0] > 1)
            time.sleep(0.002)
            with lock:
                inside[0] -= 1
            return method(*args)

        return wrapped

    decoder = WireDecoder()
    for cache in (decoder._images, decoder._tasks):
        monkeypatch.setattr(cache, "get", exclusive(cache.get))
        monkeypatch.setattr(cache, "put", exclusive(cache.put))
    task = Task("pets", "d", "<image>Pet:", (Example(photos["chelsea"], "<image>Pet:a cat"),), key="guild/1/pets/x/2")
    wire = WireEncoder().request([photos["rocket"]], "<image>Pet:", task, GenerationParams())
    with ThreadPoolExecutor(max_workers=8) as pool:
        decoded = list(pool.map(lambda _: decoder.request(wire), range(16)))
    assert overlaps and not any(overlaps)
    assert all(np.array_equal(np.asarray(d[0][0]), np.asarray(photos["rocket"])) for d in decoded)
