"""Write a complete local OpenFlamingo model directory with random weights.

Tests and benchmarks cannot download the released checkpoints, so they build a model with the
same structure (open_clip vision tower, a transformers causal LM, a tokenizer with the Flamingo
special tokens, and a ``checkpoint.pt`` holding only the trained Flamingo parameters, keyed the
way upstream saves them) and load it through the project's real loader.

Usage: ``python -m tests.make_tiny_model OUT_DIR --family llama|gptneox|mpt|mosaicgpt``
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MptConfig,
    MptForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

FAMILIES = ("llama", "gptneox", "mpt")
# MPT-1B's family: hub code, built from tests/tiny_mosaic_gpt and loaded with trust_remote_code.
REMOTE_CODE_FAMILY = "mosaicgpt"
MANIFEST_NAME = "flamingo.json"

_WORDS = (
    "a an the this that one two three some many small large big little old young red green blue "
    "yellow black white brown orange purple grey dark bright cat dog bird horse cow sheep person "
    "man woman child boy girl people astronaut rocket launch space flag suit helmet coffee cup "
    "saucer spoon table wooden plate food pizza cake bread apple banana car bus truck train "
    "bicycle motorcycle street road city building house window door tree grass field sky cloud "
    "sun moon star water river sea beach boat mountain snow rain picture photo image camera "
    "tripod standing sitting lying walking running flying holding looking wearing eating "
    "drinking on in at of with near next to under above behind front top side and or is are "
    "was were has have there here what where who how many colour color question answer short "
    "output caption describe yes no it its his her their very into from for by smoke fire "
    "launching pad tower night day morning evening light shadow face hair eyes smiling "
    "portrait close up view inside outside left right middle background foreground"
).split()


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of a generated model: small for tests, bench-sized when asked."""

    family: str
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 192
    vocab: int = 400
    max_positions: int = 512
    cross_attn_every_n_layers: int = 2
    vision_width: int = 64
    vision_layers: int = 2
    vision_patch: int = 14
    image_size: int = 224
    seed: int = 0


def _corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    sentences = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) for _ in range(3000)]
    sentences += [" ".join(pair) for pair in itertools.product(_WORDS[:40], _WORDS[40:80])]
    return sentences


def build_tokenizer(spec: TinyModelSpec) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here; the LLaMA family gets LLaMA's specials and a leading BOS."""
    if spec.family == "llama":
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    special_list = list(dict.fromkeys(specials.values()))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab,
        special_tokens=special_list,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    if spec.family == "llama":
        bos_id = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=spec.max_positions,
        model_input_names=["input_ids", "attention_mask"],
        **specials,
    )


