"""Strict loading of ``checkpoint.pt``: the trained Flamingo tensors must all be there, and nothing else.

Upstream loads with ``strict=False`` because the file holds only what training changed, which also
accepts a checkpoint for another model. Here a key may be missing only if it belongs to the frozen
vision encoder or the frozen language model, and no key may be unknown.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from core.errors import ModelLoadError

# Buffers that older transformers saved with the model and current versions no longer define.
_STALE_BUFFER_SUFFIXES = (
    ".attention.bias",
    ".attention.masked_bias",
    ".rotary_emb.inv_freq",
    ".attn.bias",
    ".attn.masked_bias",
)
_SHOWN_KEYS = 4


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Load tensors only (``weights_only``: a checkpoint must not run code), unwrapping training saves."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for unreadable files
        raise ModelLoadError(f"cannot read checkpoint {path}: {error}".splitlines()[0]) from None
    if isinstance(state, Mapping) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if isinstance(state, Mapping) and state and all(str(key).startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}  # saved from a DDP wrapper
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {path} is not a dictionary of tensors")
    return dict(state)


def _stale(key: str, tensor: torch.Tensor) -> bool:
    """A buffer an older library saved and ours no longer has: trained weights are never integers
    (the v1 9B's file was saved with Hugging Face's CLIP, whose position ids are int64)."""
    return key.endswith(_STALE_BUFFER_SUFFIXES) or not tensor.is_floating_point()


def _listing(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return f"{len(keys)} {kind}: {shown}{more}"


def select_checkpoint_tensors(
    model: nn.Module,
    checkpoint: Mapping[str, torch.Tensor],
    trained_modules: Iterable[nn.Module],
    source: str,
) -> dict[str, torch.Tensor]:
    """Check ``checkpoint`` against ``model`` and return the tensors to load.

    Modules registered under several paths (upstream keeps the decoder blocks and cross-attention
    layers both inside its wrapper layers and in lists of their own) are one tensor with several
    names; a tensor counts as present when any of its names is in the checkpoint.
    """
    expected = model.state_dict(keep_vars=True)
    names_of: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        names_of.setdefault(id(tensor), []).append(name)

    unexpected = sorted(key for key in checkpoint if key not in expected and not _stale(key, checkpoint[key]))
    mismatched = sorted(
        f"{key} {tuple(checkpoint[key].shape)} vs {tuple(expected[key].shape)}"
        for key in checkpoint
        if key in expected and checkpoint[key].shape != expected[key].shape
    )
    # max() picks the wrapper-layer path, which is the one upstream saves.
    missing = sorted(
        {
            max(names_of[id(tensor)])
            for module in trained_modules
            for tensor in module.state_dict(keep_vars=True).values()
            if not any(name in checkpoint for name in names_of[id(tensor)])
        }
    )
    problems = [
        _listing(kind, keys)
        for kind, keys in (
            ("unexpected keys", unexpected),
            ("trained tensors missing", missing),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise ModelLoadError(f"checkpoint {source} does not fit this model: {'; '.join(problems)}")
    return {key: value for key, value in checkpoint.items() if key in expected}
