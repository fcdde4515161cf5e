"""A checkpoint's trained layers on another language model of the same shape (``model.language_model``)."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.config import ModelSettings
from core.errors import ModelLoadError
from core.generation import GenerationParams
from core.model import loading, resources
from core.model.engine import FlamingoEngine
from core.model.footprint import parameter_counts
from core.model.loading import LoadedModel, load_model, with_embedding_accessors
from core.model.registry import REGISTRY, resolve_model, transferred_name
from core.model.resources import GIB, load_checked
from core.prompts import Task
from tests.helpers.settings import tiny_settings
from tests.make_tiny_model import TinyModelSpec, write_language_model

# The tiny tokenizers' own vocabulary; Flamingo's <|endofchunk|>, <image> and <PAD> follow it.
OWN_VOCABULARY = 400


def _on(model_dir: Path, language_model: Path) -> LoadedModel:
    return load_model(ModelSettings(name=str(model_dir), language_model=str(language_model), device="cpu"))


@pytest.fixture(scope="module")
def transferred(model_dirs, other_language_models) -> LoadedModel:
    return _on(model_dirs["llama"], other_language_models["twin"])


def test_the_layers_on_another_language_model_are_named_so(transferred, model_dirs, other_language_models):
    twin = other_language_models["twin"].resolve()
    assert transferred.spec.name == f"{model_dirs['llama'].resolve()} with {twin} as its language model"
    assert transferred.spec.transferred_from == resolve_model(str(model_dirs["llama"]))
    assert (transferred.spec.lang_encoder_path, transferred.spec.tokenizer_path) == (str(twin), str(twin))


def test_the_checkpoints_trained_layers_are_loaded(transferred, model_dirs):
    checkpoint = torch.load(model_dirs["llama"] / "checkpoint.pt")
    model = transferred.model
    assert torch.equal(model.perceiver.latents, checkpoint["perceiver.latents"])
    gated = model.lang_encoder.gated_cross_attn_layers[1]
    saved = "lang_encoder.model.layers.1.gated_cross_attn_layer."
    assert torch.equal(gated.attn_gate, checkpoint[saved + "attn_gate"])
    assert torch.equal(gated.attn.to_q.weight, checkpoint[saved + "attn.to_q.weight"])


def test_the_language_model_keeps_its_own_weights_but_the_rows_of_flamingos_tokens(
    transferred, model_dirs, other_language_models
):
    checkpoint = torch.load(model_dirs["llama"] / "checkpoint.pt")
    own = AutoModelForCausalLM.from_pretrained(other_language_models["twin"])
    lm = transferred.model.lang_encoder
    assert torch.equal(lm.model.norm.weight, own.model.norm.weight)
    assert torch.equal(lm.model.layers[0].decoder_layer.mlp.up_proj.weight, own.model.layers[0].mlp.up_proj.weight)
    tables = {
        "model.embed_tokens": (lm.model.embed_tokens.weight, own.model.embed_tokens.weight),
        "lm_head": (lm.lm_head.weight, own.lm_head.weight),
    }
    for saved, (table, own_table) in tables.items():
        assert torch.equal(table[:OWN_VOCABULARY], own_table)
        assert torch.equal(table[OWN_VOCABULARY:], checkpoint[f"lang_encoder.{saved}.weight"][OWN_VOCABULARY:])


def test_a_tokenizer_with_a_pad_token_of_its_own_gets_the_trained_rows_where_its_flamingo_tokens_are(
    model_dirs, other_language_models, tmp_path
):
    """As alpaca-native, whose tokenizer has a [PAD] where LLaMA's has none: Flamingo's tokens come one id later."""
    padded = tmp_path / "padded"
    tokenizer = AutoTokenizer.from_pretrained(other_language_models["twin"])
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    own = AutoModelForCausalLM.from_pretrained(other_language_models["twin"])
    own.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    own.save_pretrained(padded)
    tokenizer.save_pretrained(padded)
    loaded = _on(model_dirs["llama"], padded)
    checkpoint = torch.load(model_dirs["llama"] / "checkpoint.pt")["lang_encoder.model.embed_tokens.weight"]
    table = loaded.model.lang_encoder.model.embed_tokens.weight
    assert len(table) == len(checkpoint) == OWN_VOCABULARY + 3
    assert torch.equal(table[: OWN_VOCABULARY + 1], own.model.embed_tokens.weight)  # its [PAD] too
    assert torch.equal(table[OWN_VOCABULARY + 1 :], checkpoint[OWN_VOCABULARY : OWN_VOCABULARY + 2])
    assert loaded.model.media_token_id == OWN_VOCABULARY + 2


def test_two_language_models_of_one_shape_answer_differently_under_the_same_layers(
    transferred, model_dirs, llama_engine, photos
):
    settings = tiny_settings(model_dirs["llama"])
    other = FlamingoEngine(transferred, settings)
    task = Task("t", "", "<image>Output:", ())
    params = GenerationParams(max_new_tokens=8)
    answers = [
        engine.run(engine.prepare([photos["rocket"]], "<image>Output:", task, params)).token_ids
        for engine in (llama_engine, other)
    ]
    assert answers[0] != answers[1]
    assert other.status().model == transferred.spec.name


def test_a_language_model_of_another_shape_is_refused_in_one_line_before_any_weights(
    model_dirs, other_language_models, monkeypatch
):
    monkeypatch.setattr(loading, "_load_vision", lambda spec: pytest.fail("weights were loaded"))
    small = other_language_models["small"].resolve()
    with pytest.raises(ModelLoadError) as refused:
        _on(model_dirs["llama"], small)
    assert str(refused.value) == (
        f"cannot put the layers of {model_dirs['llama'].resolve()} on {small}: hidden size 64 vs 32, layer count 4 vs 2"
    )


def test_a_language_model_of_another_architecture_is_refused(model_dirs, monkeypatch):
    monkeypatch.setattr(loading, "_load_vision", lambda spec: pytest.fail("weights were loaded"))
    with pytest.raises(ModelLoadError, match=r"on .*/gptneox/lm: architecture llama vs gpt_neox$"):
        _on(model_dirs["llama"], model_dirs["gptneox"] / "lm")


def test_language_model_tensors_the_checkpoint_holds_are_skipped_and_said_so(
    model_dirs, other_language_models, tmp_path, caplog
):
    variant = tmp_path / "m"
    shutil.copytree(model_dirs["llama"], variant)
    checkpoint = torch.load(variant / "checkpoint.pt")
    original = AutoModelForCausalLM.from_pretrained(model_dirs["llama"] / "lm")
    checkpoint["lang_encoder.model.norm.weight"] = original.model.norm.weight.detach() + 1
    torch.save(checkpoint, variant / "checkpoint.pt")
    with caplog.at_level(logging.INFO, logger="core.model.checkpoint"):
        loaded = _on(variant, other_language_models["twin"])
    twin = AutoModelForCausalLM.from_pretrained(other_language_models["twin"])
    assert torch.equal(loaded.model.lang_encoder.model.norm.weight, twin.model.norm.weight)
    assert (
        "The language model keeps its own weights for 1 tensors in the checkpoint: lang_encoder.model.norm.weight"
        in (caplog.text)
    )


def test_the_transferred_language_model_is_what_is_sized(model_dirs, other_language_models):
    original = parameter_counts(resolve_model(str(model_dirs["llama"])))
    on_small = parameter_counts(
        resolve_model(str(model_dirs["llama"]), language_model=str(other_language_models["small"]))
    )
    assert on_small.language_linear < original.language_linear


def test_the_memory_check_before_loading_names_the_transferred_model(model_dirs, other_language_models, monkeypatch):
    monkeypatch.setattr(resources, "_available_memory", lambda device: GIB // 2)
    settings = ModelSettings(
        name=str(model_dirs["llama"]), language_model=str(other_language_models["twin"]), device="cpu"
    )
    named = f"{model_dirs['llama'].resolve()} with {other_language_models['twin'].resolve()} as its language model"
    with pytest.raises(ModelLoadError, match=f"^{re.escape(named)} in fp32 needs 0.0 GiB "):
        load_checked(settings)


def test_a_registry_language_model_keeps_its_pinned_revision_and_code():
    langinstruct = REGISTRY["openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct"]
    spec = resolve_model("openflamingo/OpenFlamingo-3B-vitl-mpt1b", language_model=langinstruct.lang_encoder_path)
    assert spec.name == transferred_name("openflamingo/OpenFlamingo-3B-vitl-mpt1b", langinstruct.lang_encoder_path)
    assert (spec.lang_encoder_revision, spec.trust_remote_code) == (langinstruct.lang_encoder_revision, True)
    assert spec.checkpoint_repo == "openflamingo/OpenFlamingo-3B-vitl-mpt1b"


def test_another_hub_language_model_runs_no_code_of_its_own():
    spec = resolve_model("openflamingo/OpenFlamingo-9B-vitl-mpt7b", language_model="mosaicml/mpt-7b-instruct")
    assert (spec.lang_encoder_revision, spec.trust_remote_code) == (None, False)


def test_for_the_v1_9b_the_language_model_replaces_llama_path_which_it_is_compared_with():
    spec = resolve_model("openflamingo/OpenFlamingo-9B", "/models/llama-7b", "chavinlo/alpaca-native")
    assert spec.lang_encoder_path == "chavinlo/alpaca-native"
    assert spec.transferred_from is not None and spec.transferred_from.lang_encoder_path == "/models/llama-7b"


@pytest.mark.parametrize("family", ["gptneox", "mpt", "mosaicgpt"])
def test_every_family_keeps_its_own_vocabulary_and_takes_the_checkpoints_token_rows(family, model_dirs, tmp_path):
    own, _ = write_language_model(tmp_path / "twin", TinyModelSpec(family=family, seed=1))
    loaded = _on(model_dirs[family], tmp_path / "twin")
    checkpoint = torch.load(model_dirs[family] / "checkpoint.pt")
    table = loaded.model.lang_encoder.get_input_embeddings().weight
    saved = next(value for key, value in checkpoint.items() if key.endswith(("embed_in.weight", "wte.weight")))
    assert torch.equal(table[:OWN_VOCABULARY], with_embedding_accessors(own).get_input_embeddings().weight)
    assert torch.equal(table[OWN_VOCABULARY:], saved[OWN_VOCABULARY:])


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_a_quantized_or_half_precision_language_model_takes_the_trained_rows_too(
    precision, model_dirs, other_language_models
):
    settings = ModelSettings(
        name=str(model_dirs["llama"]),
        language_model=str(other_language_models["twin"]),
        precision=precision,
        device="cpu",
    )
    loaded = load_model(settings)
    checkpoint = torch.load(model_dirs["llama"] / "checkpoint.pt")["lang_encoder.model.embed_tokens.weight"]
    table = loaded.model.lang_encoder.model.embed_tokens.weight
    assert torch.equal(table[OWN_VOCABULARY:], checkpoint[OWN_VOCABULARY:].to(table.dtype))
