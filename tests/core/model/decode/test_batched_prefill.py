"""Requests arriving together prefill in one forward: each row as if it had run alone.

Compared directly on logits, caches and the images' keys and values, since a tiny random model's
best token rarely moves even when a row reads the wrong keys.
"""

from __future__ import annotations

import pytest
import torch

from core.generation import GenerationParams
from core.model.decode import batched_prefill
from core.model.decode import decoder as decoding
from core.model.decode.batched_prefill import groups, prefill_together
from core.model.layers.layer_stack import language_model_parts
from core.prompts import Example, Task
from tests.make_tiny_model import FAMILIES

# (examples, prompt, query images): rows of different prefixes and lengths, text before the
# request's own image (which reads the last example's image), and a request with two images.
CASES = [
    ([], "<image>Output:", ["rocket"]),
    (["astronaut"], "<image>Output:", ["chelsea"]),
    (["astronaut", "coffee"], "A photo. <image>Question: What is it? Short answer:", ["camera"]),
    (["astronaut", "coffee"], "<image>Output:", ["coffee"]),
    (["astronaut"], "<image>and<image>Question: Which is larger? Answer:", ["rocket", "camera"]),
]


def jobs_for(engine, photos, cases=CASES):
    jobs = []
    for names, prompt, queries in cases:
        examples = tuple(Example(photos[name], f"<image>Output:A photo of {name}.") for name in names)
        task = Task(f"prefill-{len(names)}", "", "<image>Output:", examples, key=f"prefill/{len(names)}")
        params = GenerationParams(max_new_tokens=8)
        request = engine.prepare([photos[query] for query in queries], prompt, task, params)
        jobs.append(engine._jobs([request], [lambda: False])[0])
    return jobs


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_prefilled_together_equal_rows_prefilled_alone(engines, photos, family):
    engine = engines[family]
    decoder, media_token = engine.decoder, engine.loaded.model.media_token_id
    parts = language_model_parts(engine.loaded.model.lang_encoder)
    with torch.inference_mode():
        jobs = jobs_for(engine, photos)
        alone = [decoder.prefill(job, media_token) for job in jobs]
        together = prefill_together(decoder.conditioning, parts, jobs, media_token)
    for one, batched in zip(alone, together, strict=True):
        assert batched.job is one.job and torch.equal(batched.sequence, one.sequence)
        torch.testing.assert_close(batched.logits, one.logits, rtol=0, atol=1e-5)
        assert len(batched.key_values) == len(one.key_values)
        for (got_k, got_v), (want_k, want_v) in zip(batched.key_values, one.key_values, strict=True):
            torch.testing.assert_close(got_k, want_k, rtol=0, atol=1e-5)
            torch.testing.assert_close(got_v, want_v, rtol=0, atol=1e-5)
        for got, want in zip(batched.image_keys_values, one.image_keys_values, strict=True):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_arrivals_are_grouped_within_the_memory_bound(engines, photos, monkeypatch):
    engine = engines["mpt"]
    jobs = jobs_for(engine, photos)
    assert [len(group) for group in groups(engine.decoder.conditioning, jobs)] == [5]
    two = batched_prefill.transient_bytes(engine.decoder.conditioning, jobs[:2])
    monkeypatch.setattr(batched_prefill, "GROUP_BYTES", two)
    assert [len(group) for group in groups(engine.decoder.conditioning, jobs)] == [2, 1, 1, 1]
    imageless = jobs[1].__class__(**{**jobs[1].__dict__, "request_images": []})
    monkeypatch.setattr(batched_prefill, "GROUP_BYTES", 2**40)
    assert [len(group) for group in groups(engine.decoder.conditioning, [jobs[0], imageless, jobs[2]])] == [1, 1, 1]


def test_a_batch_of_arrivals_is_prefilled_together(engines, photos, monkeypatch):
    engine = engines["llama"]
    calls = []
    original = batched_prefill.prefill_together

    def counted(conditioning, parts, jobs, media_token_id):
        calls.append(len(jobs))
        return original(conditioning, parts, jobs, media_token_id)

    monkeypatch.setattr("core.model.decode.decoder.prefill_together", counted)
    finished = {}
    with torch.inference_mode():
        engine.decoder.decode_many(jobs_for(engine, photos), engine.loaded.model.media_token_id, finished.__setitem__)
    assert calls == [5] and sorted(finished) == [0, 1, 2, 3, 4]
    assert all(len(tokens) == 8 for tokens in finished.values())


def test_the_images_of_requests_arriving_together_are_encoded_in_one_vision_forward(engines, photos, monkeypatch):
    engine = engines["gptneox"]
    vision = engine.loaded.model.vision_encoder
    batches = []
    original = vision.forward

    def counted(pixels, *args, **kwargs):
        batches.append(pixels.shape[0])
        return original(pixels, *args, **kwargs)

    monkeypatch.setattr(vision, "forward", counted)
    task = Task("none", "", "<image>Output:")
    unseen = [photos["rocket"].rotate(angle) for angle in (90, 180, 270)]  # new pixels: not in the image cache
    requests = [engine.prepare([image], "<image>Output:", task, GenerationParams(max_new_tokens=3)) for image in unseen]
    answers = {}
    engine.run_many(requests, [lambda: False] * 3, answers.__setitem__)
    assert batches == [3] and sorted(answers) == [0, 1, 2]
    monkeypatch.setattr(decoding, "VISION_BATCH", 2)  # at most this many per forward
    batches.clear()
    unseen = [photos["coffee"].rotate(angle) for angle in (90, 180, 270)]
    requests = [engine.prepare([image], "<image>Output:", task, GenerationParams(max_new_tokens=3)) for image in unseen]
    engine.run_many(requests, [lambda: False] * 3, answers.__setitem__)
    assert batches == [2, 1]
