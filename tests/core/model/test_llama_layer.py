"""LLaMA's decoder layer with its projections side by side, against transformers' own layer.

The equivalence tests compare whole answers with upstream's; these compare one layer's output for
one token (a decode step's) to the bit, and check that the weights are held once and unchanged,
and that a layer whose joined products would differ is left to transformers.
"""

from __future__ import annotations

import gc
import weakref

import torch
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from core.model.layers import llama_layer
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
        table_embeddings, rotation = RotaryTable(rotary)(hidden, torch.tensor([[past]]))
        ours = fused(hidden, rotation, None, ours_cache)
    assert all(torch.equal(looked_up, own) for looked_up, own in zip(table_embeddings, embeddings, strict=True))
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_cache.layers[0].keys, theirs_cache.layers[0].keys)
    assert torch.equal(ours_cache.layers[0].values, theirs_cache.layers[0].values)


def test_the_rotary_table_looks_up_transformers_bits_at_every_position():
    """Positions looked up in one table (grown as rows get longer) give what transformers computes
    for each alone, for rows at different places."""
    _, rotary = _layer()
    table = RotaryTable(rotary)
    hidden = torch.randn(2, 1, 512)
    with torch.inference_mode():
        for first in (3, 40, 200, 900):
            positions = torch.tensor([[first], [first + 17]])
            (cos, sin), _ = table(hidden, positions)
            for row in range(2):
                own_cos, own_sin = rotary(hidden[row : row + 1], positions[row : row + 1])
                assert torch.equal(cos[row], own_cos[0]) and torch.equal(sin[row], own_sin[0])
    assert len(table.cos) >= 918


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
