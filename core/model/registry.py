"""Which files make up each OpenFlamingo model: the released checkpoints by name, or a local directory.

Registry entries follow the upstream README's model table and each model card on the Hugging Face
Hub (https://huggingface.co/openflamingo): every model pairs the open_clip ``ViT-L-14`` vision tower
(``openai`` weights) with a causal LM, loads the LM's own tokenizer, and keeps the trained Flamingo
parameters in ``checkpoint.pt`` of the model's repository.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import ModelLoadError

MANIFEST_NAME = "flamingo.json"
CHECKPOINT_FILE = "checkpoint.pt"
_VISION = ("ViT-L-14", "openai")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to assemble one Flamingo model.

    Paths are Hugging Face Hub ids, or absolute local paths for a local model directory.
    ``lang_encoder_revision`` pins the LM repository; it is required whenever
    ``trust_remote_code`` is set for a hub id, so no unpinned hub code ever runs (a local
    folder's code is the operator's own).
    """

    name: str
    clip_vision_encoder_path: str
    clip_vision_encoder_pretrained: str | None
    lang_encoder_path: str
    tokenizer_path: str
    cross_attn_every_n_layers: int
    checkpoint_repo: str | None
    checkpoint_path: str
    lang_encoder_revision: str | None = None
    trust_remote_code: bool = False
    # Set when the checkpoint's layers sit on another language model: the model as released, whose
    # language model they were trained with (its config and tokenizer are what the new one must match).
    transferred_from: ModelSpec | None = None

    def __post_init__(self) -> None:
        local = Path(self.lang_encoder_path).is_dir()
        if self.trust_remote_code and not self.lang_encoder_revision and not local:
            raise ValueError(f"{self.name}: remote code must be pinned to a revision")


# MPT-1B (MosaicGPT) has QK-LayerNorm, which transformers' native MPT lacks, so it needs its remote
# code, pinned to the commits that were the repositories' heads when the checkpoints were released.
_MPT1B_REVISION = "50d6bc94e17812873f39c36c5f815263fa71fb80"
_MPT1B_DOLLY_REVISION = "f0a13e41fcee2217cd701219ffa1eaef7fe955ea"
# anas-awadalla/mpt-7b mirrors mosaicml/mpt-7b (model_type "mpt"); transformers' native
# MptForCausalLM reads the same weight names, so no remote code runs. Pinned to its weights commit.
_MPT7B_REVISION = "b772e556c8e8a17d087db6935e7cd019e5eefb0f"

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # https://huggingface.co/openflamingo/OpenFlamingo-3B-vitl-mpt1b
        ModelSpec(
            "openflamingo/OpenFlamingo-3B-vitl-mpt1b",
            *_VISION,
            "anas-awadalla/mpt-1b-redpajama-200b",
            "anas-awadalla/mpt-1b-redpajama-200b",
            1,
            "openflamingo/OpenFlamingo-3B-vitl-mpt1b",
            CHECKPOINT_FILE,
            lang_encoder_revision=_MPT1B_REVISION,
            trust_remote_code=True,
        ),
        # https://huggingface.co/openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct
        ModelSpec(
            "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct",
            *_VISION,
            "anas-awadalla/mpt-1b-redpajama-200b-dolly",
            "anas-awadalla/mpt-1b-redpajama-200b-dolly",
            1,
            "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct",
            CHECKPOINT_FILE,
            lang_encoder_revision=_MPT1B_DOLLY_REVISION,
            trust_remote_code=True,
        ),
        # https://huggingface.co/openflamingo/OpenFlamingo-4B-vitl-rpj3b
        ModelSpec(
            "openflamingo/OpenFlamingo-4B-vitl-rpj3b",
            *_VISION,
            "togethercomputer/RedPajama-INCITE-Base-3B-v1",
            "togethercomputer/RedPajama-INCITE-Base-3B-v1",
            2,
            "openflamingo/OpenFlamingo-4B-vitl-rpj3b",
            CHECKPOINT_FILE,
        ),
        # https://huggingface.co/openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct
        ModelSpec(
            "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct",
            *_VISION,
            "togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
            "togethercomputer/RedPajama-INCITE-Instruct-3B-v1",
            2,
            "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct",
            CHECKPOINT_FILE,
        ),
        # https://huggingface.co/openflamingo/OpenFlamingo-9B-vitl-mpt7b
        ModelSpec(
            "openflamingo/OpenFlamingo-9B-vitl-mpt7b",
            *_VISION,
            "anas-awadalla/mpt-7b",
            "anas-awadalla/mpt-7b",
            4,
            "openflamingo/OpenFlamingo-9B-vitl-mpt7b",
            CHECKPOINT_FILE,
            lang_encoder_revision=_MPT7B_REVISION,
        ),
        # v1, https://huggingface.co/openflamingo/OpenFlamingo-9B-deprecated (formerly
        # openflamingo/OpenFlamingo-9B): LLaMA-7B in Hugging Face format from a configurable path.
        ModelSpec(
            "openflamingo/OpenFlamingo-9B",
            *_VISION,
            "huggyllama/llama-7b",
            "huggyllama/llama-7b",
            4,
            "openflamingo/OpenFlamingo-9B-deprecated",
            CHECKPOINT_FILE,
        ),
    )
}
_V1_NAME = "openflamingo/OpenFlamingo-9B"
ALIASES = {"openflamingo/OpenFlamingo-9B-deprecated": _V1_NAME}


