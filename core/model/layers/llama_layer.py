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
one row gives the same bits; a decode step of one row, which must equal upstream's, then does. The
BLAS may also pick another kernel for another number of rows (a prefill's tokens, a batch's rows),
so each row count is probed once too, and one that differs takes the products apart.

The operations are transformers' ``LlamaDecoderLayer.forward`` (its RMS norms, rotary embedding,
attention function and MLP activation) in its order, each giving the same bits; the rotary
embedding turns the query and the key in one go (``RotaryTable``). The layer's own linear
modules keep their weights as views of the side-by-side matrices, so transformers' forward
(upstream ``generate``) still runs on the same model and memory holds each weight once. Quantized
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
    LlamaAttention,
    LlamaDecoderLayer,
    eager_attention_forward,
)

from core.model.layers.direct_calls import direct

# The rotary embedding's cosines and its sines with the first half negated, (rows, 1, queries, dim).
Rotation = tuple[torch.Tensor, torch.Tensor]


class RotaryTable:
    """The rotary embedding by position, for the forwards through fused layers: computed once (again
    when a longer row comes), so that a decode step looks its position up instead of computing it
    again, about a dozen small operations; each angle is one product, then its cosine and sine, so
    a position's values have the same bits whatever other positions are computed beside it.

    It also gives the rotation as the fused layers apply it: transformers' ``apply_rotary_pos_emb``
    takes ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x)`` is ``x``'s halves swapped with
    the new first half negated. Negating the sine's first half instead and rolling ``x`` by half its
    width gives each product the same bits (a product's sign is its factors'), in one roll instead
    of two slices, a negation and a concatenation, for the query and the key at once.
    """

    def __init__(self, rotary: nn.Module) -> None:
        self.rotary = rotary
        self.cos = self.signed_sin = torch.empty(0)  # (positions, dim)

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor) -> Rotation:
        """The rotation for (rows, queries) ``positions``; one position (a lone row's step) is sliced
        out of the table rather than gathered."""
        if positions.numel() == 1:
            position = int(positions)
            self._cover(position + 1, hidden, positions.device)
            at = slice(position, position + 1)
            return self.cos[at].view(1, 1, 1, -1), self.signed_sin[at].view(1, 1, 1, -1)
        self._cover(int(positions.max()) + 1, hidden, positions.device)
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)

    def _cover(self, needed: int, hidden: torch.Tensor, device: torch.device) -> None:
        """Compute the table again, at least twice as long, when a position lies beyond it."""
        if needed > len(self.cos):
            everywhere = torch.arange(max(needed, 2 * len(self.cos)), device=device)[None]
            cos, sin = self.rotary(hidden, everywhere)
            half = sin.shape[-1] // 2
            self.cos, sin = cos[0], sin[0]
            self.signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)


def _agree(joined: torch.Tensor, weights: Sequence[torch.Tensor], rows: int = 1) -> bool:
    """Whether ``rows`` rows' product with the joined matrix is, to the bit, their products with each."""
    generator = torch.Generator(joined.device).manual_seed(0)
    probe = torch.randn(rows, joined.shape[1], generator=generator, device=joined.device).to(joined.dtype)
    with torch.inference_mode():
        return torch.equal(F.linear(probe, joined), torch.cat([F.linear(probe, weight) for weight in weights], dim=-1))


def _plain(linears: Sequence[nn.Module]) -> bool:
    """Whether each is a plain matrix product: not quantized, no bias."""
    return all(type(linear) is nn.Linear and linear.bias is None for linear in linears)


def _joined(linears: Sequence[nn.Linear]) -> torch.Tensor | None:
    """The linears' weights one after another in one matrix; None where one is not a plain matrix
    product, or where the joined product would not give the same bits."""
    if not _plain(linears):
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


class _JoinedProduct:
    """Linears' weights side by side in one matrix: one product for theirs, where it gives their bits."""

    def __init__(self, matrix: torch.Tensor, linears: Sequence[nn.Linear]) -> None:
        self.matrix = matrix
        self.linears = linears
        self.agree = {1: True}  # by rows in a product: whether the probe found the separate products' bits

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.numel() // hidden.shape[-1]
        agree = self.agree.get(rows)
        if agree is None:
            agree = self.agree[rows] = _agree(self.matrix, [linear.weight for linear in self.linears], rows)
        if agree:
            return F.linear(hidden, self.matrix)
        return torch.cat([F.linear(hidden, linear.weight) for linear in self.linears], dim=-1)


