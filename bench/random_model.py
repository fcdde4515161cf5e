"""OpenFlamingo's shapes with random weights, built and placed as ``core.loading`` places a real model.

Weights cannot be downloaded where the benchmarks run and do not change speed or memory, so the
model is made in memory: the 9B's MPT-7B (``full``), the v1 9B's LLaMA-7B (``full-llama``), or
small versions of either to try the code on a CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import open_clip
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM, PretrainedConfig, PreTrainedModel

from core.loading import LoadedModel, assemble_flamingo, place_model, plan_precision, quantize_linears
from core.prompts import END_OF_CHUNK, IMAGE_TOKEN
from core.registry import REGISTRY
from tests.make_tiny_model import TinyModelSpec, build_tokenizer, vision_config


@dataclass(frozen=True)
class Family:
    """A language model family as the benchmark builds it."""

    config: type[PretrainedConfig]
    model: type[PreTrainedModel]
    layers_key: str  # the config's number of decoder layers
    width_key: str
    context_key: str
    decoder: str  # the attribute holding the decoder, which quantization converts


FAMILIES = {
    "mpt": Family(MptConfig, MptForCausalLM, "n_layers", "d_model", "max_seq_len", "transformer"),
    "llama": Family(
        LlamaConfig, LlamaForCausalLM, "num_hidden_layers", "hidden_size", "max_position_embeddings", "model"
    ),
}


@dataclass(frozen=True)
class Shapes:
    model: str  # the registry name of the model whose shapes these are
    family: str
    lm: dict
    vision: dict | str  # an open_clip model config, or the name of one
    cross_attn_every_n_layers: int
    vocab: int | None  # None: the tokenizer's

    def describe(self) -> str:
        family = FAMILIES[self.family]
        return f"{self.lm[family.layers_key]} layers of width {self.lm[family.width_key]}"

    def with_layers(self, layers: int) -> Shapes:
        return replace(self, lm={**self.lm, FAMILIES[self.family].layers_key: layers})


_SMALL_VISION = vision_config(TinyModelSpec(family="mpt", vision_width=384, vision_layers=6))["model_cfg"]
SCALES = {
    "full": Shapes(
        model="openflamingo/OpenFlamingo-9B-vitl-mpt7b",
        family="mpt",
        lm={"d_model": 4096, "n_heads": 32, "n_layers": 32, "expansion_ratio": 4, "max_seq_len": 2048},
        vision="ViT-L-14",
        cross_attn_every_n_layers=4,
        vocab=50432,
    ),
    # The v1 OpenFlamingo-9B: LLaMA-7B (its vocabulary with the three tokens Flamingo adds).
    "full-llama": Shapes(
        model="openflamingo/OpenFlamingo-9B",
        family="llama",
        lm={
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "max_position_embeddings": 2048,
        },
        vision="ViT-L-14",
        cross_attn_every_n_layers=4,
        vocab=32003,
    ),
    "small": Shapes(
        model="openflamingo/OpenFlamingo-9B-vitl-mpt7b",
        family="mpt",
        lm={"d_model": 512, "n_heads": 8, "n_layers": 8, "expansion_ratio": 4, "max_seq_len": 1024},
        vision=_SMALL_VISION,
        cross_attn_every_n_layers=2,
        vocab=None,
    ),
    "small-llama": Shapes(
        model="openflamingo/OpenFlamingo-9B",
        family="llama",
        lm={
            "hidden_size": 512,
            "intermediate_size": 1408,  # a multiple of 64, as bitsandbytes' 4-bit CPU layout needs
            "num_attention_heads": 8,
            "num_hidden_layers": 8,
            "max_position_embeddings": 1024,
        },
        vision=_SMALL_VISION,
        cross_attn_every_n_layers=2,
        vocab=None,
    ),
}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(shapes: Shapes, precision: str, device: torch.device) -> LoadedModel:
    """The model in memory with random weights, placed as ``core.loading`` places a real one."""
    started = time.perf_counter()
    torch.manual_seed(0)
    plan = plan_precision(precision, device)
    tokenizer = build_tokenizer(TinyModelSpec(family="mpt"))
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, IMAGE_TOKEN]})
    if isinstance(shapes.vision, str):
        clip = open_clip.create_model(shapes.vision, pretrained=None)
        width = open_clip.get_model_config(shapes.vision)["vision_cfg"]["width"]
    else:
        clip = open_clip.model.CLIP(**shapes.vision)
        width = shapes.vision["vision_cfg"]["width"]
    visual = clip.visual
    visual.output_tokens = True
    transform = open_clip.image_transform(visual.image_size, is_train=False)
    # The LM is made on the device in its compute dtype (seconds, not minutes, for 7B parameters).
    family = FAMILIES[shapes.family]
    with torch.device(device), default_dtype(plan.dtype):
        lm = family.model(family.config(vocab_size=shapes.vocab or len(tokenizer), **shapes.lm))
    if plan.quantization is not None:
        quantize_linears(getattr(lm, family.decoder), plan, device)
    model = assemble_flamingo(lm, visual, width, tokenizer, shapes.cross_attn_every_n_layers)
    for block in lm.gated_cross_attn_layers:
        if block is not None:  # upstream starts the gates at 0, which would switch the images off
            block.attn_gate.data.fill_(0.5)
            block.ff_gate.data.fill_(0.5)
    place_model(model, plan, device, quantize_cross_attention=True)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        image_transform=transform,
        spec=REGISTRY[shapes.model],
        precision=plan,
        device=device,
        context_length=shapes.lm[family.context_key],
        language_model_bytes=lm.get_memory_footprint(),
        load_seconds=time.perf_counter() - started,
    )
