"""Strict checkpoint loading and the loader's promises (no warnings, no stdout, one-line errors)."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
import transformers

from core.config import ModelSettings
from core.errors import ModelLoadError
from core.model import loading
from core.model.loading import decoder_layers_attr, load_model, pick_device, with_embedding_accessors
from core.model.registry import resolve_model
from tests.helpers.settings import tiny_settings
from tests.make_tiny_model import MANIFEST_NAME, TinyModelSpec, write_model


def _variant(source: Path, target: Path, checkpoint: dict | None = None, **manifest_changes: object) -> Path:
    """A copy of a model directory with an edited checkpoint and manifest."""
    shutil.copytree(source, target)
    if checkpoint is not None:
        torch.save(checkpoint, target / "checkpoint.pt")
    manifest = json.loads((target / MANIFEST_NAME).read_text()) | manifest_changes
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))
    return target


def _load(directory: Path, precision: str = "fp32"):
    return load_model(ModelSettings(name=str(directory), precision=precision, device="cpu"))


def _checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / "checkpoint.pt")


@pytest.fixture(scope="module")
def every_layer_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA trained with cross-attention in every layer."""
    return write_model(tmp_path_factory.mktemp("n1") / "m", TinyModelSpec(family="llama", cross_attn_every_n_layers=1))


def test_the_right_checkpoint_loads_silently(model_dirs, caplog, capsys):
    transformers.utils.logging.enable_propagation()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            loaded = _load(model_dirs["llama"])
    finally:
        transformers.utils.logging.disable_propagation()
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert capsys.readouterr().out == ""
    gate = loaded.model.lang_encoder.gated_cross_attn_layers[1].attn_gate
    assert gate.item() == pytest.approx(0.75)


def test_checkpoint_built_with_other_cross_attention_spacing_is_refused(every_layer_dir, tmp_path):
    wrong = _variant(every_layer_dir, tmp_path / "wrong", cross_attn_every_n_layers=2)
    with pytest.raises(ModelLoadError) as refused:
        _load(wrong)
    message = str(refused.value)
    assert "\n" not in message
    assert str(wrong / "checkpoint.pt") in message
    assert "unexpected keys: lang_encoder.model.layers.0.gated_cross_attn_layer" in message


def test_model_expecting_more_cross_attention_than_trained_is_refused(model_dirs, tmp_path):
    wrong = _variant(model_dirs["llama"], tmp_path / "wrong", cross_attn_every_n_layers=1)
    with pytest.raises(ModelLoadError, match=r"trained tensors missing: lang_encoder\.model\.layers\.0\.gated_cross"):
        _load(wrong)


def test_missing_trained_tensor_is_refused(model_dirs, tmp_path):
    checkpoint = _checkpoint(model_dirs["llama"])
    del checkpoint["perceiver.latents"]
    with pytest.raises(ModelLoadError, match=r"1 trained tensors missing: perceiver\.latents$"):
        _load(_variant(model_dirs["llama"], tmp_path / "m", checkpoint))


def test_unknown_key_is_refused(model_dirs, tmp_path):
    checkpoint = _checkpoint(model_dirs["llama"]) | {"lang_encoder.adapter.weight": torch.zeros(2)}
    with pytest.raises(ModelLoadError, match=r"1 unexpected keys: lang_encoder\.adapter\.weight"):
        _load(_variant(model_dirs["llama"], tmp_path / "m", checkpoint))


def test_shape_mismatch_is_refused(model_dirs, tmp_path):
    checkpoint = _checkpoint(model_dirs["llama"])
    checkpoint["perceiver.latents"] = torch.zeros(64, 32)
    with pytest.raises(ModelLoadError, match=r"shape mismatches: perceiver\.latents \(64, 32\) vs \(64, 64\)"):
        _load(_variant(model_dirs["llama"], tmp_path / "m", checkpoint))


