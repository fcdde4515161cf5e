"""LLaMA's decoder layer with its projections side by side, against transformers' own layer.

The equivalence tests compare whole answers with upstream's; these compare one layer's output for
one token (a decode step's) to the bit, and check that the weights are held once and unchanged,
and that a layer whose joined products would differ is left to transformers.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from core.model.layers import layer_stack, llama_layer
from core.model.layers.layer_stack import language_model_parts
from core.model.layers.llama_layer import RotaryTable, fused_llama_layer


def _layer(**config: object) -> tuple[LlamaDecoderLayer, LlamaRotaryEmbedding]:
    """A layer of the benchmark model's shapes, whose joined products agree on this project's CPUs."""
    torch.manual_seed(0)
    settings = LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8, **config)
    settings._attn_implementation = "sdpa"
    return LlamaDecoderLayer(settings, layer_idx=0).eval(), LlamaRotaryEmbedding(settings)


def test_one_token_through_the_fused_layer_is_transformers_to_the_bit():
    layer, rotary = _layer()
    weights = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    fused = fused_llama_layer(layer)
    for name, tensor in layer.state_dict().items():  # the same weights, views of the joined matrices or not
        assert torch.equal(tensor, weights[name])
    if fused is None:  # this machine's BLAS sums the joined products otherwise: transformers' layer runs
        query = layer.self_attn.q_proj.weight
        assert query.untyped_storage().nbytes() == query.numel() * query.element_size()  # its own, not a view
        return
    attention = layer.self_attn
    assert (
        attention.q_proj.weight.untyped_storage().data_ptr()
        == fused.query_key_value.matrix.untyped_storage().data_ptr()
    )
    assert layer.mlp.up_proj.weight.untyped_storage().data_ptr() == fused.gate_up.matrix.untyped_storage().data_ptr()
    past = 7
    hidden = torch.randn(1, 1, 512)
    embeddings = rotary(hidden, torch.tensor([[past]]))
    earlier = [(torch.randn(1, 8, past, 64), torch.randn(1, 8, past, 64))]
    with torch.inference_mode():
        theirs_cache, ours_cache = DynamicCache(ddp_cache_data=earlier), DynamicCache(ddp_cache_data=earlier)
        theirs = layer(hidden, attention_mask=None, position_embeddings=embeddings, past_key_values=theirs_cache)
        ours = fused(hidden, RotaryTable(rotary)(hidden, torch.tensor([[past]])), None, ours_cache)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_cache.layers[0].keys, theirs_cache.layers[0].keys)
    assert torch.equal(ours_cache.layers[0].values, theirs_cache.layers[0].values)


@pytest.mark.parametrize("masked", [True, False], ids=["a prefill's mask", "causal without a mask"])
def test_several_tokens_through_the_fused_layer_are_transformers_to_the_bit(masked):
    """A prefill's tokens: torch's attention called directly as transformers calls it, with the
    mask cut to the keys, or causal where there is none."""
    layer, rotary = _layer()
    fused = fused_llama_layer(layer)
    if fused is None:
        return  # transformers' layer runs it all
    past, queries = 0 if not masked else 5, 3
    hidden = torch.randn(1, queries, 512)
    positions = torch.arange(past, past + queries)[None]
    mask = None
    if masked:  # the float mask of ``LanguageModelParts.additive_mask``, wider than the keys as transformers' may be
        columns = torch.arange(past + queries + 2)
        mask = torch.zeros(1, 1, queries, len(columns)).masked_fill(
            columns > positions[..., None][:, None], torch.finfo(torch.float32).min
        )
    earlier = [(torch.randn(1, 8, past, 64), torch.randn(1, 8, past, 64))] if past else None
    with torch.inference_mode():
        theirs_cache, ours_cache = DynamicCache(ddp_cache_data=earlier), DynamicCache(ddp_cache_data=earlier)
        theirs = layer(
            hidden, attention_mask=mask, position_embeddings=rotary(hidden, positions), past_key_values=theirs_cache
        )
        ours = fused(hidden, RotaryTable(rotary)(hidden, positions), mask, ours_cache)
    assert torch.equal(ours, theirs)


def _rotation(rotary: LlamaRotaryEmbedding, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' cosines and its sines with the first half negated, computed for these positions alone."""
    cos, sin = rotary(hidden, positions)
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def test_the_rotary_table_looks_up_transformers_bits_at_every_position():
    """Positions looked up in one table (grown as rows get longer) give what transformers computes
    for each alone: rows at different places, several queries, and one position (sliced out)."""
    _, rotary = _layer()
    table = RotaryTable(rotary)
    hidden = torch.randn(2, 1, 512)
    with torch.inference_mode():
        for first in (3, 40, 200, 900):
            positions = torch.tensor([[first], [first + 17]])
            cos, signed_sin = table(hidden, positions)  # (rows, 1, queries, dim)
            for row in range(2):
                own_cos, own_signed_sin = _rotation(rotary, hidden[row : row + 1], positions[row : row + 1])
                assert torch.equal(cos[row], own_cos) and torch.equal(signed_sin[row], own_signed_sin)
            several = torch.arange(first, first + 5)[None]
            cos, signed_sin = table(hidden[:1], several)
            own_cos, own_signed_sin = _rotation(rotary, hidden[:1], several)
            assert torch.equal(cos[:, 0], own_cos) and torch.equal(signed_sin[:, 0], own_signed_sin)
        cos, signed_sin = table(hidden[:1], torch.tensor([[1500]]))  # one position, past the table's end
        own_cos, own_signed_sin = _rotation(rotary, hidden[:1], torch.tensor([[1500]]))
        assert cos.shape == (1, 1, 1, 64)
        assert torch.equal(cos[0], own_cos) and torch.equal(signed_sin[0], own_signed_sin)
    assert len(table.cos) >= 1501


