"""The language model's decoder layers driven directly, over key/value layouts of our own.

Why: transformers' model forwards build their masks and positions for a cache whose rows are
contiguous, left-padded copies, and wrap every layer again for every token. The decode steps (fixed
buffers under CUDA graphs; a row's own buffer or the batch's shared store otherwise) and the
batched prefill (each task's prefix stored once, requests of different lengths in one forward) lay
keys out otherwise, so they give each layer its mask and its tokens' places themselves: MPT's ALiBi bias
from each key's distance to the newest column (upstream's bias bit for bit), or each token's
rotary position for LLaMA and GPT-NeoX. Upstream's layers still do all the arithmetic (LLaMA's, on a
CPU, called op for op with their projections side by side: ``core.model.layers.llama_layer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import GPTNeoXForCausalLM, LlamaForCausalLM, MptForCausalLM
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from core.model.layers.direct_calls import Forward, direct
from core.model.layers.flamingo_layer import ReusableMediaLayer
from core.model.layers.llama_layer import FusedLlamaLayer, RotaryTable, fused_llama_layer


class LayerCache(Protocol):
    """What the decoder layers' attention asks of a cache."""

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


@dataclass(frozen=True)
class LanguageModelParts:
    """What driving the layers needs of a language model family."""

    # The token embedding, the final norm and the output head, as functions where they are plain
    # modules (``core.model.layers.direct_calls``): a decode step calls each once.
    embed: Forward
    norm: Forward
    head: Forward
    rotary: nn.Module | None  # the rotary embedding; None: ALiBi (MPT)
    alibi_slopes: torch.Tensor | None  # (heads, 1, 1), MPT's
    cache_argument: str  # the name under which the decoder layer takes its cache
    key_value_heads: int
    head_dim: int
    # LLaMA's layers on a CPU with their projections side by side (``core.model.layers.llama_layer``), all
    # of them or none (empty: transformers' layers), with the rotary embedding they look up by position.
    fused_layers: tuple[FusedLlamaLayer, ...] = ()
    rotary_table: RotaryTable | None = None

    def layer_arguments(
        self,
        hidden: torch.Tensor,
        masked: torch.Tensor | None,
        distance: torch.Tensor,
        positions: torch.Tensor,
    ) -> dict[str, Any]:
        """The layers' keyword arguments for (rows, queries) tokens over (rows, keys) columns.

        ``masked``: (rows, 1, queries, keys), True where a query may not look, or None where every
        query may look at every key (one token of one row, as transformers leaves it unmasked);
        ``distance``: (keys,), each column's offset from the newest (0 for it, negative before it);
        ``positions``: (rows, queries), each token's place in its own sequence.
        """
        if self.rotary is None:  # as build_mpt_alibi_tensor: int32 offsets times float slopes
            assert self.alibi_slopes is not None  # given with every rotary-less (MPT) family
            bias = distance.to(torch.int32).view(1, 1, -1) * self.alibi_slopes
            return {"position_bias": bias, "attention_mask": masked, "output_attentions": False}
        return {
            "position_ids": positions,
            "position_embeddings": self.rotary(hidden, positions),
            "attention_mask": self.additive_mask(masked, hidden),
        }

    @staticmethod
    def additive_mask(masked: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor | None:
        """The rotary families' float mask: the dtype's lowest value where a query may not look."""
        if masked is None:
            return None
        mask = torch.zeros(masked.shape, device=hidden.device, dtype=hidden.dtype)
        return mask.masked_fill(masked, torch.finfo(hidden.dtype).min)

    def last_logits(
        self,
        layers: Sequence[ReusableMediaLayer],
        tokens: torch.Tensor,
        cache: LayerCache,
        masked: torch.Tensor | None,
        distance: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """(rows, vocab) logits of each row's last token, through every layer."""
        hidden = self.embed(tokens)
        if self.rotary_table is not None:  # every layer fused: LLaMA's, on a CPU
            rotation = self.rotary_table(hidden, positions)
            mask = self.additive_mask(masked, hidden)
            for layer, fused in zip(layers, self.fused_layers, strict=True):
                hidden = fused(layer.cross_attend(hidden), rotation, mask, cache)
        else:
            arguments = self.layer_arguments(hidden, masked, distance, positions)
            arguments[self.cache_argument] = cache
            for layer in layers:
                output = layer(hidden, use_cache=True, cache_position=None, **arguments)
                hidden = output[0] if isinstance(output, tuple) else output  # LLaMA's layers return the tensor alone
        # Over every query, as the LM's own forward (and upstream's generate) takes it: the products
        # of more rows may round otherwise than of the last alone.
        return self.head(self.norm(hidden))[:, -1, :]


def language_model_parts(lm: nn.Module) -> LanguageModelParts | None:
    """The family's parts, or None where its layers are left to the model's own forward."""
    if not isinstance(lm, MptForCausalLM | LlamaForCausalLM | GPTNeoXForCausalLM):
        return None  # remote code (MPT-1B's MosaicGPT)
    config = lm.config
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if isinstance(lm, MptForCausalLM):
        slopes = -build_mpt_alibi_tensor(config.n_heads, 2, device=embed.weight.device)[:, :, :1]
        heads, head_dim = config.n_heads, config.d_model // config.n_heads
        return LanguageModelParts(
            direct(embed), direct(lm.transformer.norm_f), direct(head), None, slopes, "layer_past", heads, head_dim
        )
    if isinstance(lm, LlamaForCausalLM):
        model, cache_argument, heads = lm.model, "past_key_values", config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        norm = model.norm
    else:
        model, cache_argument, heads = lm.gpt_neox, "layer_past", config.num_attention_heads
        head_dim = config.hidden_size // config.num_attention_heads
        norm = model.final_layer_norm
    rotary = model.rotary_emb
    if "dynamic" in rotary.rope_type or rotary.rope_type == "longrope":
        return None  # frequencies chosen from the longest position present, which differs between batch and row
    fused: tuple[FusedLlamaLayer, ...] = ()
    if isinstance(lm, LlamaForCausalLM) and embed.weight.device.type == "cpu":  # measured and checked on CPUs only
        each = [fused_llama_layer(layer.decoder_layer) for layer in model.layers]
        fused = tuple(layer for layer in each if layer is not None) if all(each) else ()
    table = RotaryTable(rotary) if fused else None
    return LanguageModelParts(
        direct(embed), direct(norm), direct(head), rotary, None, cache_argument, heads, head_dim, fused, table
    )