def test_stale_buffers_of_older_transformers_are_accepted(model_dirs, tmp_path):
    layer = "lang_encoder.gpt_neox.layers.0.decoder_layer.attention"
    checkpoint = _checkpoint(model_dirs["gptneox"]) | {
        f"{layer}.bias": torch.ones(1, 1, 8, 8, dtype=torch.bool),
        f"{layer}.masked_bias": torch.tensor(-1e9),
        f"{layer}.rotary_emb.inv_freq": torch.ones(4),
        # The v1 9B was saved with Hugging Face's CLIP, whose position ids are an int64 buffer.
        "vision_encoder.vision_model.embeddings.position_ids": torch.arange(257)[None],
    }
    loaded = _load(_variant(model_dirs["gptneox"], tmp_path / "m", checkpoint))
    assert loaded.spec.cross_attn_every_n_layers == 2


def test_tensors_saved_under_the_other_module_path_count(model_dirs, tmp_path):
    """Upstream registers each cross-attention layer twice; either saved name must satisfy the check."""
    checkpoint = {
        key.replace("lang_encoder.model.layers.3.gated_cross_attn_layer.", "lang_encoder.gated_cross_attn_layers.3."): v
        for key, v in _checkpoint(model_dirs["llama"]).items()
    }
    assert any(key.startswith("lang_encoder.gated_cross_attn_layers.3.") for key in checkpoint)
    loaded = _load(_variant(model_dirs["llama"], tmp_path / "m", checkpoint))
    gate = loaded.model.lang_encoder.model.layers[3].gated_cross_attn_layer.attn_gate
    assert gate.item() == pytest.approx(0.85)


@pytest.mark.parametrize("wrapped", [True, False], ids=["training-save", "plain-ddp-save"])
def test_training_checkpoint_layout_is_unwrapped(model_dirs, tmp_path, wrapped):
    tensors = {f"module.{k}": v for k, v in _checkpoint(model_dirs["llama"]).items()}
    saved = {"model_state_dict": tensors, "epoch": 3} if wrapped else tensors
    loaded = _load(_variant(model_dirs["llama"], tmp_path / "m", saved))
    assert loaded.model.lang_encoder.gated_cross_attn_layers[1].attn_gate.item() == pytest.approx(0.75)


class _Exploit:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint", r"cannot read checkpoint .*checkpoint\.pt"),
        (None, r"cannot read checkpoint .*checkpoint\.pt"),
        ([1, 2, 3], r"is not a dictionary of tensors"),
    ],
    ids=["garbage", "pickle-with-code", "list"],
)
def test_unreadable_or_unsafe_checkpoints_are_refused(model_dirs, tmp_path, capsys, content, message):
    directory = _variant(model_dirs["llama"], tmp_path / "m")
    if isinstance(content, bytes):
        (directory / "checkpoint.pt").write_bytes(content)
    else:
        torch.save(_Exploit() if content is None else content, directory / "checkpoint.pt")
    with pytest.raises(ModelLoadError, match=message):
        _load(directory)
    assert "pickled code ran" not in capsys.readouterr().out


def test_missing_language_model_files_give_one_line(model_dirs, tmp_path):
    directory = _variant(model_dirs["llama"], tmp_path / "m")
    (directory / "lm" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"^cannot load the language model of .*: ") as refused:
        _load(directory)
    assert "\n" not in str(refused.value)