def build_language_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    vocab = len(tokenizer)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if spec.family == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=False,
            **ids,
        )
        return LlamaForCausalLM(config)
    if spec.family == "gptneox":
        config = GPTNeoXConfig(
            vocab_size=vocab,
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            max_position_embeddings=spec.max_positions,
            rotary_pct=0.25,
            tie_word_embeddings=False,
            **ids,
        )
        return GPTNeoXForCausalLM(config)
    # MPT's names for the sizes, shared by the native class and MPT-1B's hub code.
    mpt_sizes = {
        "vocab_size": vocab,
        "d_model": spec.hidden,
        "n_heads": spec.heads,
        "n_layers": spec.layers,
        "max_seq_len": spec.max_positions,
        **ids,
    }
    ratio = max(1, spec.intermediate // spec.hidden)
    if spec.family == "mpt":
        # MPT-7B ships with use_cache false; keep that so tests see the shipped behaviour.
        return MptForCausalLM(MptConfig(**mpt_sizes, expansion_ratio=ratio, use_cache=False))
    if spec.family == REMOTE_CODE_FAMILY:
        from tests.tiny_mosaic_gpt.mosaic_gpt import MosaicGPT, MosaicGPTConfig

        MosaicGPTConfig.register_for_auto_class()  # save_pretrained writes the code beside the weights
        MosaicGPT.register_for_auto_class("AutoModelForCausalLM")
        return MosaicGPT(MosaicGPTConfig(**mpt_sizes, mlp_ratio=ratio))
    raise ValueError(f"unknown family {spec.family!r}; choose one of {', '.join(FAMILIES)}")


def vision_config(spec: TinyModelSpec) -> dict:
    """An open_clip config for a ``local-dir:`` vision tower (the text tower is tiny and unused)."""
    return {
        "model_cfg": {
            "embed_dim": 32,
            "quick_gelu": True,
            "vision_cfg": {
                "image_size": spec.image_size,
                "layers": spec.vision_layers,
                "width": spec.vision_width,
                "patch_size": spec.vision_patch,
                "head_width": 32,
            },
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {
            "mean": list(open_clip.OPENAI_DATASET_MEAN),
            "std": list(open_clip.OPENAI_DATASET_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def build_flamingo_checkpoint(
    spec: TinyModelSpec, lm: PreTrainedModel, vocab_with_specials: int
) -> dict[str, torch.Tensor]:
    """Trained Flamingo tensors under upstream's saved names, with non-zero gates.

    Upstream initialises the gates at 0, which would make the model ignore its images.
    """
    from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler

    lang_dim = spec.hidden
    layers_attr = {
        "llama": "model.layers",
        "gptneox": "gpt_neox.layers",
        "mpt": "transformer.blocks",
        REMOTE_CODE_FAMILY: "transformer.blocks",
    }[spec.family]
    state: dict[str, torch.Tensor] = {}
    perceiver = PerceiverResampler(dim=spec.vision_width)
    state.update({f"perceiver.{k}": v for k, v in perceiver.state_dict().items()})
    for index in range(spec.layers):
        if (index + 1) % spec.cross_attn_every_n_layers:
            continue
        block = GatedCrossAttentionBlock(dim=lang_dim, dim_visual=spec.vision_width)
        with torch.no_grad():
            block.attn_gate.fill_(0.7 + 0.05 * index)
            block.ff_gate.fill_(0.4 + 0.05 * index)
        prefix = f"lang_encoder.{layers_attr}.{index}.gated_cross_attn_layer."
        state.update({prefix + k: v for k, v in block.state_dict().items()})
    # Input embeddings are trained and saved; untied output embeddings are saved too, so that the
    # rows for the added tokens are the same in every model built from this directory.
    embed_names = {
        "llama": ("model.embed_tokens", "lm_head"),
        "gptneox": ("gpt_neox.embed_in", "embed_out"),
        "mpt": ("transformer.wte", None),
        REMOTE_CODE_FAMILY: ("transformer.wte", None),
    }
    input_name, output_name = embed_names[spec.family]
    tables = [(input_name, lm.get_submodule(input_name).weight.detach())]
    if output_name is not None:
        tables.append((output_name, lm.get_output_embeddings().weight.detach()))
    for name, table in tables:
        extra = torch.randn(vocab_with_specials - table.shape[0], table.shape[1]) * table.std()
        state[f"lang_encoder.{name}.weight"] = torch.cat([table, extra]).contiguous()
    return state


def write_language_model(out_dir: Path, spec: TinyModelSpec) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A plain causal LM directory (weights and tokenizer, as a hub repository holds them), with
    ``spec.seed``'s random weights: a model of one shape under another seed is another model."""
    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer(spec)
    lm = build_language_model(spec, tokenizer)
    lm.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return lm, tokenizer


def write_model(out_dir: Path, spec: TinyModelSpec) -> Path:
    """Write the model directory and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Upstream recognises MPT-1B by this name in the path (and adds the embedding accessors it lacks).
    lm_dir = "mpt-1b-redpajama-200b" if spec.family == REMOTE_CODE_FAMILY else "lm"
    lm, tokenizer = write_language_model(out_dir / lm_dir, spec)

    vision_dir = out_dir / "vision"
    vision_dir.mkdir(exist_ok=True)
    config = vision_config(spec)
    (vision_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    clip = open_clip.model.CLIP(**config["model_cfg"])
    torch.save(clip.state_dict(), vision_dir / "open_clip_pytorch_model.bin")

    # Upstream adds "<|endofchunk|>", "<image>" and, for tokenizers without one, "<PAD>".
    added = 2 + (tokenizer.pad_token is None)
    checkpoint = build_flamingo_checkpoint(spec, lm, len(tokenizer) + added)
    torch.save(checkpoint, out_dir / "checkpoint.pt")

    manifest = {
        "clip_vision_encoder_path": "local-dir:vision",
        "clip_vision_encoder_pretrained": None,
        "lang_encoder_path": lm_dir,
        "tokenizer_path": lm_dir,
        "cross_attn_every_n_layers": spec.cross_attn_every_n_layers,
        "checkpoint": "checkpoint.pt",
    }
    if spec.family == REMOTE_CODE_FAMILY:
        manifest["trust_remote_code"] = True
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--family", choices=(*FAMILIES, REMOTE_CODE_FAMILY), required=True)
    defaults = TinyModelSpec(family="llama")
    for name in (
        "hidden",
        "layers",
        "heads",
        "intermediate",
        "vocab",
        "max_positions",
        "cross_attn_every_n_layers",
        "vision_width",
        "vision_layers",
        "seed",
    ):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    args = vars(parser.parse_args())
    out_dir = args.pop("out_dir")
    write_model(out_dir, TinyModelSpec(**args))
    print(out_dir)


if __name__ == "__main__":
    main()
