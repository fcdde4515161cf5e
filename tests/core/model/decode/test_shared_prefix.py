"""The batch cache that stores each task's prefix once, against a batch cache of whole padded rows.

As for the static steps, tokens alone would be a weak guard, so each step's logits and the rows'
caches are compared directly, for every family, with two rows sharing a prefix.
"""

from __future__ import annotations

import pytest
import torch

from core.generation import GenerationParams
from core.model.decode.beam_search import padded_batch
from core.model.decode.shared_prefix import SharedPrefixSteps
from core.model.decode.state import RowCache
from core.prompts import Example, Task
from tests.helpers.decode import prefilled_rows
from tests.make_tiny_model import FAMILIES


@pytest.mark.parametrize("driven", [False, True], ids=["lm-forward", "layers-driven"])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefixes_give_the_padded_batch_logits_and_caches(engines, photos, family, driven):
    """Through the LM's own forward, and with its decoder layers driven directly (the families with parts)."""
    engine = engines[family]
    conditioning = engine.decoder.conditioning
    parts = engine.decoder._parts if driven else None
    with torch.inference_mode():
        rows = prefilled_rows(engine, photos)
        assert rows[2].job.prefix is rows[3].job.prefix  # one prefix state, shared
        own_lengths = [row.key_values[0][0].shape[2] for row in rows]
        images = [list(row.image_keys_values) for row in rows]
        padded_rows = prefilled_rows(engine, photos)
        padded, mask = padded_batch(padded_rows, conditioning.device)
        shared = SharedPrefixSteps(conditioning, rows, parts)
        for _ in range(5):
            mask = torch.nn.functional.pad(mask, (0, 1), value=1)
            tokens = torch.cat([row.sequence[:, -1:] for row in padded_rows])
            positions = torch.tensor([[row.sequence.shape[1] - 1] for row in padded_rows])
            with conditioning.reading_latest_images(padded_rows):
                expected = conditioning.step_tokens(tokens, positions, padded, mask)
            with shared.reading():
                got = shared.step(rows)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            for row, padded_row, token in zip(rows, padded_rows, expected.argmax(dim=-1), strict=True):
                for each in (row, padded_row):
                    each.sequence = torch.cat([each.sequence, token.view(1, 1)], dim=1)
        for n, (row, own) in enumerate(zip(rows, own_lengths, strict=True)):
            shared.hand_back(n, row)  # the image the row reads stays the same
            for got, want in zip(row.image_keys_values, images[n], strict=True):
                assert (got is None and want is None) or all(map(torch.equal, got, want))
            for layer, (keys, values) in zip(padded.layers, row.key_values, strict=True):
                assert keys.shape[2] == values.shape[2] == own + 5
                torch.testing.assert_close(keys, layer.keys[n : n + 1, :, -(own + 5) :], rtol=0, atol=1e-5)
                torch.testing.assert_close(values, layer.values[n : n + 1, :, -(own + 5) :], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_row_alone_steps_over_its_own_cache_exactly_as_the_lm_forward(engines, photos, family):
    """One row needs no gathering and no mask: logits equal to the bit to the LM's own forward over
    the row's whole cache, step after step, and the row leaves with its own tokens' keys and values."""
    engine = engines[family]
    conditioning, parts = engine.decoder.conditioning, engine.decoder._parts
    assert parts is not None  # the native families' layers can be driven directly
    with torch.inference_mode():
        (row,) = prefilled_rows(engine, photos)[2:3]  # two examples: a prefix, and the last one's image
        own = row.cached_length - row.prefix_length
        (padded_row,) = prefilled_rows(engine, photos)[2:3]
        whole, mask = padded_batch([padded_row], conditioning.device)
        alone = SharedPrefixSteps(conditioning, [row], parts)
        assert isinstance(alone.cache, RowCache)
        for _ in range(5):
            mask = torch.nn.functional.pad(mask, (0, 1), value=1)
            token = padded_row.sequence[:, -1:]
            position = torch.tensor([[padded_row.sequence.shape[1] - 1]])
            with conditioning.reading_latest_images([padded_row]):
                expected = conditioning.step_tokens(token, position, whole, mask)
            with alone.reading():
                got = alone.step([row])
            assert torch.equal(got, expected)
            for each in (row, padded_row):
                each.sequence = torch.cat([each.sequence, expected.argmax(dim=-1).view(1, 1)], dim=1)
        alone.hand_back(0, row)
        for layer, (keys, values) in zip(whole.layers, row.key_values, strict=True):
            assert torch.equal(keys, layer.keys[:, :, -(own + 5) :])
            assert torch.equal(values, layer.values[:, :, -(own + 5) :])


def test_a_prefix_is_stored_once_however_many_rows_share_it(engines, photos):
    engine = engines["llama"]
    with torch.inference_mode():
        rows = prefilled_rows(engine, photos)
        rows[0].job.kwargs["max_new_tokens"] = 500  # one long answer does not make room for 500 in every row
        distinct = rows[1].prefix_length + rows[2].prefix_length  # 0, 1, 2 and 2 examples again
        own = sum(row.cached_length - row.prefix_length + row.job.kwargs["max_new_tokens"] - 1 for row in rows)
        cache = SharedPrefixSteps(engine.decoder.conditioning, rows).cache
    # a zero slot for the padding, each distinct prefix once, each row's own tokens and room to grow
    assert cache.keys[0].shape[0] == 1 + distinct + own


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gathered_rows_are_the_padded_batch_exactly(engines, photos, family):
    """Data movement only, so equal to the bit: each layer's gathered keys and values, after a
    step's new ones are stored, are the padded batch's with the new ones appended."""
    engine = engines[family]
    with torch.inference_mode():
        padded, _ = padded_batch(prefilled_rows(engine, photos), engine.decoder.conditioning.device)
        cache = SharedPrefixSteps(engine.decoder.conditioning, prefilled_rows(engine, photos)).cache
        cache.begin_step()
        for index, layer in enumerate(padded.layers):
            new_keys, new_values = torch.randn_like(layer.keys[:, :, :1]), torch.randn_like(layer.values[:, :, :1])
            keys, values = cache.update(new_keys, new_values, index)
            assert torch.equal(keys, torch.cat([layer.keys, new_keys], dim=2))
            assert torch.equal(values, torch.cat([layer.values, new_values], dim=2))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefill_straight_into_the_row_buffer_equals_the_lm_forward(engines, photos, family):
    """A request's own tokens through the layers driven directly, into the buffer its row decodes in,
    give the LM forward's logits and keys and values to the bit; the row then decodes in that
    buffer, not a copy of it."""
    engine = engines[family]
    decoder = engine.decoder
    media_token = engine.loaded.model.media_token_id
    examples = [Example(photos[name], f"<image>Output:A photo of {name}.") for name in ("astronaut", "coffee")]
    task = Task("buffer", "", "<image>Output:", tuple(examples), key="buffer/2")
    request = engine.prepare([photos["rocket"]], "<image>Output:", task, GenerationParams(max_new_tokens=8))
    (job,) = engine._jobs([request], [lambda: False])
    parts = decoder._parts
    assert parts is not None
    with torch.inference_mode():
        row = decoder.prefill(job, media_token)
        decoder._parts = None  # the LM's own forward, over a cache of transformers'
        try:
            expected = decoder.prefill(job, media_token)
        finally:
            decoder._parts = parts
    assert row.buffer is not None and expected.buffer is None
    assert torch.equal(row.logits, expected.logits)
    for ours, theirs in zip(row.key_values, expected.key_values, strict=True):
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    buffer = row.buffer
    assert SharedPrefixSteps(decoder.conditioning, [row], parts).cache is buffer