def test_directory_without_manifest_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match=r"is a directory but has no flamingo\.json"):
        _load(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gptneox", "mpt"])
def test_every_part_computes_in_one_dtype(model_dirs, family):
    loaded = _load(model_dirs[family], precision="bf16")
    dtypes = {p.dtype for p in loaded.model.parameters() if p.is_floating_point()}
    assert dtypes == {torch.bfloat16}
    assert loaded.context_length == 512


def test_clip_is_built_with_the_activation_its_weights_were_trained_with(monkeypatch):
    """open_clip builds ViT-L-14 "openai" with GELU unless told; its weights were trained with QuickGELU."""
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: "weights.pt")
    monkeypatch.setattr(open_clip.factory, "load_checkpoint", lambda *args, **kwargs: None)
    build = open_clip.create_model_and_transforms
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda *a, **k: build(*a, device="meta", **k))
    spec = resolve_model("openflamingo/OpenFlamingo-3B-vitl-mpt1b", "huggyllama/llama-7b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # open_clip warns of a GELU/QuickGELU mismatch
        visual, _, width = loading._load_vision(spec)
    assert isinstance(visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert width == 1024


def test_patch_tokens_reach_the_perceiver_before_clips_final_layer_norm(model_dirs):
    """As under the open_clip OpenFlamingo was trained with; later versions apply ln_post to them."""
    visual = _load(model_dirs["llama"]).model.vision_encoder
    seen = []
    hook = visual.transformer.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.inference_mode():
        tokens = visual(torch.randn(1, 3, 224, 224))[1]
    hook.remove()
    assert torch.equal(tokens, seen[0][:, 1:])  # the transformer's patch outputs, class token dropped


@pytest.mark.parametrize(
    ("class_name", "attr"),
    [
        ("LlamaForCausalLM", "model.layers"),
        ("GPTNeoXForCausalLM", "gpt_neox.layers"),
        ("MptForCausalLM", "transformer.blocks"),
        ("MosaicGPT", "transformer.blocks"),
    ],
)
def test_decoder_blocks_are_found_for_every_released_family(class_name, attr):
    """MPT-1B's MosaicGPT cannot be built here (hub code); its names are checked instead."""
    fake = type(class_name, (torch.nn.Module,), {})()
    assert decoder_layers_attr(fake) == attr


def test_unknown_language_model_class_is_refused():
    with pytest.raises(ModelLoadError, match="unsupported language model class OPTForCausalLM"):
        decoder_layers_attr(type("OPTForCausalLM", (torch.nn.Module,), {})())


def test_mosaicgpt_gets_embedding_accessors(model_dirs):
    """MosaicGPT raises NotImplementedError from get_input_embeddings; the loader adds them on transformer.wte."""

    class MosaicGPT(transformers.PreTrainedModel):
        config_class = transformers.MptConfig

        def __init__(self, config):
            super().__init__(config)
            self.transformer = torch.nn.Module()
            self.transformer.wte = torch.nn.Embedding(10, 4)

    model = MosaicGPT(transformers.MptConfig(d_model=4, n_heads=1, n_layers=1, vocab_size=10))
    with pytest.raises(NotImplementedError):
        model.get_input_embeddings()
    with_accessors = with_embedding_accessors(model)
    assert with_accessors.get_input_embeddings() is model.transformer.wte
    replacement = torch.nn.Embedding(12, 4)
    with_accessors.set_input_embeddings(replacement)
    assert model.transformer.wte is replacement


def test_hub_code_shipped_with_a_native_model_is_never_run(model_dirs, tmp_path):
    """anas-awadalla/mpt-7b's config points at its own modeling code; the native MPT class loads it instead."""
    directory = _variant(model_dirs["mpt"], tmp_path / "m")
    config_path = directory / "lm" / "config.json"
    config = json.loads(config_path.read_text()) | {
        "architectures": ["MPTForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_mpt.MPTConfig",
            "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM",
        },
        "attn_config": {
            "alibi": True,
            "alibi_bias_max": 8,
            "attn_impl": "torch",
            "attn_pdrop": 0,
            "clip_qkv": None,
            "prefix_lm": False,
            "qk_ln": False,
            "softmax_scale": None,
            "attn_uses_sequence_id": False,
        },
        "norm_type": "low_precision_layernorm",
        "no_bias": True,
        "learned_pos_emb": True,
        "logit_scale": None,
    }
    config_path.write_text(json.dumps(config))
    for module in ("configuration_mpt.py", "modeling_mpt.py"):
        (directory / "lm" / module).write_text("raise SystemExit('hub code ran')\n")
    loaded = _load(directory)
    assert isinstance(loaded.model.lang_encoder, transformers.MptForCausalLM)


def test_running_out_of_memory_while_placing_the_model_is_one_line(model_dirs, monkeypatch):
    def short_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

    monkeypatch.setattr(loading, "place_model", short_of_memory)
    settings = tiny_settings(model_dirs["mpt"], precision="bf16").model
    with pytest.raises(ModelLoadError, match=r"^not enough memory on cpu for the assembled model of .* in bf16; a "):
        load_model(settings)


def test_a_gpu_the_machine_does_not_have_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ModelLoadError, match=r"^device cuda:7 was asked for but this machine has 1 GPU\(s\)$"):
        pick_device("cuda:7")
