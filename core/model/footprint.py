"""Weight memory of a model before it is loaded, from exact parameter counts.

A replica decides which models may share its GPU before it loads any of them, so the size must
come without weights or downloads: the architecture is built on PyTorch's meta device, from the
published shapes of the released language models or from a local directory's own configs. The
figure is weights only; activations and key/value caches come on top.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import cast

import open_clip
import torch
from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MptConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from core.errors import ModelLoadError
from core.model.loading import (
    PrecisionPlan,
    decoder_layers_attr,
    embedding_table,
    load_tokenizer,
    with_embedding_accessors,
)
from core.model.registry import ModelSpec

_GPT_NEOX_VOCAB = 50277 + 3  # gpt-neox-20b's tokenizer plus <|endofchunk|>, <image>, <PAD>
_LLAMA_VOCAB = 32000 + 3
_OPEN_CLIP = str(Path(open_clip.__file__).parent)


def _mpt(d_model: int, n_heads: int, n_layers: int) -> PretrainedConfig:
    return MptConfig(
        d_model=d_model, n_heads=n_heads, n_layers=n_layers, expansion_ratio=4, max_seq_len=2048, vocab_size=50432
    )


def _redpajama_3b() -> PretrainedConfig:
    return GPTNeoXConfig(
        hidden_size=2560,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=10240,
        vocab_size=50432,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def _llama_7b() -> PretrainedConfig:
    return LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
        max_position_embeddings=2048,
    )


# The released language models' configs, from their config.json on the Hub, and their vocabulary
# once Flamingo's tokens are added. MPT-1B's MosaicGPT is counted as transformers' MPT of the same
# shape (its QK-LayerNorm adds a few thousand parameters).
PUBLISHED_LANGUAGE_MODELS: dict[str, tuple[Callable[[], PretrainedConfig], int]] = {
    "anas-awadalla/mpt-1b-redpajama-200b": (lambda: _mpt(2048, 16, 24), _GPT_NEOX_VOCAB),
    "anas-awadalla/mpt-1b-redpajama-200b-dolly": (lambda: _mpt(2048, 16, 24), _GPT_NEOX_VOCAB),
    "togethercomputer/RedPajama-INCITE-Base-3B-v1": (_redpajama_3b, _GPT_NEOX_VOCAB),
    "togethercomputer/RedPajama-INCITE-Instruct-3B-v1": (_redpajama_3b, _GPT_NEOX_VOCAB),
    "anas-awadalla/mpt-7b": (lambda: _mpt(4096, 32, 32), _GPT_NEOX_VOCAB),
    "huggyllama/llama-7b": (_llama_7b, _LLAMA_VOCAB),
}


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    language_linear: int  # weights int8 and nf4 quantize in the LM: its linear layers but the output head
    cross_attention_linear: int  # and in the cross-attention layers, unless model.quantize_cross_attention is off
    language_model: int  # the LM's own parameters; the rest (vision, perceiver, cross-attention) are built in fp32

    def weight_bytes(self, plan: PrecisionPlan, quantize_cross_attention: bool = True) -> int:
        """Bytes of weights loaded as ``plan`` says: quantized layers packed, the rest in its dtype."""
        per_weight = plan.dtype.itemsize
        if plan.quantization is None:
            return self.total * per_weight
        quantized = self.language_linear + (self.cross_attention_linear if quantize_cross_attention else 0)
        rest = (self.total - quantized) * per_weight
        if plan.quantization.load_in_8bit:  # a byte per weight; an fp32 scale per output row is under 0.1%
            return quantized + rest
        return round(quantized * (0.5 + 4 / 64)) + rest  # nf4: half a byte, an fp32 absmax per 64

    def host_bytes(self, plan: PrecisionPlan) -> int:
        """This machine's memory a load onto a GPU passes through at its peak, before the model moves
        there (``core.model.loading.place_model``): the vision encoder, the perceiver and the
        cross-attention layers as upstream builds them, in fp32, and the language model in the plan's
        dtype, unless quantized (its loader then puts it on the GPU shard by shard)."""
        built = (self.total - self.language_model) * torch.float32.itemsize
        return built if plan.quantization is not None else built + self.language_model * plan.dtype.itemsize


class _QuietMetaBuild(logging.Filter):
    """open_clip narrates building a model (at INFO, on the root logger), which before every load
    would repeat what loading says, and warns that a model built without weights has none, which
    is the point here."""

    def filter(self, record: logging.LogRecord) -> bool:
        narration = record.levelno <= logging.INFO and record.pathname.startswith(_OPEN_CLIP)
        return not narration and "No pretrained weights loaded" not in record.getMessage()


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _linear_weights(module: nn.Module, head: nn.Module | None = None) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear) and m is not head)


def _language_model(spec: ModelSpec) -> PreTrainedModel:
    """On the meta device already: callers enter ``torch.device("meta")``."""
    if spec.lang_encoder_path in PUBLISHED_LANGUAGE_MODELS:
        config, vocab = PUBLISHED_LANGUAGE_MODELS[spec.lang_encoder_path]
        lm = AutoModelForCausalLM.from_config(config())
    else:  # a local directory: its own config and tokenizer, with the tokens Flamingo adds
        config = AutoConfig.from_pretrained(spec.lang_encoder_path, trust_remote_code=spec.trust_remote_code)
        if hasattr(config, "init_device"):  # MosaicGPT places its layers there, whatever device is current
            config.init_device = "meta"
        built = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
        lm = with_embedding_accessors(built)
        vocab = len(load_tokenizer(spec))
    lm.resize_token_embeddings(vocab, mean_resizing=False)
    return lm


@cache
def parameter_counts(spec: ModelSpec) -> ParameterCounts:
    """Exact counts of the assembled model; raises ``ModelLoadError`` when its shapes are unknown."""
    quiet = _QuietMetaBuild()
    logging.getLogger().addFilter(quiet)
    try:
        with torch.device("meta"):
            lm = _language_model(spec)
            vision = open_clip.create_model(spec.clip_vision_encoder_path, device="meta", load_weights=False).visual
            width = open_clip.get_model_config(spec.clip_vision_encoder_path)["vision_cfg"]["width"]
            hidden = embedding_table(lm.get_input_embeddings()).shape[1]
            blocks = cast(nn.ModuleList, lm.get_submodule(decoder_layers_attr(lm)))  # typed as a plain module
            layers = len(blocks)
            perceiver = PerceiverResampler(dim=width)
            cross = nn.ModuleList(
                GatedCrossAttentionBlock(dim=hidden, dim_visual=width)
                for index in range(layers)
                if (index + 1) % spec.cross_attn_every_n_layers == 0
            )
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError) as error:
        raise ModelLoadError(f"cannot tell the size of {spec.name}: {error}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    total = _count(lm) + _count(vision) + _count(perceiver) + _count(cross)
    return ParameterCounts(total, _linear_weights(lm, lm.get_output_embeddings()), _linear_weights(cross), _count(lm))
