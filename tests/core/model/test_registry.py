"""The checkpoint registry: all six released models, as their model cards describe them."""

from __future__ import annotations

import json

import pytest

from core.errors import ModelLoadError
from core.model.registry import MANIFEST_NAME, REGISTRY, resolve_model

# name -> (language model, cross_attn_every_n_layers), from the upstream README and model cards.
RELEASED = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": ("anas-awadalla/mpt-1b-redpajama-200b", 1),
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": ("anas-awadalla/mpt-1b-redpajama-200b-dolly", 1),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": ("togethercomputer/RedPajama-INCITE-Base-3B-v1", 2),
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": ("togethercomputer/RedPajama-INCITE-Instruct-3B-v1", 2),
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": ("anas-awadalla/mpt-7b", 4),
    "openflamingo/OpenFlamingo-9B": ("huggyllama/llama-7b", 4),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_models_are_registered_as_published(name):
    spec = resolve_model(name)
    language_model, every_n = RELEASED[name]
    assert (spec.lang_encoder_path, spec.tokenizer_path) == (language_model, language_model)
    assert spec.cross_attn_every_n_layers == every_n
    assert (spec.clip_vision_encoder_path, spec.clip_vision_encoder_pretrained) == ("ViT-L-14", "openai")
    assert spec.checkpoint_path == "checkpoint.pt"
    assert spec.checkpoint_repo.startswith("openflamingo/OpenFlamingo-")


def test_registry_holds_exactly_the_released_models():
    assert set(REGISTRY) == set(RELEASED)


def test_only_mosaicgpt_models_run_hub_code_and_it_is_pinned():
    remote = {name for name, spec in REGISTRY.items() if spec.trust_remote_code}
    assert remote == {"openflamingo/OpenFlamingo-3B-vitl-mpt1b", "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct"}
    for name in remote:
        assert len(REGISTRY[name].lang_encoder_revision) == 40


def test_v1_language_model_path_is_configurable():
    spec = resolve_model("openflamingo/OpenFlamingo-9B", llama_path="/models/llama-7b-hf")
    assert spec.lang_encoder_path == spec.tokenizer_path == "/models/llama-7b-hf"
    assert spec.checkpoint_repo == "openflamingo/OpenFlamingo-9B-deprecated"
    assert resolve_model("openflamingo/OpenFlamingo-9B-deprecated").name == "openflamingo/OpenFlamingo-9B"
    other = resolve_model("openflamingo/OpenFlamingo-9B-vitl-mpt7b", llama_path="/models/llama-7b-hf")
    assert other.lang_encoder_path == "anas-awadalla/mpt-7b"


def test_unpinned_remote_code_cannot_be_registered():
    with pytest.raises(ValueError, match="must be pinned"):
        type(REGISTRY["openflamingo/OpenFlamingo-4B-vitl-rpj3b"])(
            "x", "ViT-L-14", "openai", "a/b", "a/b", 1, None, "c.pt", trust_remote_code=True
        )


def test_unknown_model_names_the_choices():
    with pytest.raises(
        ModelLoadError, match=r"unknown model 'OpenFlamingo-10B'.*openflamingo/OpenFlamingo-9B-vitl-mpt7b"
    ):
        resolve_model("OpenFlamingo-10B")


def test_local_directory_paths_resolve_relative_to_it(model_dirs):
    spec = resolve_model(str(model_dirs["mpt"]))
    assert spec.clip_vision_encoder_path == f"local-dir:{model_dirs['mpt'] / 'vision'}"
    assert spec.lang_encoder_path == str(model_dirs["mpt"] / "lm")
    assert spec.checkpoint_path == str(model_dirs["mpt"] / "checkpoint.pt")
    assert spec.checkpoint_repo is None


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("{not json", r"cannot read model manifest .*flamingo\.json"),
        (
            json.dumps({"lang_encoder_path": "lm"}),
            r"cannot read model manifest .*flamingo\.json: \d+ validation errors",
        ),
        (
            json.dumps(
                {
                    "clip_vision_encoder_path": "v",
                    "lang_encoder_path": "l",
                    "tokenizer_path": "l",
                    "cross_attn_every_n_layers": 0,
                }
            ),
            r"cannot read model manifest",
        ),
    ],
    ids=["not-json", "missing-fields", "zero-spacing"],
)
def test_bad_manifests_are_refused(tmp_path, manifest, message):
    (tmp_path / MANIFEST_NAME).write_text(manifest)
    with pytest.raises(ModelLoadError, match=message):
        resolve_model(str(tmp_path))
