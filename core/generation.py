"""Generation options a user may set: one table feeds the slash command, the CLI, config's ranges and the checks.

A new option is one row of ``OPTIONS`` (its name, type, default range and help) plus, where it
changes the scores, its logits processor (``core.model.decode.logits``). ``None`` means "not
given": sampling-only values given without sampling are refused rather than silently ignored, so
nobody wonders why their temperature changed nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, model_validator

from core.errors import BadParameter

Value = int | float | bool


class Range(BaseModel):
    """Inclusive bounds of what users may choose; a key it does not know is a typo to report."""

    model_config = ConfigDict(extra="forbid")

    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"range low {self.low} is above high {self.high}")
        return self


@dataclass(frozen=True)
class Option:
    """One generation option, as users see it in Discord and on the command line."""

    name: str
    kind: type[int] | type[float] | type[bool]
    help: str
    range: Range | None = None  # the default of config's ``[generation]`` range; None for a switch
    default: Value | None = None  # None: not given (transformers' own default applies)
    sampling_only: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("max_new_tokens", int, "Longest answer, in tokens", Range(low=1, high=256)),
    Option(
        "min_new_tokens", int, "Shortest answer, in tokens (the model tends to answer briefly)", Range(low=0, high=256)
    ),
    Option("do_sample", bool, "Sample instead of taking the most likely words", default=False),
    Option(
        "temperature", float, "Sampling randomness (needs do_sample)", Range(low=0.05, high=2.0), sampling_only=True
    ),
    Option("top_p", float, "Nucleus sampling mass (needs do_sample)", Range(low=0.05, high=1.0), sampling_only=True),
    Option(
        "top_k",
        int,
        "Sample among this many likeliest tokens (needs do_sample)",
        Range(low=1, high=500),
        sampling_only=True,
    ),
    Option("num_beams", int, "Beam search width", Range(low=1, high=5), default=1),
    Option("repetition_penalty", float, "Above 1 discourages repeating", Range(low=1.0, high=2.0)),
    Option(
        "length_penalty",
        float,
        "Beam search preference for longer answers (needs num_beams > 1)",
        Range(low=-2.0, high=2.0),
    ),
    Option("no_repeat_ngram_size", int, "Never repeat a sequence of this many tokens", Range(low=0, high=10)),
)
BY_NAME = {option.name: option for option in OPTIONS}


class Limits(Protocol):
    """What config says of generation (``core.config.GenerationSettings``): a range per option, the default length."""

    @property
    def max_new_tokens_default(self) -> int: ...

    @property
    def ranges(self) -> dict[str, Range]: ...


class GenerationParams:
    """A request's generation options: each as given, else its default (``None``: not given).

    Every option reads as an attribute (``params.top_k``); the few the bot's own rules reason about
    are typed properties.
    """

    def __init__(self, **given: Value | None) -> None:
        unknown = given.keys() - BY_NAME.keys()
        if unknown:
            raise TypeError(f"no generation option {', '.join(sorted(unknown))}")
        self._values = {option.name: given.get(option.name, option.default) for option in OPTIONS}

    def as_dict(self) -> dict[str, Value | None]:
        """Every option, in the table's order (what is stored, and what travels to replicas)."""
        return dict(self._values)

    def replace(self, **changes: Value | None) -> GenerationParams:
        return GenerationParams(**(self._values | changes))

    def __getattr__(self, name: str) -> Value | None:
        values = self.__dict__.get("_values")
        if values is None or name not in values:
            raise AttributeError(name)
        return values[name]

    @property
    def do_sample(self) -> bool:
        return bool(self._values["do_sample"])

    @property
    def num_beams(self) -> int:
        beams = self._values["num_beams"]
        return int(beams) if beams is not None else 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationParams) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(self._values.items()))

    def __repr__(self) -> str:
        given = ", ".join(f"{name}={value!r}" for name, value in self._values.items() if value is not None)
        return f"GenerationParams({given})"


def reroll_params(params: GenerationParams) -> GenerationParams:
    """A new sample of the same request: sampling on, beam search off (it would give the same answer)."""
    if params.do_sample:
        return params
    return params.replace(do_sample=True, num_beams=1, length_penalty=None)


def _check_range(name: str, value: float, allowed: Range, integer: bool) -> None:
    if not math.isfinite(value):
        raise BadParameter(f"{name} must be a finite number (got {value}).")
    if integer and value != int(value):
        raise BadParameter(f"{name} must be a whole number (got {value}).")
    if not allowed.low <= value <= allowed.high:
        low, high = (int(allowed.low), int(allowed.high)) if integer else (allowed.low, allowed.high)
        raise BadParameter(f"{name} must be between {low} and {high} (got {value}).")


def decode_steps(kwargs: Mapping[str, Any], images: int) -> int:
    """The decode steps a request may take, for sharing the model fairly between servers: each beam's
    new tokens, and one step for each of its own images' encoding (a task's examples are cached)."""
    return kwargs.get("num_beams", 1) * kwargs["max_new_tokens"] + images


def generation_kwargs(params: GenerationParams, limits: Limits) -> dict[str, Any]:
    """Validate ``params`` and return the keyword arguments for Hugging Face ``generate``."""
    given = {name: value for name, value in params.as_dict().items() if value is not None}
    given.setdefault("max_new_tokens", limits.max_new_tokens_default)
    for name, value in given.items():
        kind = BY_NAME[name].kind
        if kind is bool:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadParameter(f"{name} must be a number (got {value!r}).")
        _check_range(name, value, limits.ranges[name], integer=kind is int)
    if not params.do_sample:
        needs_sampling = [option.name for option in OPTIONS if option.sampling_only and option.name in given]
        if needs_sampling:
            verb = "applies" if len(needs_sampling) == 1 else "apply"
            raise BadParameter(f"{', '.join(needs_sampling)} only {verb} when sampling; turn on do_sample.")
    if given.get("min_new_tokens", 0) > given["max_new_tokens"]:
        shortest, longest = given["min_new_tokens"], given["max_new_tokens"]
        raise BadParameter(f"min_new_tokens ({shortest}) cannot be more than max_new_tokens ({longest}).")
    if given.get("length_penalty") is not None and params.num_beams < 2:
        raise BadParameter("length_penalty only applies to beam search; set num_beams to 2 or more.")
    return {name: int(value) if BY_NAME[name].kind is int else value for name, value in given.items()}
