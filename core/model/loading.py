"""Assemble an OpenFlamingo model from its parts, in one explicit dtype, optionally quantized.

Upstream's ``create_model_and_transforms`` is not used: it runs hub code unpinned, takes no dtype or
quantization, and prints to stdout. Its model classes (``Flamingo``, ``FlamingoLMMixin``) are reused.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Protocol, cast

import open_clip
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from open_flamingo.src.utils import extend_instance
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from core.config import ModelSettings
from core.errors import ModelLoadError
from core.model.checkpoint import keep_language_model, read_state_dict, select_checkpoint_tensors
from core.model.hub import check_tokenizer_reachable, progress_bars_for, unreachable
from core.model.layers.flamingo_layer import install as install_reusable_media_layers
from core.model.registry import ModelSpec, resolve_model
from core.prompts import END_OF_CHUNK, IMAGE_TOKEN

log = logging.getLogger(__name__)

# Where each supported LM family keeps its list of decoder blocks, matched on the class name.
_DECODER_LAYERS = {
    "llama": "model.layers",
    "gptneox": "gpt_neox.layers",
    "mpt": "transformer.blocks",
    "mosaicgpt": "transformer.blocks",
}
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError, HfHubHTTPError)
_PAD = "<PAD>"


@dataclass(frozen=True)
class PrecisionPlan:
    """One compute dtype for every part; the LM's linear layers may additionally be quantized."""

    name: str
    dtype: torch.dtype
    quantization: BitsAndBytesConfig | None = None


def plan_precision(precision: str, device: torch.device) -> PrecisionPlan:
    on_gpu = device.type == "cuda"
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    floats = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in floats:
        return PrecisionPlan(precision, floats[precision])
    if precision == "int8":
        # LLM.int8() multiplies in fp16; feeding it fp16 avoids a cast on every matmul.
        return PrecisionPlan(precision, torch.float16, BitsAndBytesConfig(load_in_8bit=True))
    if precision == "nf4":
        dtype = torch.bfloat16 if on_gpu else torch.float32
        return PrecisionPlan(
            precision,
            dtype,
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype),
        )
    raise ModelLoadError(f"unknown precision {precision!r}: use auto, fp32, bf16, fp16, int8 or nf4")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda was asked for but no GPU is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {name} was asked for but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


@dataclass
class LoadedModel:
    model: Flamingo
    tokenizer: PreTrainedTokenizerBase
    image_transform: Callable[[Image.Image], torch.Tensor]
    spec: ModelSpec
    precision: PrecisionPlan
    device: torch.device
    context_length: int
    language_model_bytes: int
    load_seconds: float

    @property
    def total_bytes(self) -> int:
        """The weights' memory, with the scales bitsandbytes keeps beside its quantized parameters."""
        held = (t for p in (*self.model.parameters(), *self.model.buffers()) for t in tensors_held(p))
        tensors = {id(t): t for t in held}
        return sum(t.nelement() * t.element_size() for t in tensors.values())


def tensors_held(parameter: torch.Tensor) -> Iterator[torch.Tensor]:
    """A parameter and its quantization state: 4-bit block scales (one per 64 weights, nested when
    double-quantized) and int8 row scales, which are attributes, not parameters."""
    yield parameter
    state = getattr(parameter, "quant_state", None)
    while state is not None:
        yield from (t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor))
        state = state.state2
    scales = getattr(parameter, "SCB", None)
    if isinstance(scales, torch.Tensor):
        yield scales


def _fetch_checkpoint(spec: ModelSpec) -> str:
    if spec.checkpoint_repo is None:
        return spec.checkpoint_path
    return hf_hub_download(spec.checkpoint_repo, spec.checkpoint_path)


def _load_vision(spec: ModelSpec) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], int]:
    """The CLIP tower as OpenFlamingo was trained with it, under the open_clip pinned here.

    Since open_clip 2.29, ``pretrained="openai"`` builds GELU where those weights were trained with
    QuickGELU (only a warning says so); since 2.23 the tokens come out after ``ln_post``, where
    OpenFlamingo's perceiver was trained on them before it. Both are put back.
    """
    name, tag = spec.clip_vision_encoder_path, spec.clip_vision_encoder_pretrained
    trained_with_quick_gelu = bool(tag and open_clip.get_pretrained_cfg(name, tag).get("quick_gelu"))
    clip, _, transform = open_clip.create_model_and_transforms(
        name, pretrained=tag, force_quick_gelu=trained_with_quick_gelu
    )
    visual = as_trained(clip.visual)
    width = open_clip.get_model_config(name)["vision_cfg"]["width"]
    return visual, transform, width


