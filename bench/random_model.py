"""OpenFlamingo's shapes with random weights, built and placed as ``core.model.loading`` places a real model.

Weights cannot be downloaded where the benchmarks run and do not change speed or memory, so the
model is made in memory: the 9B's MPT-7B (``full``), the v1 9B's LLaMA-7B (``full-llama``), or
small versions of either to try the code on a CPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import open_clip
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MptConfig, PretrainedConfig

from core.model.footprint import PUBLISHED_LANGUAGE_MODELS
from core.model.loading import (
    LoadedModel,
    as_trained,
    assemble_flamingo,
    context_length_of,
    place_model,
    plan_precision,
    quantize_linears,
)
from core.model.registry import REGISTRY
from core.prompts import END_OF_CHUNK, IMAGE_TOKEN
from tests.make_tiny_model import TinyModelSpec, build_tokenizer, vision_config


@dataclass(frozen=True)
class Shapes:
    """A registry model's shapes: its published language model (``core.model.footprint``), vision encoder
    and cross-attention spacing, or smaller ones of the same family to try the code on a CPU."""

    model: str  # the registry name
    lm: Callable[[], PretrainedConfig] | None = None  # None: the published one, with Flamingo's vocabulary
    vision: dict | None = None  # an open_clip model config; None: the registry's encoder
    cross_attn_every_n_layers: int | None = None  # None: the registry's
    layers: int | None = None  # fewer decoder layers than the language model has

    def language_config(self, tokenizer_size: int) -> PretrainedConfig:
        if self.lm is None:
            published, vocab = PUBLISHED_LANGUAGE_MODELS[REGISTRY[self.model].lang_encoder_path]
            config = published()
        else:
            config, vocab = self.lm(), tokenizer_size
        config.vocab_size = vocab
        if self.layers:
            config.num_hidden_layers = self.layers
        return config

    def describe(self) -> str:
        config = self.language_config(0)
        return f"{config.num_hidden_layers} layers of width {config.hidden_size}"


_SMALL_VISION = vision_config(TinyModelSpec(family="mpt", vision_width=384, vision_layers=6))["model_cfg"]
SCALES = {
    "full": Shapes("openflamingo/OpenFlamingo-9B-vitl-mpt7b"),
    "full-llama": Shapes("openflamingo/OpenFlamingo-9B"),  # v1: LLaMA-7B
    "small": Shapes(
        "openflamingo/OpenFlamingo-9B-vitl-mpt7b",
        lambda: MptConfig(d_model=512, n_heads=8, n_layers=8, expansion_ratio=4, max_seq_len=1024),
        _SMALL_VISION,
        cross_attn_every_n_layers=2,
    ),
    "small-llama": Shapes(
        "openflamingo/OpenFlamingo-9B",
        lambda: LlamaConfig(
            hidden_size=512,
            intermediate_size=1408,  # a multiple of 64, as bitsandbytes' 4-bit CPU layout needs
            num_attention_heads=8,
            num_hidden_layers=8,
            max_position_embeddings=1024,
        ),
        _SMALL_VISION,
        cross_attn_every_n_layers=2,
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
    """The model in memory with random weights, placed as ``core.model.loading`` places a real one."""
    started = time.perf_counter()
    torch.manual_seed(0)
    plan = plan_precision(precision, device)
    tokenizer = build_tokenizer(TinyModelSpec(family="mpt"))
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, IMAGE_TOKEN]})
    spec = REGISTRY[shapes.model]
    if shapes.vision is None:
        clip = open_clip.create_model(spec.clip_vision_encoder_path, pretrained=None, force_quick_gelu=True)
        width = open_clip.get_model_config(spec.clip_vision_encoder_path)["vision_cfg"]["width"]
    else:
        clip = open_clip.model.CLIP(**shapes.vision)
        width = shapes.vision["vision_cfg"]["width"]
    visual = as_trained(clip.visual)
    transform = open_clip.image_transform(visual.image_size, is_train=False)
    config = shapes.language_config(len(tokenizer))
    # The LM is made on the device in its compute dtype (seconds, not minutes, for 7B parameters).
    with torch.device(device), default_dtype(plan.dtype):
        lm = AutoModelForCausalLM.from_config(config)
    if plan.quantization is not None:
        quantize_linears(lm.base_model, plan, device)
    every = shapes.cross_attn_every_n_layers or spec.cross_attn_every_n_layers
    model = assemble_flamingo(lm, visual, width, tokenizer, every)
    for block in lm.gated_cross_attn_layers:
        if block is not None:  # upstream starts the gates at 0, which would switch the images off
            block.attn_gate.data.fill_(0.5)
            block.ff_gate.data.fill_(0.5)
    place_model(model, plan, device, quantize_cross_attention=True)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        image_transform=transform,
        spec=spec,
        precision=plan,
        device=device,
        context_length=context_length_of(config),
        language_model_bytes=lm.get_memory_footprint(),
        load_seconds=time.perf_counter() - started,
    )
