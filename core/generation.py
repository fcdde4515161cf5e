"""Generation parameters a user may set, checked against the ranges in config.

``None`` means "not given": sampling-only values given without sampling are refused rather than
silently ignored, so nobody wonders why their temperature changed nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from core.config import GenerationSettings, Range
from core.errors import BadParameter

_SAMPLING_ONLY = ("temperature", "top_p", "top_k")
_INTEGERS = ("max_new_tokens", "min_new_tokens", "top_k", "num_beams", "no_repeat_ngram_size")


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    repetition_penalty: float | None = None
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None


def _check_range(name: str, value: float, allowed: Range, integer: bool) -> None:
    if not math.isfinite(value):
        raise BadParameter(f"{name} must be a finite number (got {value}).")
    if integer and value != int(value):
        raise BadParameter(f"{name} must be a whole number (got {value}).")
    if not allowed.low <= value <= allowed.high:
        low, high = (int(allowed.low), int(allowed.high)) if integer else (allowed.low, allowed.high)
        raise BadParameter(f"{name} must be between {low} and {high} (got {value}).")


def generation_kwargs(params: GenerationParams, settings: GenerationSettings) -> dict[str, Any]:
    """Validate ``params`` and return the keyword arguments for Hugging Face ``generate``."""
    given = {name: value for name, value in asdict(params).items() if value is not None}
    given.setdefault("max_new_tokens", settings.max_new_tokens_default)
    for name, value in given.items():
        if name == "do_sample":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadParameter(f"{name} must be a number (got {value!r}).")
        allowed: Range = getattr(settings, name)
        _check_range(name, value, allowed, integer=name in _INTEGERS)
    if not params.do_sample:
        needs_sampling = [name for name in _SAMPLING_ONLY if name in given]
        if needs_sampling:
            verb = "applies" if len(needs_sampling) == 1 else "apply"
            raise BadParameter(f"{', '.join(needs_sampling)} only {verb} when sampling; turn on do_sample.")
    if given.get("min_new_tokens", 0) > given["max_new_tokens"]:
        shortest, longest = given["min_new_tokens"], given["max_new_tokens"]
        raise BadParameter(f"min_new_tokens ({shortest}) cannot be more than max_new_tokens ({longest}).")
    if params.length_penalty is not None and params.num_beams < 2:
        raise BadParameter("length_penalty only applies to beam search; set num_beams to 2 or more.")
    return {name: int(value) if name in _INTEGERS else value for name, value in given.items()}
