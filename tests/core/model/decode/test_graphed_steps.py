"""Decode steps over fixed-size buffers (what the GPU's CUDA graphs replay) against the eager steps.

Tokens alone are a weak guard here: a tiny random model's best token rarely changes even when a
step reads the wrong keys. So the steps' logits and caches are compared directly, for rows of
different lengths, tasks and images sharing each step.
"""

from __future__ import annotations

import pytest
import torch

from core.model.decode.graphed_steps import CAPACITY_STEP, StaticStep, StaticSteps, supports_static_steps
from core.model.decode.shared_prefix import SharedPrefixSteps
from core.model.loading import load_model
from tests.helpers.decode import prefilled_rows
from tests.helpers.settings import tiny_settings
from tests.make_tiny_model import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_static_steps_give_the_eager_steps_logits_and_caches(engines, photos, family):
    """MPT places tokens by ALiBi from the slot; LLaMA and GPT-NeoX by each row's rotary position."""
    engine = engines[family]
    static_steps = StaticSteps(engine.decoder.conditioning, max_rows=4, memory_bytes=2**30, graphed=False)
    with torch.inference_mode():
        rows = prefilled_rows(engine, photos)
        caches = [(list(row.key_values), list(row.image_keys_values)) for row in rows]
        eager = SharedPrefixSteps(engine.decoder.conditioning, rows)  # each stepper takes the rows' caches
        assert all(row.key_values == [] == row.image_keys_values for row in rows)
        for row, (cache, images) in zip(rows, caches, strict=True):
            row.key_values, row.image_keys_values = cache, images
        static = static_steps.for_rows(rows)
        assert static is not None and static.capacity == CAPACITY_STEP
        for _ in range(6):
            with eager.reading():
                expected = eager.step(rows)
            got = static.step(rows)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            for row, token in zip(rows, expected.argmax(dim=-1), strict=True):
                row.sequence = torch.cat([row.sequence, token.view(1, 1)], dim=1)
                row.generated.append(int(token))
        for n in range(len(rows)):
            for (want_k, want_v), (got_k, got_v) in zip(
                eager.cache.own_key_values(n), static.own_key_values(n), strict=True
            ):
                torch.testing.assert_close(got_k, want_k, rtol=0, atol=1e-5)
                torch.testing.assert_close(got_v, want_v, rtol=0, atol=1e-5)


def test_static_steps_are_kept_per_batch_size_and_capacity(engines, photos):
    engine = engines["mpt"]
    static_steps = StaticSteps(engine.decoder.conditioning, max_rows=2, memory_bytes=2**30, graphed=False)
    with torch.inference_mode():
        first = static_steps.for_rows(prefilled_rows(engine, photos)[:2])
        again = static_steps.for_rows(prefilled_rows(engine, photos)[2:])
        assert first is again and static_steps.used == 2
        assert static_steps.for_rows(prefilled_rows(engine, photos)) is None  # above max_rows: the eager loop takes it
        rows = prefilled_rows(engine, photos)
        rows[0].job.kwargs["max_new_tokens"] = CAPACITY_STEP  # needs a larger buffer
        assert static_steps.for_rows(rows[:1]).capacity == 2 * CAPACITY_STEP
        assert first.nbytes == 2 * CAPACITY_STEP * static_steps.bytes_per_token
        assert static_steps.steps.bytes == 2 * first.nbytes  # (2 rows, 128 tokens) and (1 row, 256)
        small = StaticSteps(engine.decoder.conditioning, max_rows=2, memory_bytes=first.nbytes // 2, graphed=False)
        assert small.for_rows(prefilled_rows(engine, photos)[:2]) is None  # its buffers would not fit
        assert small.for_rows(prefilled_rows(engine, photos)[:1]) is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_every_native_family_is_offered_static_steps(engines, family):
    assert supports_static_steps(engines[family].loaded.model)


def test_int8_models_step_eagerly(model_dirs):
    """LLM.int8() picks outlier columns with a host round trip, which a CUDA graph cannot hold."""
    loaded = load_model(tiny_settings(model_dirs["mpt"], precision="int8").model)
    assert not supports_static_steps(loaded.model)


def test_rotary_embeddings_that_resize_with_the_length_step_eagerly(engines, monkeypatch):
    """Dynamic RoPE compares the length with its cache on the host, which a CUDA graph cannot hold."""
    rotary = engines["llama"].loaded.model.lang_encoder.model.rotary_emb
    monkeypatch.setattr(rotary, "rope_type", "dynamic")
    assert not supports_static_steps(engines["llama"].loaded.model)
    with pytest.raises(ValueError, match="fixed buffers"):
        StaticSteps(engines["llama"].decoder.conditioning, max_rows=4, memory_bytes=2**30, graphed=False)


def test_a_step_that_cannot_be_captured_leaves_the_rows_to_the_eager_loop(engines, photos, caplog, monkeypatch):
    def refuse(step: StaticStep) -> None:  # what CUDA says of a host round trip inside a capture
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(StaticStep, "capture", refuse)
    engine = engines["mpt"]
    static_steps = StaticSteps(engine.decoder.conditioning, max_rows=4, memory_bytes=2**30, graphed=True)
    with torch.inference_mode():
        rows = prefilled_rows(engine, photos)
        assert static_steps.for_rows(rows) is None
        assert all(row.key_values for row in rows)  # their caches are untouched
        assert static_steps.failed and static_steps.for_rows(rows) is None  # and it does not try again
    assert "CUDA graphs are off" in caplog.text


def test_a_capture_out_of_memory_leaves_graphs_on_for_later_batches(engines, photos, caplog, monkeypatch):
    """Running out of memory is a moment's state, unlike an operation a graph cannot hold."""
    captures = []

    def short_of_memory_once(step: StaticStep) -> None:
        captures.append(step)
        if len(captures) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StaticStep, "capture", short_of_memory_once)
    engine = engines["mpt"]
    static_steps = StaticSteps(engine.decoder.conditioning, max_rows=4, memory_bytes=2**30, graphed=True)
    with torch.inference_mode():
        rows = prefilled_rows(engine, photos)
        assert static_steps.for_rows(rows) is None and all(row.key_values for row in rows)
        assert not static_steps.failed and static_steps.steps.stats()["entries"] == 0
        assert static_steps.for_rows(rows) is not None and len(captures) == 2
    assert "no memory to capture" in caplog.text and "CUDA graphs are off" not in caplog.text


def test_the_decoder_uses_static_steps_only_on_a_gpu(engines):
    assert engines["mpt"].decoder.static_steps is None  # these run on the CPU: the exact eager loop