def test_a_row_count_whose_joined_product_differs_takes_the_products_apart(monkeypatch):
    """The probe is per number of rows too: where it finds other bits, the separate products run."""
    layer, _ = _layer()
    fused = fused_llama_layer(layer)
    if fused is None:
        return  # transformers' layer runs it all
    monkeypatch.setattr(llama_layer, "_agree", lambda joined, weights, rows=1: rows == 1)
    hidden = torch.randn(1, 3, 512)
    attention = layer.self_attn
    with torch.inference_mode():
        got = fused.query_key_value(hidden)
        apart = torch.cat([attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden)], dim=-1)
    assert torch.equal(got, apart)
    assert fused.query_key_value.agree == {1: True, 3: False}


def test_a_layer_whose_joined_products_differ_is_left_to_transformers(monkeypatch):
    monkeypatch.setattr(llama_layer, "_agree", lambda joined, weights: False)
    layer, _ = _layer()
    before = layer.self_attn.q_proj.weight
    assert fused_llama_layer(layer) is None
    assert layer.self_attn.q_proj.weight is before


def test_a_layer_with_biased_projections_is_left_to_transformers():
    layer, _ = _layer(attention_bias=True)
    before = layer.self_attn.q_proj.weight
    assert fused_llama_layer(layer) is None
    assert layer.self_attn.q_proj.weight is before


def test_the_engines_llama_layers_are_joined_once(llama_engine):
    parts = llama_engine.decoder._parts
    assert parts is not None and len(parts.fused_layers) == len(llama_engine.decoder.conditioning.layers)
    again = language_model_parts(llama_engine.loaded.model.lang_encoder)
    assert again is not None
    assert all(a is b for a, b in zip(again.fused_layers, parts.fused_layers, strict=True))  # not joined twice


def test_a_fused_layer_goes_with_its_model():
    """A model let go (another one chosen) takes its joined matrices with it."""
    layer, _ = _layer()
    fused_llama_layer(layer)
    gone = weakref.ref(layer)
    del layer
    gc.collect()
    assert gone() is None


def test_one_layer_that_cannot_be_fused_leaves_them_all_to_transformers(llama_engine, monkeypatch):
    """Fused layers are all or none: a forward through them takes the rotation and nothing else."""
    lm = llama_engine.loaded.model.lang_encoder
    third = lm.model.layers[2].decoder_layer
    real = layer_stack.fused_llama_layer
    monkeypatch.setattr(layer_stack, "fused_llama_layer", lambda layer: None if layer is third else real(layer))
    parts = language_model_parts(lm)
    assert parts is not None and parts.fused_layers == () and parts.rotary_table is None
