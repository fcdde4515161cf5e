"""int8 and nf4 (bitsandbytes, CPU backend) through the whole Flamingo model, not only the bare LM."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from core.config import ModelSettings
from core.generation import GenerationParams
from core.model.engine import FlamingoEngine, holds_conditioning
from core.model.loading import load_model
from core.prompts import Example, Task
from tests.helpers.settings import tiny_settings

QUANTIZED_LAYER = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}


def first_cross_attention(loaded):
    """Only every n-th decoder layer has a cross-attention block; the others hold None."""
    return next(block for block in loaded.model.lang_encoder.gated_cross_attn_layers if block is not None)


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_model_answers_through_flamingo(model_dirs, llama_engine: FlamingoEngine, photos, precision):
    settings = tiny_settings(model_dirs["llama"], precision=precision)
    loaded = load_model(settings.model)
    engine = FlamingoEngine(loaded, settings)

    q_proj = loaded.model.lang_encoder.model.layers[0].decoder_layer.self_attn.q_proj
    assert isinstance(q_proj, QUANTIZED_LAYER[precision])
    flamingo_parts = [loaded.model.vision_encoder, loaded.model.perceiver]
    assert {p.dtype for part in flamingo_parts for p in part.parameters()} == {loaded.precision.dtype}
    cross_attention = first_cross_attention(loaded)
    assert isinstance(cross_attention.attn.to_kv, QUANTIZED_LAYER[precision])
    assert isinstance(cross_attention.ff[1], QUANTIZED_LAYER[precision])
    assert cross_attention.attn_gate.dtype == loaded.precision.dtype
    assert loaded.language_model_bytes < llama_engine.loaded.language_model_bytes

    task = Task("t", "", "<image>Output:", (Example(photos["astronaut"], "<image>Output:An astronaut."),))
    answers = {
        name: engine.run(engine.prepare([photos[name]], "<image>Output:", task, GenerationParams(max_new_tokens=8)))
        for name in ("rocket", "chelsea")
    }
    assert all(len(answer.token_ids) > 0 for answer in answers.values())
    assert answers["rocket"].token_ids != answers["chelsea"].token_ids
    assert not holds_conditioning(loaded.model)


def test_quantized_memory_is_reported_smaller_than_fp32(model_dirs):
    sizes = {
        precision: load_model(ModelSettings(name=str(model_dirs["llama"]), precision=precision, device="cpu"))
        for precision in ("fp32", "int8", "nf4")
    }
    fp32, int8, nf4 = (sizes[p].language_model_bytes for p in ("fp32", "int8", "nf4"))
    print(f"language model bytes: fp32 {fp32}, int8 {int8}, nf4 {nf4}")
    assert int8 < fp32 / 2
    assert nf4 < fp32 / 2
    assert sizes["int8"].precision.dtype == torch.float16


@pytest.mark.parametrize(("precision", "scale_bytes_per_weight"), [("nf4", 4 / 64), ("int8", 0.0)])
def test_reported_memory_counts_the_quantization_scales(model_dirs, precision, scale_bytes_per_weight):
    """4-bit layers keep an fp32 scale per 64 weights, int8 ones per output row: beside the parameters."""
    loaded = load_model(ModelSettings(name=str(model_dirs["llama"]), precision=precision, device="cpu"))
    tensors = {id(t): t for t in (*loaded.model.parameters(), *loaded.model.buffers())}
    parameters = sum(t.nelement() * t.element_size() for t in tensors.values())
    quantized = [t for t in tensors.values() if type(t).__name__ in ("Params4bit", "Int8Params")]
    rows = sum(t.shape[0] for t in quantized) if precision == "int8" else 0
    weights = sum(t.quant_state.shape.numel() for t in quantized) if precision == "nf4" else 0
    assert quantized
    assert loaded.total_bytes - parameters >= weights * scale_bytes_per_weight + rows * 4


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_cross_attention_layers_can_stay_unquantized_and_then_take_more_memory(model_dirs, photos, precision):
    both = {
        quantized: load_model(
            ModelSettings(
                name=str(model_dirs["llama"]), precision=precision, device="cpu", quantize_cross_attention=quantized
            )
        )
        for quantized in (True, False)
    }
    layers = {q: first_cross_attention(loaded).attn.to_q for q, loaded in both.items()}
    assert isinstance(layers[True], QUANTIZED_LAYER[precision])
    assert type(layers[False]) is torch.nn.Linear
    assert both[True].total_bytes < both[False].total_bytes
