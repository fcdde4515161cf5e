"""Which models a server may choose, and whether each fits beside the default on one replica.

The configured model is the default: always loaded, never evicted. Others load on demand on the
Ray replicas (Serve's model multiplexing) within a memory budget per replica. Serve evicts by count
alone, so the count it is given is the most models that fit the budget whichever of them are
loaded together: the largest choices summed. A model that alone exceeds the budget is refused
when a server chooses it. In-process (``service.backend = "local"``) only the loaded model exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from core.config import Settings
from core.errors import BadParameter, ModelLoadError
from core.model.footprint import parameter_counts
from core.model.loading import PrecisionPlan, plan_precision
from core.model.registry import REGISTRY, resolve_model, transferred_name
from core.wording import quoted

log = logging.getLogger(__name__)

GIB = 2**30


def replica_precision(settings: Settings) -> PrecisionPlan:
    """How the replicas load models: on their GPUs when they have one, else on their CPUs."""
    return plan_precision(settings.model.precision, torch.device("cuda" if settings.ray.num_gpus > 0 else "cpu"))


def short_name(model: str) -> str:
    """``OpenFlamingo-4B-vitl-rpj3b`` for a registry name, the folder's name for a local model."""
    return model.rstrip("/").rsplit("/", 1)[-1]


def _size(size: int) -> str:
    return f"{size / GIB:.1f} GiB" if size >= GIB / 10 else f"{size / 2**20:.0f} MiB"


@dataclass(frozen=True)
class ModelCatalog:
    default: str
    choices: tuple[str, ...]  # every model a server may name, the default first
    weight_bytes: dict[str, int]  # of each choice but the default, in the replicas' precision
    budget_bytes: int  # per replica, for models other than the default
    on_replicas: bool  # False: the model runs in the bot's process and cannot change
    language_model: str | None = None  # the default's layers sit on this LM (``model.language_model``)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelCatalog:
        """Sizes come from exact parameter counts (a second or so); the local backend needs none."""
        default = settings.model.name
        listed = settings.model.choices if settings.model.choices is not None else list(REGISTRY)
        choices = (default, *(name for name in dict.fromkeys(listed) if name != default))
        on_replicas = settings.service.backend == "ray"
        sizes: dict[str, int] = {}
        if on_replicas:
            precision = replica_precision(settings)
            for name in choices[1:]:
                try:
                    spec = resolve_model(name, settings.model.llama_path)
                    counts = parameter_counts(spec)
                    sizes[name] = counts.weight_bytes(precision, settings.model.quantize_cross_attention)
                except ModelLoadError as error:
                    log.warning("model.choices: %s is left out: %s", name, error)
            choices = (default, *sizes)
        budget = round(settings.ray.extra_model_memory_gib * GIB)
        return cls(default, choices, sizes, budget, on_replicas, settings.model.language_model)

    @property
    def models_per_replica(self) -> int:
        """Models besides the default one replica holds at once; 0 when none fits."""
        fitting = sorted((size for size in self.weight_bytes.values() if size <= self.budget_bytes), reverse=True)
        total = count = 0
        for size in fitting:
            if total + size > self.budget_bytes:
                break
            total += size
            count += 1
        return count

    def offered(self) -> list[str]:
        """What a server can switch to now."""
        if not self.on_replicas:
            return [self.default]
        return [self.default, *(name for name, size in self.weight_bytes.items() if size <= self.budget_bytes)]

    def shown(self, model: str) -> str:
        """A model by its short name; the default says so when its layers sit on another LM."""
        if model != self.default or self.language_model is None:
            return short_name(model)
        return transferred_name(short_name(model), short_name(self.language_model))

    def describe(self, model: str) -> str:
        if model == self.default:
            return f"{self.shown(model)} (the default, always loaded)"
        return f"{short_name(model)} ({_size(self.weight_bytes[model])})"

    def lookup(self, typed: str) -> str:
        """The choice a member typed, by its full or short name."""
        for model in self.choices:
            if typed in (model, short_name(model)):
                return model
        offered = ", ".join(short_name(model) for model in self.offered())
        raise BadParameter(f"There is no model called {quoted(typed)} here; choose one of: {offered}.")

    def check_choice(self, model: str) -> None:
        """Refuse, saying why, a model this bot cannot run for a server."""
        if model == self.default:
            return
        if model not in self.choices:
            raise BadParameter(f"{short_name(model)} is not one of the models this bot offers.")
        if not self.on_replicas:
            raise BadParameter(
                f"This bot runs one model in its own process ({short_name(self.default)}), so it cannot switch. "
                "Servers can choose other models only when the bot runs its models on a Ray cluster."
            )
        size = self.weight_bytes[model]
        if size > self.budget_bytes:
            raise BadParameter(
                f"{short_name(model)} needs {_size(size)} for its weights, but each model server keeps only "
                f"{_size(self.budget_bytes)} for models other than the default; choose a smaller one."
            )

    def in_force(self, chosen: str | None) -> str:
        """The model a server's requests use: its choice while the bot still offers it, else the default."""
        return chosen if chosen is not None and chosen in self.offered() else self.default