class LocalManifest(BaseModel):
    """``flamingo.json`` of a local model directory; relative paths are relative to it."""

    model_config = ConfigDict(extra="forbid")

    clip_vision_encoder_path: str = Field(description="open_clip name, or local-dir:RELATIVE_DIR")
    clip_vision_encoder_pretrained: str | None = None
    lang_encoder_path: str
    tokenizer_path: str
    cross_attn_every_n_layers: int = Field(gt=0)
    checkpoint: str = CHECKPOINT_FILE
    trust_remote_code: bool = Field(False, description="Run the language model's own code (MPT-1B's MosaicGPT).")
    lang_encoder_revision: str | None = Field(None, description="Required with trust_remote_code for a hub id.")


def _local_path(base: Path, value: str) -> str:
    """Resolve a manifest path against its directory; hub ids (not existing locally) pass through."""
    prefix = "local-dir:" if value.startswith("local-dir:") else ""
    candidate = base / value.removeprefix(prefix)
    if prefix or candidate.exists():
        return prefix + str(candidate.resolve())
    return value


def spec_from_directory(directory: Path) -> ModelSpec:
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = LocalManifest.model_validate(json.loads(manifest_path.read_text()))
    except (OSError, ValueError, ValidationError) as error:
        detail = str(error).splitlines()[0]
        raise ModelLoadError(f"cannot read model manifest {manifest_path}: {detail}") from None
    try:
        return _local_spec(directory, manifest)
    except ValueError as error:
        raise ModelLoadError(f"{manifest_path}: {error}") from None


def _local_spec(directory: Path, manifest: LocalManifest) -> ModelSpec:
    pretrained = manifest.clip_vision_encoder_pretrained
    if pretrained and (directory / pretrained).exists():
        pretrained = str((directory / pretrained).resolve())
    return ModelSpec(
        name=str(directory.resolve()),
        clip_vision_encoder_path=_local_path(directory, manifest.clip_vision_encoder_path),
        clip_vision_encoder_pretrained=pretrained,
        lang_encoder_path=_local_path(directory, manifest.lang_encoder_path),
        tokenizer_path=_local_path(directory, manifest.tokenizer_path),
        cross_attn_every_n_layers=manifest.cross_attn_every_n_layers,
        checkpoint_repo=None,
        checkpoint_path=str((directory / manifest.checkpoint).resolve()),
        lang_encoder_revision=manifest.lang_encoder_revision,
        trust_remote_code=manifest.trust_remote_code,
    )


def resolve_model(name_or_dir: str, llama_path: str | None = None, language_model: str | None = None) -> ModelSpec:
    """A registry name (or alias) or a directory with ``flamingo.json``, its trained layers on
    ``language_model`` when one is given (see ``on_language_model``)."""
    spec = _released(name_or_dir, llama_path)
    return spec if language_model is None else on_language_model(spec, language_model)


def _released(name_or_dir: str, llama_path: str | None) -> ModelSpec:
    directory = Path(name_or_dir).expanduser()
    if (directory / MANIFEST_NAME).is_file():
        return spec_from_directory(directory)
    name = ALIASES.get(name_or_dir, name_or_dir)
    if name not in REGISTRY:
        if directory.is_dir():
            raise ModelLoadError(f"{name_or_dir} is a directory but has no {MANIFEST_NAME}")
        known = ", ".join(REGISTRY)
        raise ModelLoadError(f"unknown model {name_or_dir!r}: use a local model directory or one of {known}")
    spec = REGISTRY[name]
    if name == _V1_NAME and llama_path:
        spec = replace(spec, lang_encoder_path=llama_path, tokenizer_path=llama_path)
    return spec


def transferred_name(model: str, language_model: str) -> str:
    """How a checkpoint's layers on another language model are named wherever a model is shown."""
    return f"{model} with {language_model} as its language model"


def on_language_model(spec: ModelSpec, language_model: str) -> ModelSpec:
    """``spec``'s checkpoint on another causal LM (hub id or directory), with that LM's own tokenizer.

    The language model of a registry entry is pinned to that entry's revision and runs its code as the
    entry does; any other hub id runs no code of its own. A local directory may run its own code when
    the checkpoint's language model does, as the same architecture then needs it (the operator's own).
    Naming the checkpoint's own language model is a transfer too, to the model as released but for any
    rows of its own vocabulary that training changed (upstream trains only those of Flamingo's tokens).
    """
    directory = Path(language_model).expanduser()
    if directory.is_dir():
        path, revision, remote_code = str(directory.resolve()), None, spec.trust_remote_code
    else:
        known = next((entry for entry in REGISTRY.values() if entry.lang_encoder_path == language_model), None)
        path = language_model
        revision = known.lang_encoder_revision if known else None
        remote_code = known.trust_remote_code if known else False
    return replace(
        spec,
        name=transferred_name(spec.name, path),
        lang_encoder_path=path,
        tokenizer_path=path,
        lang_encoder_revision=revision,
        trust_remote_code=remote_code,
        transferred_from=spec,
    )