class _VisionTower(Protocol):
    """The switches of open_clip's (untyped) ``VisionTransformer`` that ``as_trained`` sets."""

    output_tokens: bool
    final_ln_after_pool: bool


def as_trained(visual: torch.nn.Module) -> torch.nn.Module:
    """Patch tokens as OpenFlamingo's training saw them: before the final layer norm."""
    switches = cast(_VisionTower, visual)  # nn.Module types its attributes as tensors or modules only
    switches.output_tokens = True
    switches.final_ln_after_pool = True
    return visual


def _load_failure(part: str, spec: ModelSpec, error: BaseException) -> ModelLoadError:
    """One line: the hub out of reach (the connection may go after the first look), or the loader's own words."""
    text = str(error).strip()
    detail = text.splitlines()[0] if text else type(error).__name__
    return unreachable(error) or ModelLoadError(f"cannot load the {part} of {spec.name}: {detail}")


def spec_of(settings: ModelSettings) -> ModelSpec:
    """The model the settings name, on ``model.language_model`` when one is set."""
    return resolve_model(settings.name, settings.llama_path, settings.language_model)


def load_text_side(settings: ModelSettings) -> tuple[PreTrainedTokenizerBase, int]:
    """The tokenizer and context length alone, without weights: for a process whose model runs elsewhere."""
    spec = spec_of(settings)
    check_tokenizer_reachable(spec)
    try:
        config = AutoConfig.from_pretrained(
            spec.lang_encoder_path, revision=spec.lang_encoder_revision, trust_remote_code=spec.trust_remote_code
        )
        return load_tokenizer(spec), context_length_of(config)
    except _LOAD_ERRORS as error:
        raise _load_failure("tokenizer", spec, error) from None


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_path, revision=spec.lang_encoder_revision)
    # Same tokens in the same order as upstream, so ids match the trained embedding rows.
    tokenizer.add_special_tokens({"additional_special_tokens": [END_OF_CHUNK, IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": _PAD})
    return tokenizer


@dataclass(frozen=True)
class LanguageModelShape:
    """What a checkpoint's trained layers need of the language model under them."""

    architecture: str
    hidden_size: int
    layers: int
    vocabulary: int  # with Flamingo's tokens: the embedding tables' rows
    # Not compared: the ids Flamingo's tokens got, which differ when one tokenizer had a pad token of its own.
    flamingo_ids: dict[str, int]


# What must be equal, in words.
_SHAPE_WORDS = {
    "architecture": "architecture",
    "hidden_size": "hidden size",
    "layers": "layer count",
    "vocabulary": "vocabulary with Flamingo's tokens",
}


def _config_int(config: PretrainedConfig, *names: str) -> int:
    """A size under whichever name the family's config gives it (MosaicGPT maps no standard names)."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(config).__name__} has none of {', '.join(names)}")


def language_model_shape(spec: ModelSpec) -> LanguageModelShape:
    """From the LM's config and tokenizer alone, without its weights."""
    try:
        config = AutoConfig.from_pretrained(
            spec.lang_encoder_path, revision=spec.lang_encoder_revision, trust_remote_code=spec.trust_remote_code
        )
        tokenizer = load_tokenizer(spec)
        vocabulary = tokenizer.get_vocab()
        return LanguageModelShape(
            config.model_type,
            _config_int(config, "hidden_size", "d_model", "n_embd"),
            _config_int(config, "num_hidden_layers", "n_layers", "n_layer"),
            len(tokenizer),
            {token: vocabulary[token] for token in (END_OF_CHUNK, IMAGE_TOKEN, _PAD) if token in vocabulary},
        )
    except _LOAD_ERRORS as error:
        raise _load_failure("language model", spec, error) from None


def check_transfer(spec: ModelSpec) -> dict[int, int]:
    """For a checkpoint's layers on another language model: refuse, in one line naming what differs,
    one they do not fit (another architecture, hidden size, layer count or vocabulary size), else
    return where the checkpoint's trained rows of Flamingo's tokens go in the new model's embeddings
    (checkpoint row to model row; ``<PAD>`` only where both tokenizers hold it)."""
    original = spec.transferred_from
    if original is None:
        return {}
    theirs, ours = language_model_shape(original), language_model_shape(spec)
    differences = [
        f"{words} {getattr(theirs, name)} vs {getattr(ours, name)}"
        for name, words in _SHAPE_WORDS.items()
        if getattr(theirs, name) != getattr(ours, name)
    ]
    if differences:
        raise ModelLoadError(
            f"cannot put the layers of {original.name} on {spec.lang_encoder_path}: {', '.join(differences)}"
        )
    log.info("Putting the trained layers of %s on %s", original.name, spec.lang_encoder_path)
    return {theirs.flamingo_ids[token]: row for token, row in ours.flamingo_ids.items() if token in theirs.flamingo_ids}


class _HasWte(Protocol):
    """MosaicGPT's transformer body, holding the token embedding."""

    wte: torch.nn.Module


class _TransformerWteEmbeddings:
    """MosaicGPT (MPT-1B) lacks the embedding accessors that resizing and Flamingo need."""

    transformer: _HasWte  # MosaicGPT's own, on the model this is mixed into

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, embeddings: torch.nn.Module) -> None:
        self.transformer.wte = embeddings


def _load_language_model(spec: ModelSpec, plan: PrecisionPlan, device: torch.device) -> PreTrainedModel:
    kwargs: dict = {
        "dtype": plan.dtype,
        "revision": spec.lang_encoder_revision,
        "trust_remote_code": spec.trust_remote_code,
    }
    if plan.quantization is not None:
        kwargs |= {"quantization_config": plan.quantization, "device_map": {"": device}}
    return with_embedding_accessors(AutoModelForCausalLM.from_pretrained(spec.lang_encoder_path, **kwargs))


def with_embedding_accessors(lm: PreTrainedModel) -> PreTrainedModel:
    try:
        lm.get_input_embeddings()
    except NotImplementedError:
        extend_instance(lm, _TransformerWteEmbeddings)
    return lm


def embedding_table(layer: torch.nn.Module) -> torch.Tensor:
    """An input or output embedding's weight, which transformers' accessors type as a plain module's attribute."""
    return cast(torch.Tensor, layer.weight)  # nn.Module types attribute reads as ``Tensor | Module``


def embedding_tables(lm: PreTrainedModel) -> list[torch.Tensor]:
    """The input embeddings' table, and the output's when untied (tied, they are one tensor)."""
    found = (lm.get_input_embeddings(), lm.get_output_embeddings())
    tables = {id(table): table for table in (embedding_table(layer) for layer in found if layer is not None)}
    return list(tables.values())


def _resize_embeddings(lm: PreTrainedModel, vocab_size: int) -> None:
    """Fit the embeddings to the tokenizer, as upstream does, with deterministic new rows.

    Checkpoints do not always carry trained rows for the added tokens (untied output embeddings
    are frozen and not saved); the mean of the existing rows makes every start answer alike.
    """
    old_size = embedding_table(lm.get_input_embeddings()).shape[0]
    lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        for table in embedding_tables(lm):
            if table.shape[0] > old_size:
                table[old_size:] = table[:old_size].mean(dim=0)


def quantize_linears(module: torch.nn.Module, plan: PrecisionPlan, device: torch.device) -> int:
    """Swap every ``nn.Linear`` under ``module`` for bitsandbytes' int8 or nf4 layer holding its weights.

    Transformers quantizes only the language model it loads; the cross-attention layers Flamingo
    adds (about 1.1B parameters in the 9B models) would otherwise stay in 16 bits. The weights are
    quantized when the new layer moves to ``device``. Returns how many layers were swapped.
    """
    import bitsandbytes as bnb  # only with int8 or nf4: slow to import, and it warns about CPU kernels

    quantization = plan.quantization
    assert quantization is not None
    swapped = 0
    for name, child in list(module.named_children()):
        if not isinstance(child, torch.nn.Linear):
            swapped += quantize_linears(child, plan, device)
            continue
        has_bias = child.bias is not None
        # bitsandbytes quantizes a weight when it moves from the CPU to its device (int8 only then).
        weight = child.weight.data.cpu()
        layer: bnb.nn.Linear8bitLt | bnb.nn.Linear4bit
        if quantization.load_in_8bit:
            layer = bnb.nn.Linear8bitLt(
                child.in_features,
                child.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=quantization.llm_int8_threshold,
            )
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=has_bias,
                compute_dtype=quantization.bnb_4bit_compute_dtype,
                quant_type=quantization.bnb_4bit_quant_type,
                compress_statistics=quantization.bnb_4bit_use_double_quant,
            )
            layer.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                quant_type=quantization.bnb_4bit_quant_type,
                compress_statistics=quantization.bnb_4bit_use_double_quant,
            )
        if has_bias:
            layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
        setattr(module, name, layer.to(device))
        swapped += 1
    return swapped


