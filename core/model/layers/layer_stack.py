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

    embed: nn.Module
    norm: nn.Module  # the final norm, before the output head
    head: nn.Module
    rotary: nn.Module | None  # the rotary embedding; None: ALiBi (MPT)
    alibi_slopes: torch.Tensor | None  # (heads, 1, 1), MPT's
    cache_argument: str  # the name under which the decoder layer takes its cache
    key_value_heads: int
    head_dim: int
    # LLaMA's layers on a CPU, by index, with their projections side by side (``core.model.layers.llama_layer``);
    # empty, or None at an index: transformers' layer.
    fused_layers: tuple[FusedLlamaLayer | None, ...] = ()
    rotary_table: RotaryTable | None = None  # with fused layers: the rotary embedding looked up by position

    def layer_arguments(
        self,
        hidden: torch.Tensor,
        masked: torch.Tensor | None,
        distance: torch.Tensor,
        positions: torch.Tensor,
        embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """The layers' keyword arguments for (rows, queries) tokens over (rows, keys) columns.

        ``masked``: (rows, 1, queries, keys), True where a query may not look, or None where every
        query may look at every key (one token of one row, as transformers leaves it unmasked);
        ``distance``: (keys,), each column's offset from the newest (0 for it, negative before it);
        ``positions``: (rows, queries), each token's place in its own sequence; ``embeddings``: their
        rotary embedding, where it is known already.
        """
        if self.rotary is None:  # as build_mpt_alibi_tensor: int32 offsets times float slopes
            assert self.alibi_slopes is not None  # given with every rotary-less (MPT) family
            bias = distance.to(torch.int32).view(1, 1, -1) * self.alibi_slopes
            return {"position_bias": bias, "attention_mask": masked, "output_attentions": False}
        mask = None
        if masked is not None:
            mask = torch.zeros(masked.shape, device=hidden.device, dtype=hidden.dtype)
            mask = mask.masked_fill(masked, torch.finfo(hidden.dtype).min)
        return {
            "position_ids": positions,
            "position_embeddings": embeddings if embeddings is not None else self.rotary(hidden, positions),
            "attention_mask": mask,
        }

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
        embeddings, rotation = self.rotary_table(hidden, positions) if self.rotary_table is not None else (None, None)
        arguments = self.layer_arguments(hidden, masked, distance, positions, embeddings)
        arguments[self.cache_argument] = cache
        for index, layer in enumerate(layers):
            fused = self.fused_layers[index] if self.fused_layers else None
            if fused is not None and rotation is not None:
                hidden = fused(layer.cross_attend(hidden), rotation, arguments["attention_mask"], cache)
                continue
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
        return LanguageModelParts(embed, lm.transformer.norm_f, head, None, slopes, "layer_past", heads, head_dim)
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
    fused: tuple[FusedLlamaLayer | None, ...] = ()
    if isinstance(lm, LlamaForCausalLM) and embed.weight.device.type == "cpu":  # measured and checked on CPUs only
        fused = tuple(fused_llama_layer(layer.decoder_layer) for layer in model.layers)
    table = RotaryTable(rotary) if any(fused) else None
    return LanguageModelParts(embed, norm, head, rotary, None, cache_argument, heads, head_dim, fused, table)