def _attention(attention: LlamaAttention) -> Callable[..., torch.Tensor]:
    """The layer's attention function, chosen once: transformers looks it up and checks its options
    for every layer and token. With SDPA and as many key/value heads as query heads, torch's function
    is called as transformers' ``sdpa_attention_forward`` calls it (the mask cut to the keys, causal
    only for several queries without a mask, the output laid out (rows, queries, heads, dim)), so
    with the same bits; otherwise through transformers' own function."""
    implementation = attention.config._attn_implementation
    scaling, causal_module = attention.scaling, getattr(attention, "is_causal", True)
    if implementation == "sdpa" and attention.num_key_value_groups == 1:

        def sdpa(
            query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
        ) -> torch.Tensor:
            if mask is not None:
                mask = mask[:, :, :, : key.shape[-2]]
            causal = query.shape[2] > 1 and mask is None and causal_module
            output = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling, is_causal=causal
            )
            return output.transpose(1, 2).contiguous()

        return sdpa
    function: Callable[..., tuple[torch.Tensor, Any]] = (
        eager_attention_forward if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    )

    def transformers_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        return function(attention, query, key, value, mask, dropout=0.0, scaling=scaling)[0]

    return transformers_attention


class FusedLlamaLayer:
    """One LLaMA decoder layer run as transformers runs it, with its projections side by side."""

    def __init__(self, layer: LlamaDecoderLayer, query_key_value: torch.Tensor, gate_up: torch.Tensor) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        # What a forward reads of the modules, held here: looking each up through ``nn.Module`` for
        # every layer and token cost as much as a small operation.
        self.norms = [direct(layer.input_layernorm), direct(layer.post_attention_layernorm)]
        self.output, self.down = attention.o_proj.weight, mlp.down_proj.weight
        self.activation = direct(mlp.act_fn)
        self.head_dim, self.layer_index = attention.head_dim, attention.layer_idx
        self.query_key_value = _JoinedProduct(query_key_value, [attention.q_proj, attention.k_proj, attention.v_proj])
        self.gate_up = _JoinedProduct(gate_up, [mlp.gate_proj, mlp.up_proj])
        self.query_key_heads = [
            linear.out_features // attention.head_dim for linear in (attention.q_proj, attention.k_proj)
        ]
        self.rotated_heads = sum(self.query_key_heads)
        self.gate_up_sizes = [mlp.gate_proj.out_features, mlp.up_proj.out_features]
        self.attend = _attention(attention)

    def __call__(self, hidden: torch.Tensor, rotation: Rotation, mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
        """``rotation``: the ``RotaryTable``'s, for the forward's positions."""
        shape = hidden.shape[:-1]
        residual = hidden
        normed = self.norms[0](hidden)
        heads = self.query_key_value(normed).view(*shape, -1, self.head_dim).transpose(1, 2)
        cos, signed_sin = rotation
        rotated = heads[:, : self.rotated_heads]  # the query's heads, then the key's: one rotation for both
        rotated = rotated * cos + rotated.roll(self.head_dim // 2, dims=-1) * signed_sin
        query, key = rotated.split_with_sizes(self.query_key_heads, dim=1)
        key, value = cache.update(key, heads[:, self.rotated_heads :], self.layer_index)
        output = self.attend(query, key, value, mask)
        hidden = residual + F.linear(output.reshape(*shape, -1), self.output)
        residual = hidden
        normed = self.norms[1](hidden)
        gate, up = self.gate_up(normed).split_with_sizes(self.gate_up_sizes, dim=-1)
        return residual + F.linear(self.activation(gate) * up, self.down)


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
        if query_key_value is not None and gate_up is not None and _plain([attention.o_proj, mlp.down_proj]):
            _view_into(attention_projections, query_key_value)
            _view_into(mlp_projections, gate_up)
            fused = FusedLlamaLayer(layer, query_key_value, gate_up)
        setattr(layer, _FUSED, fused)
    fused_layer: FusedLlamaLayer | None = getattr(layer, _FUSED)
    return fused_layer
