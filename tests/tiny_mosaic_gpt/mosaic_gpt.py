"""A MosaicGPT-shaped causal LM: the interface and cache format of MPT-1B's hub code, written small."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mosaic_gpt import MosaicGPTConfig

KeyValues = tuple[torch.Tensor, torch.Tensor] | tuple[()]


def alibi_bias(heads: int, length: int, bias_max: int) -> torch.Tensor:
    """(1, heads, 1, length): each key's distance back from the last one, times its head's slope."""
    slopes = 1.0 / torch.pow(2, torch.arange(1, heads + 1) * (bias_max / heads))
    distance = torch.arange(1 - length, 1, dtype=torch.float32)
    return (distance.view(1, 1, 1, length) * slopes.view(1, heads, 1, 1)).float()


class MultiheadAttention(nn.Module):
    def __init__(self, config: MosaicGPTConfig) -> None:
        super().__init__()
        self.heads = config.n_heads
        self.Wqkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.q_ln = nn.LayerNorm(config.d_model)
        self.k_ln = nn.LayerNorm(config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)

    def forward(
        self, x: torch.Tensor, past_key_value: KeyValues | None, attn_bias: torch.Tensor, key_padding: torch.Tensor
    ) -> tuple[torch.Tensor, KeyValues | None]:
        query, key, value = self.Wqkv(x).chunk(3, dim=2)
        query, key = self.q_ln(query), self.k_ln(key)
        if past_key_value is not None:
            if len(past_key_value) != 0:
                key = torch.cat([past_key_value[0], key], dim=1)
                value = torch.cat([past_key_value[1], value], dim=1)
            past_key_value = (key, value)
        batch, queries, width = query.shape
        keys = key.shape[1]
        q = query.view(batch, queries, self.heads, -1).transpose(1, 2)
        k = key.view(batch, keys, self.heads, -1).permute(0, 2, 3, 1)
        v = value.view(batch, keys, self.heads, -1).transpose(1, 2)
        scores = q.matmul(k) / math.sqrt(width // self.heads) + attn_bias[:, :, -queries:, -keys:]
        lowest = torch.finfo(scores.dtype).min
        scores = scores.masked_fill(~key_padding.view(batch, 1, 1, keys), lowest)
        causal = torch.ones(keys, keys, dtype=torch.bool, device=x.device).tril()[-queries:, -keys:]
        scores = scores.masked_fill(~causal.view(1, 1, queries, keys), lowest)
        context = torch.softmax(scores, dim=-1).matmul(v).transpose(1, 2).reshape(batch, queries, width)
        return self.out_proj(context), past_key_value


class GPTMLP(nn.Module):
    def __init__(self, config: MosaicGPTConfig) -> None:
        super().__init__()
        self.mlp_up = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.mlp_down = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_down(F.gelu(self.mlp_up(x)))


class GPTBlock(nn.Module):
    def __init__(self, config: MosaicGPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = MultiheadAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = GPTMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        past_key_value: KeyValues | None = None,
        attn_bias: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = True,
    ) -> tuple[torch.Tensor, KeyValues | None]:
        attended, past_key_value = self.attn(self.ln_1(x), past_key_value, attn_bias, attention_mask)
        x = x + attended
        return x + self.mlp(self.ln_2(x)), past_key_value


class MosaicGPT(PreTrainedModel):
    config_class = MosaicGPTConfig
    base_model_prefix = "model"

    def __init__(self, config: MosaicGPTConfig) -> None:
        super().__init__(config)
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.d_model),
                "blocks": nn.ModuleList(GPTBlock(config) for _ in range(config.n_layers)),
                "ln_f": nn.LayerNorm(config.d_model),
            }
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        raise NotImplementedError  # as the hub code: the loader adds the accessors

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: list[KeyValues] | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        if past_key_values is not None and len(past_key_values) != self.config.n_layers:
            raise ValueError("past_key_values must provide a past_key_value for each attention layer")
        x = self.transformer.wte(input_ids)
        past = past_key_values[0][0].size(1) if past_key_values is not None and past_key_values[0] else 0
        if attention_mask is None:
            attention_mask = torch.ones(x.shape[0], past + x.shape[1], dtype=torch.bool, device=x.device)
        attention_mask = attention_mask.bool()
        bias = alibi_bias(self.config.n_heads, attention_mask.shape[1], self.config.alibi_bias_max).to(x)
        if use_cache and past_key_values is None:
            past_key_values = [() for _ in range(self.config.n_layers)]
        for index, block in enumerate(self.transformer.blocks):
            past_key_value = past_key_values[index] if past_key_values is not None else None
            x, past_key_value = block(x, past_key_value=past_key_value, attn_bias=bias, attention_mask=attention_mask)
            if past_key_values is not None:
                past_key_values[index] = past_key_value
        logits = F.linear(self.transformer.ln_f(x), self.transformer.wte.weight)
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values)

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, past_key_values: list[KeyValues] | None = None, **kwargs: object
    ) -> dict[str, object]:
        if past_key_values is not None:
            input_ids = input_ids[:, -1:]
        return {
            "input_ids": input_ids,
            "attention_mask": kwargs["attention_mask"],
            "past_key_values": past_key_values,
            "use_cache": kwargs.get("use_cache", True),
        }
