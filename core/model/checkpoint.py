"""Strict loading of ``checkpoint.pt``: the trained Flamingo tensors must all be there, and nothing else.

Upstream loads with ``strict=False`` because the file holds only what training changed, which also
accepts a checkpoint for another model. Here a key may be missing only if it belongs to the frozen
vision encoder or the frozen language model, and no key may be unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from core.errors import ModelLoadError

log = logging.getLogger(__name__)

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


def keep_language_model(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    language_model: nn.Module,
    trained_modules: Iterable[nn.Module],
    embedding_tables: Iterable[torch.Tensor],
    flamingo_rows: Mapping[int, int],
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (as ``select_checkpoint_tensors`` chose them) for its layers on
    another language model of the same shape, which keeps its own weights.

    Checkpoints hold the language model's embedding tables besides the trained layers: upstream's
    training masks the input embeddings' gradients to the rows of ``<image>`` and ``<|endofchunk|>``
    and saves every table whole, so that the rows of the tokens it added are the same in each model.
    Of each table held, the rows of Flamingo's tokens (``flamingo_rows``: the checkpoint's row to the
    model's, for those two and a ``<PAD>`` both tokenizers hold, untrained but as saved) are copied
    here into the new model's; every other row stays its own, as does any other tensor of the
    language model, which is skipped. What is returned to load: the perceiver, the cross-attention
    layers, and any vision tensors.
    """
    expected = model.state_dict(keep_vars=True)
    trained = {id(t) for module in trained_modules for t in module.state_dict(keep_vars=True).values()}
    own = {id(t) for t in language_model.state_dict(keep_vars=True).values()} - trained
    tables = {id(table) for table in embedding_tables}
    kept: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in tensors.items():
        target = expected[key]
        if id(target) not in own:
            kept[key] = value
        elif id(target) in tables:
            with torch.no_grad():
                for saved, row in flamingo_rows.items():
                    target[row] = value[saved]
        else:
            skipped.append(key)
    if skipped:
        log.info("The language model keeps its own weights for %s", _listing("tensors in the checkpoint", skipped))
    return kept
