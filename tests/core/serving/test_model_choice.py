"""Model sizes before loading, and which models a server may choose under each backend."""

from __future__ import annotations

import pytest
import torch

from core.config import ModelSettings, RaySettings, ServiceSettings, Settings
from core.errors import BadParameter
from core.model.footprint import parameter_counts
from core.model.loading import load_model, plan_precision
from core.model.registry import REGISTRY, resolve_model
from core.serving.model_choice import GIB, ModelCatalog

CPU = torch.device("cpu")


def _parameter_bytes(loaded) -> int:
    return sum(p.nelement() * p.element_size() for p in {id(p): p for p in loaded.model.parameters()}.values())


@pytest.mark.parametrize("family", ["llama", "gptneox", "mpt", "mosaicgpt"])
def test_counted_size_is_what_loading_takes(engines, model_dirs, family):
    counts = parameter_counts(resolve_model(str(model_dirs[family])))
    assert counts.weight_bytes(plan_precision("fp32", CPU)) == _parameter_bytes(engines[family].loaded)


@pytest.mark.parametrize("quantize_cross_attention", [True, False])
def test_counted_int8_size_is_what_loading_takes(model_dirs, quantize_cross_attention):
    settings = ModelSettings(
        name=str(model_dirs["llama"]),
        precision="int8",
        device="cpu",
        quantize_cross_attention=quantize_cross_attention,
    )
    loaded = load_model(settings)
    counts = parameter_counts(resolve_model(str(model_dirs["llama"])))
    assert counts.weight_bytes(loaded.precision, quantize_cross_attention) == _parameter_bytes(loaded)


def test_released_models_are_counted_without_weights():
    gpu = torch.device("cuda")  # only names the plan
    sizes = {name: parameter_counts(spec) for name, spec in REGISTRY.items()}
    nine = sizes["openflamingo/OpenFlamingo-9B-vitl-mpt7b"]
    assert 8.0e9 < nine.total < 8.3e9  # MPT-7B 6.7B, ViT-L 0.3B, cross-attention 1.1B
    assert (
        sizes["openflamingo/OpenFlamingo-3B-vitl-mpt1b"].total < sizes["openflamingo/OpenFlamingo-4B-vitl-rpj3b"].total
    )
    bf16, nf4 = (nine.weight_bytes(plan_precision(p, gpu)) / GIB for p in ("bf16", "nf4"))
    assert bf16 == pytest.approx(nine.total * 2 / GIB)
    assert 4.5 < nf4 < 5.5


def _catalog(sizes: dict[str, int], budget: int) -> ModelCatalog:
    return ModelCatalog("models/default", ("models/default", *sizes), sizes, budget, on_replicas=True)


def test_replicas_hold_as_many_chosen_models_as_fit_together():
    sizes = {"models/a": 3, "models/b": 5, "models/c": 9}
    assert _catalog(sizes, 10).models_per_replica == 1  # b and c together would not fit
    assert _catalog(sizes, 14).models_per_replica == 2
    assert _catalog(sizes, 17).models_per_replica == 3
    assert _catalog(sizes, 2).models_per_replica == 0
    assert _catalog(sizes, 6).offered() == ["models/default", "models/a", "models/b"]


def test_a_model_too_big_for_the_budget_is_refused_saying_so():
    catalog = _catalog({"models/small": GIB, "models/huge": 20 * GIB}, 8 * GIB)
    catalog.check_choice("models/small")
    with pytest.raises(
        BadParameter, match=r"^huge needs 20.0 GiB for its weights, but each model server keeps only 8.0"
    ):
        catalog.check_choice("models/huge")
    assert catalog.lookup("small") == catalog.lookup("models/small") == "models/small"
    with pytest.raises(BadParameter, match=r"There is no model called “tiny” here; choose one of: default, small\."):
        catalog.lookup("tiny")
    assert catalog.in_force("models/huge") == catalog.in_force(None) == "models/default"
    assert catalog.in_force("models/small") == "models/small"


def test_in_process_only_the_loaded_model_is_offered(model_dirs):
    settings = Settings(model=ModelSettings(name=str(model_dirs["llama"]), choices=[str(model_dirs["gptneox"])]))
    catalog = ModelCatalog.from_settings(settings)
    assert catalog.offered() == [str(model_dirs["llama"])]
    with pytest.raises(BadParameter, match=r"runs one model in its own process .*, so it cannot switch"):
        catalog.check_choice(str(model_dirs["gptneox"]))
    with pytest.raises(BadParameter, match="is not one of the models this bot offers"):
        catalog.check_choice("openflamingo/OpenFlamingo-9B")


def test_on_ray_choices_are_sized_in_the_replicas_precision(model_dirs):
    choices = [str(model_dirs["gptneox"]), str(model_dirs["mpt"]), "no/such-model"]
    settings = Settings(
        model=ModelSettings(name=str(model_dirs["llama"]), precision="auto", choices=choices),
        service=ServiceSettings(backend="ray"),
        ray=RaySettings(extra_model_memory_gib=0.01),
    )
    catalog = ModelCatalog.from_settings(settings)
    assert catalog.choices == (str(model_dirs["llama"]), *choices[:2])  # the unknown one is left out, logged
    fp32 = plan_precision("fp32", CPU)  # auto on CPU replicas
    for choice in choices[:2]:
        assert catalog.weight_bytes[choice] == parameter_counts(resolve_model(choice)).weight_bytes(fp32)
    assert catalog.models_per_replica == 1  # each is about 7 MB: one fits in 10 MiB, two do not


def test_the_default_on_another_language_model_says_so_and_a_chosen_model_loads_as_released():
    catalog = ModelCatalog(
        "models/default", ("models/default", "models/a"), {"models/a": GIB}, 8 * GIB, True, "hub/instruct-lm"
    )
    assert catalog.shown("models/default") == "default with instruct-lm as its language model"
    assert (
        catalog.describe("models/default")
        == "default with instruct-lm as its language model (the default, always loaded)"
    )
    assert catalog.shown("models/a") == "a" and catalog.describe("models/a") == "a (1.0 GiB)"
    model = ModelSettings(name="models/default", language_model="hub/instruct-lm")
    assert model.shown_name == "models/default with hub/instruct-lm as its language model"
    chosen = model.chosen("models/a")  # what a replica loads for a server's choice
    assert (chosen.name, chosen.language_model, chosen.shown_name) == ("models/a", None, "models/a")
