"""LLaMA's decoder layer for the engine's own forwards: its projections side by side, its wrappers gone.

Why: at batch 1 on a CPU a decode step of the benchmark model is 73 matrix-vector products and
about 600 small operations, and the products read every weight once, so how they read matters.
LLaMA projects the query, key and value with three matrices and the MLP's gate and up with two,
where MPT and GPT-NeoX keep one matrix for each group; one product over the matrices side by side
took about a third less time than the separate ones. Calling the layer's arithmetic directly also
drops the module calls, keyword-argument wrappers and no-op conversions that transformers' forward
goes through for every layer and token.

Whether one product gives each output the very dot product the separate ones give depends on the
shapes and the machine's BLAS (on this project's CPUs: yes for the benchmark model's and the 7B's
projections, no for some smaller ones), so the matrices are put side by side only where a probe of
one row gives the same bits; a decode step of one row, which must equal upstream's, then does.
Batches of rows are held to the batched paths' near-tie rule anyway.

The operations are transformers' ``LlamaDecoderLayer.forward`` (its RMS norms, rotary embedding,
attention function and MLP activation) in its order. The layer's own linear modules keep their
weights as views of the side-by-side matrices, so transformers' forward (upstream ``generate``,
the engine's prefills) still runs on the same model and memory holds each weight once. Quantized
or biased projections are left as they are, and such a layer runs through transformers' forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


def _rms_norm(norm: LlamaRMSNorm, hidden: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward``: in float32, then back to the hidden states' dtype."""
    dtype = hidden.dtype
    if dtype != torch.float32:
        hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * (hidden if dtype == torch.float32 else hidden.to(dtype))


def _agree(joined: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether one row's product with the joined matrix is, to the bit, its products with each."""
    generator = torch.Generator(joined.device).manual_seed(0)
    row = torch.randn(1, joined.shape[1], generator=generator, device=joined.device).to(joined.dtype)
    with torch.inference_mode():
        return torch.equal(F.linear(row, joined), torch.cat([F.linear(row, weight) for weight in weights], dim=-1))


def _joined(linears: Sequence[nn.Linear]) -> torch.Tensor | None:
    """The linears' weights one after another in one matrix; None where one is quantized or has a
    bias (its product is then not a plain matrix product), or where the joined product would not
    give the same bits."""
    if any(type(linear) is not nn.Linear or linear.bias is not None for linear in linears):
        return None
    weights = [linear.weight.detach() for linear in linears]
    joined = torch.cat(weights)
    return joined if _agree(joined, weights) else None


def _view_into(linears: Sequence[nn.Linear], joined: torch.Tensor) -> None:
    """Each linear's weight becomes its rows of the joined matrix, so the weights are held once."""
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(joined[start : start + rows], requires_grad=linear.weight.requires_grad)
        start += rows


class FusedLlamaLayer:
    """One LLaMA decoder layer run as transformers runs it, with its projections side by side."""

    def __init__(self, layer: LlamaDecoderLayer, query_key_value: torch.Tensor, gate_up: torch.Tensor) -> None:
        self.layer = layer
        attention = layer.self_attn
        self.attention = attention
        self.sizes = [attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features]
        self.query_key_value = query_key_value
        self.gate_up = gate_up
        self.intermediate = layer.mlp.gate_proj.out_features

    def __call__(self, hidden: torch.Tensor, arguments: dict[str, Any], cache: Any) -> torch.Tensor:
        layer, attention = self.layer, self.attention
        shape = hidden.shape[:-1]
        heads_shape = (*shape, -1, attention.head_dim)
        residual = hidden
        normed = _rms_norm(layer.input_layernorm, hidden)
        query, key, value = F.linear(normed, self.query_key_value).split(self.sizes, dim=-1)
        query = query.view(heads_shape).transpose(1, 2)
        key = key.view(heads_shape).transpose(1, 2)
        value = value.view(heads_shape).transpose(1, 2)
        cos, sin = arguments["position_embeddings"]
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key, value = cache.update(key, value, attention.layer_idx)
        implementation = attention.config._attn_implementation
        attend: Callable[..., tuple[torch.Tensor, Any]] = (
            eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
        )
        output, _ = attend(
            attention, query, key, value, arguments["attention_mask"], dropout=0.0, scaling=attention.scaling
        )
        hidden = residual + attention.o_proj(output.reshape(*shape, -1))
        residual = hidden
        normed = _rms_norm(layer.post_attention_layernorm, hidden)
        gate, up = F.linear(normed, self.gate_up).split(self.intermediate, dim=-1)
        mlp = layer.mlp
        return residual + mlp.down_proj(mlp.act_fn(gate) * up)


# Where a layer keeps what ``fused_llama_layer`` made of it, so that it is made once however many times
# the language model's parts are asked for, and goes with the model.
_FUSED = "_flamingo_fused_projections"


def fused_llama_layer(layer: LlamaDecoderLayer) -> FusedLlamaLayer | None:
    """The layer with its projections side by side, or None where they cannot be (quantized, biased, or
    other bits) and transformers' layer runs it."""
    if not hasattr(layer, _FUSED):
        attention, mlp = layer.self_attn, layer.mlp
        attention_projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        mlp_projections = [mlp.gate_proj, mlp.up_proj]
        query_key_value, gate_up = _joined(attention_projections), _joined(mlp_projections)
        fused = None
        if query_key_value is not None and gate_up is not None:
            _view_into(attention_projections, query_key_value)
            _view_into(mlp_projections, gate_up)
            fused = FusedLlamaLayer(layer, query_key_value, gate_up)
        setattr(layer, _FUSED, fused)
    fused_layer: FusedLlamaLayer | None = getattr(layer, _FUSED)
    return fused_layer
