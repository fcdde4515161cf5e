"""Weight memory of each released model per precision, from exact parameter counts.

The architectures are built on PyTorch's meta device (no weights, no download) with the published
shapes, so the counts are exact; bytes follow from each precision's storage per parameter. This is
weight memory only: activations and the KV cache come on top. MPT-1B's MosaicGPT is counted with
transformers' MPT of the same shape (its QK-LayerNorm adds a few thousand parameters).

Usage: ``python bench/model_memory.py``
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import open_clip
import torch
from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.registry import REGISTRY

GPT_NEOX_TOKENIZER = 50277 + 3  # gpt-neox-20b's tokenizer plus <|endofchunk|>, <image>, <PAD>
LLAMA_TOKENIZER = 32000 + 3

LANGUAGE_MODELS = {
    "anas-awadalla/mpt-1b-redpajama-200b": lambda: MptForCausalLM(
        MptConfig(d_model=2048, n_heads=16, n_layers=24, expansion_ratio=4, max_seq_len=2048, vocab_size=50432)
    ),
    "togethercomputer/RedPajama-INCITE-Base-3B-v1": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(
            hidden_size=2560,
            num_hidden_layers=32,
            num_attention_heads=32,
            intermediate_size=10240,
            vocab_size=50432,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
    ),
    "anas-awadalla/mpt-7b": lambda: MptForCausalLM(
        MptConfig(d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048, vocab_size=50432)
    ),
    "huggyllama/llama-7b": lambda: LlamaForCausalLM(
        LlamaConfig(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=32000,
            max_position_embeddings=2048,
        )
    ),
}
LANGUAGE_MODELS["anas-awadalla/mpt-1b-redpajama-200b-dolly"] = LANGUAGE_MODELS["anas-awadalla/mpt-1b-redpajama-200b"]
LANGUAGE_MODELS["togethercomputer/RedPajama-INCITE-Instruct-3B-v1"] = LANGUAGE_MODELS[
    "togethercomputer/RedPajama-INCITE-Base-3B-v1"
]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _quantizable(module: nn.Module, head: nn.Module | None = None) -> int:
    """Parameters in the linear layers bitsandbytes quantizes (all but the LM's output head)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear) and m is not head)


def measure(name: str) -> dict[str, float]:
    spec = REGISTRY[name]
    with torch.device("meta"):
        vision = open_clip.create_model(spec.clip_vision_encoder_path, device="meta", load_weights=False).visual
        lm = LANGUAGE_MODELS[spec.lang_encoder_path]()
        vocab = LLAMA_TOKENIZER if "llama" in spec.lang_encoder_path else GPT_NEOX_TOKENIZER
        lm.resize_token_embeddings(vocab, mean_resizing=False)
        width = open_clip.get_model_config(spec.clip_vision_encoder_path)["vision_cfg"]["width"]
        hidden = lm.config.hidden_size
        layers = lm.config.num_hidden_layers
        perceiver = PerceiverResampler(dim=width)
        cross = nn.ModuleList(
            GatedCrossAttentionBlock(dim=hidden, dim_visual=width)
            for index in range(layers)
            if (index + 1) % spec.cross_attn_every_n_layers == 0
        )
    # With int8 and nf4, the LM's linear layers and (model.quantize_cross_attention, the default)
    # the cross-attention layers' are quantized; the rest stays in 16 bits.
    total = _count(lm) + _count(vision) + _count(perceiver) + _count(cross)
    linear = _quantizable(lm, lm.get_output_embeddings()) + _quantizable(cross)
    rest = total - linear
    gib = 2**30
    return {
        "params_b": total / 1e9,
        "fp32": total * 4 / gib,
        "bf16": total * 2 / gib,
        # int8: one byte per quantized weight plus an fp32 scale per output row (ignored: < 0.1%).
        "int8": (linear + rest * 2) / gib,
        # nf4: half a byte per weight, plus an fp32 absmax per block of 64 weights (no double quantization).
        "nf4": (linear * (0.5 + 4 / 64) + rest * 2) / gib,
    }


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # open_clip warns that the meta-device model has no weights
    print(f"{'model':<54} {'params':>7} {'fp32':>7} {'bf16':>7} {'int8':>7} {'nf4':>7}  (GiB of weights)")
    for name in REGISTRY:
        row = measure(name)
        print(
            f"{name:<54} {row['params_b']:6.2f}B " + " ".join(f"{row[p]:7.1f}" for p in ("fp32", "bf16", "int8", "nf4"))
        )


if __name__ == "__main__":
    main()