def decoder_layers_attr(lm: PreTrainedModel) -> str:
    class_name = type(lm).__name__.lower()
    for family, attr in _DECODER_LAYERS.items():
        if family in class_name:
            return attr
    raise ModelLoadError(f"unsupported language model class {type(lm).__name__}")


def context_length_of(config: PretrainedConfig) -> int:
    for field in ("max_position_embeddings", "max_seq_len", "n_positions"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelLoadError(f"cannot tell the context length of {type(config).__name__}")


class _FlamingoLM(Protocol):
    """What assembling asks of upstream's (untyped) ``FlamingoLMMixin`` on the LM."""

    def set_decoder_layers_attr_name(self, decoder_layers_attr_name: str) -> None: ...


def assemble_flamingo(
    lm: PreTrainedModel,
    visual: torch.nn.Module,
    vision_width: int,
    tokenizer: PreTrainedTokenizerBase,
    cross_attn_every_n_layers: int,
) -> Flamingo:
    """Upstream's Flamingo around a loaded LM, with the decoder layers that reuse image keys/values."""
    extend_instance(lm, FlamingoLMMixin)
    cast(_FlamingoLM, lm).set_decoder_layers_attr_name(decoder_layers_attr(lm))  # the mixin just added
    model = Flamingo(
        SimpleNamespace(visual=visual),
        lm,
        eoc_token_id=tokenizer.convert_tokens_to_ids(END_OF_CHUNK),
        media_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vis_dim=vision_width,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
    )
    install_reusable_media_layers(lm)
    return model


def place_model(model: Flamingo, plan: PrecisionPlan, device: torch.device, quantize_cross_attention: bool) -> None:
    """Every part on the device in the plan's dtype (a quantized LM is placed by its loader), frozen."""
    lm = model.lang_encoder
    for part in (model.vision_encoder, model.perceiver, lm.gated_cross_attn_layers):
        part.to(device=device, dtype=plan.dtype)
    if plan.quantization is None:
        lm.to(device)
    elif quantize_cross_attention:
        quantize_linears(lm.gated_cross_attn_layers, plan, device)
    model.requires_grad_(False)
    model.eval()


def load_model(settings: ModelSettings) -> LoadedModel:
    """Build the model named in settings; every failure becomes one ``ModelLoadError`` line. The bot
    and ``describe`` load through ``core.model.resources.load_checked``, which looks at the hub and
    checks memory and disk first."""
    started = time.perf_counter()
    spec = spec_of(settings)
    device = pick_device(settings.device)
    plan = plan_precision(settings.precision, device)
    step = "vision encoder"
    with progress_bars_for(sys.stderr):
        flamingo_rows = check_transfer(spec)  # before any weights: a language model the layers do not fit

        try:
            log.info("Loading vision encoder %s", spec.clip_vision_encoder_path)
            visual, transform, vision_width = _load_vision(spec)
            step = "tokenizer"
            log.info("Loading tokenizer %s", spec.tokenizer_path)
            tokenizer = load_tokenizer(spec)
            step = "language model"
            log.info("Loading language model %s (%s)", spec.lang_encoder_path, plan.name)
            lm = _load_language_model(spec, plan, device)
            _resize_embeddings(lm, len(tokenizer))
            language_model_bytes = lm.get_memory_footprint()
            step = "checkpoint"
            log.info("Loading checkpoint %s", spec.checkpoint_path)
            checkpoint_file = _fetch_checkpoint(spec)
            checkpoint = read_state_dict(checkpoint_file)
            step = "assembled model"
            model = assemble_flamingo(lm, visual, vision_width, tokenizer, spec.cross_attn_every_n_layers)
            trained = [model.perceiver, lm.gated_cross_attn_layers]
            tensors = select_checkpoint_tensors(model, checkpoint, trained, source=checkpoint_file)
            if spec.transferred_from is not None:
                tensors = keep_language_model(model, tensors, lm, trained, embedding_tables(lm), flamingo_rows)
            model.load_state_dict(tensors, strict=False)
            place_model(model, plan, device, settings.quantize_cross_attention)
        except torch.OutOfMemoryError:
            raise ModelLoadError(
                f"not enough memory on {device} for the {step} of {spec.name} in {plan.name}; "
                'a smaller precision (model.precision = "int8" or "nf4") or a larger device may fit'
            ) from None
        except _LOAD_ERRORS as error:
            raise _load_failure(step, spec, error) from None
    elapsed = time.perf_counter() - started
    log.info("Model ready in %.1f s", elapsed)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        image_transform=transform,
        spec=spec,
        precision=plan,
        device=device,
        context_length=context_length_of(lm.config),
        language_model_bytes=language_model_bytes,
        load_seconds=elapsed,
    )
