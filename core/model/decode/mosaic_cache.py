"""The engine's key/value caches, shown to MPT-1B's hub code (MosaicGPT) in the format it keeps.

Why: MosaicGPT predates transformers' cache objects. It takes a list with one ``(keys, values)``
pair per layer, each (rows, tokens, heads × dim); each layer reads its pair, appends the forward's
tokens and writes the longer pair back. The engine's caches (transformers' ``DynamicCache``, the
batch's shared-prefix store) hold (rows, heads, tokens, dim) per layer and take new tokens through
``update``. This view gives each layer its past as a pair and hands only the new tokens back, so
the prefix cache, batching and beam search work on MosaicGPT as on the native families.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from core.model.decode.state import layer_keys_values


class CacheWithPast(Protocol):
    """A cache that gathers each layer's past itself: the batch's shared-prefix store
    (``core.model.decode.shared_prefix``), typed by what it does so that this module and the layers'
    conditioning, which the steppers use, need not import the steppers back."""

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def past(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def keeps_tuple_cache(lm: nn.Module) -> bool:
    return "mosaicgpt" in type(lm).__name__.lower()


class TupleCacheView:
    """What MosaicGPT's forward asks of ``past_key_values``: its length, and a pair per layer to read and write."""

    def __init__(self, cache: DynamicCache | CacheWithPast, layers: int, heads: int, empty: torch.Tensor) -> None:
        """``empty``: (rows, 0, heads × dim), an empty layer's keys and values."""
        self.cache, self.layers, self.heads, self.empty = cache, layers, heads, empty
        self.known: dict[int, int] = {}  # per layer, the tokens its last read pair held

    def __len__(self) -> int:
        return self.layers

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.layers:
            raise IndexError(index)  # so that iterating over it ends, as over a list
        past = self._past(index)
        if past is None:
            self.known[index] = 0
            return self.empty, self.empty
        self.known[index] = past[0].shape[2]
        keys, values = (tensor.transpose(1, 2).flatten(2) for tensor in past)
        return keys, values

    def __setitem__(self, index: int, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        known = self.known.pop(index)
        new_keys, new_values = (tensor[:, known:].unflatten(2, (self.heads, -1)).transpose(1, 2) for tensor in pair)
        self.cache.update(new_keys, new_values, index)

    def _past(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not isinstance(self.cache, DynamicCache):
            return self.cache.past(index)
        layers = self.cache.layers
        if index < len(layers) and layers[index].is_initialized:
            return layer_keys_values(layers[index])
        return None
