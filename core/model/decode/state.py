"""What a request carries through decoding: its job, its task's prefix state, its running row, and
the buffer a row alone decodes in (``RowCache``: its prefill writes there, so decoding copies nothing).

Kept apart from the decoder so that the stepping modules (shared prefix, static steps, batched
prefill, beam search) and the layers' conditioning can share these types without importing the
decoder itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin
from transformers.generation.logits_process import LogitsProcessorList

from core.model.decode.logits import logits_processors


class Progress:
    """A request's tokens as the batched decode loop chooses them, for a reader on another thread.

    Why so little: the loop must not slow down for its readers. Each step it only hands over its
    row's own token list (no copy) and calls the follower's ``wake``, if any; a reader copies the
    list when it next runs (one C-level copy under the GIL; the list only grows) and makes text of
    it on its own side. A request nobody follows costs the loop one call that stores a reference.
    Beam search publishes nothing: its best beam can change until it ends.
    """

    def __init__(self) -> None:
        self.tokens: Sequence[int] = ()
        self.wake: Callable[[], None] | None = None  # set by the one follower, called on the worker thread

    def stepped(self, tokens: list[int]) -> None:
        self.tokens = tokens
        wake = self.wake
        if wake is not None:
            wake()


@dataclass
class DecodeJob:
    """One request for the decoder: its task's prefix, its own tokens and images, its parameters."""

    prefix: PrefixState
    request_ids: list[int]
    request_images: list[torch.Tensor]
    kwargs: dict[str, Any]
    stop_ids: set[int]
    should_stop: Callable[[], bool]
    progress: Progress | None = None  # where the batched loop publishes the tokens so far


@dataclass
class Running:
    job: DecodeJob
    sequence: torch.Tensor  # (1, tokens so far, the newest not yet in the cache)
    processors: LogitsProcessorList
    # Per layer, (1, heads, tokens, dim), of the tokens after the task's prefix (whose own cache
    # is the job's prefix state, shared by the task's requests).
    key_values: list[tuple[torch.Tensor, torch.Tensor]]
    image_keys_values: list[tuple[torch.Tensor, torch.Tensor] | None]  # per layer, of the image it reads now
    logits: torch.Tensor
    generated: list[int] = field(default_factory=list)
    # The buffer ``key_values`` are views of, with the prefix before them and room after (a prefill's
    # or a lone row's): decoding alone, the row steps on in it instead of a copy.
    buffer: RowCache | None = None

    @classmethod
    def prefilled(
        cls,
        job: DecodeJob,
        logits: torch.Tensor,
        key_values: list[tuple[torch.Tensor, torch.Tensor]],
        latest: list[tuple[torch.Tensor, torch.Tensor] | None],
        device: torch.device,
        buffer: RowCache | None = None,
    ) -> Running:
        """A prefilled request, ready to decode: its tokens so far, caches and first logits."""
        sequence = torch.tensor([list(job.prefix.token_ids) + job.request_ids], device=device)
        return cls(
            job=job,
            sequence=sequence,
            processors=logits_processors(job.kwargs, sequence.shape[1], job.stop_ids, device),
            key_values=key_values,
            image_keys_values=latest,
            logits=logits,
            buffer=buffer,
        )

    @property
    def prefix_length(self) -> int:
        return len(self.job.prefix.token_ids)

    @property
    def cached_length(self) -> int:
        """Tokens in the row's cache, the prefix's included (while the row holds its cache)."""
        return self.prefix_length + self.key_values[0][0].shape[2]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.nelement() * tensor.element_size()


@dataclass(frozen=True)
class PrefixState:
    """A task's examples, run once: their token ids, the LM's cache for them, the last image's keys and values."""

    token_ids: tuple[int, ...]
    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    # Per decoder layer (None without cross-attention), the last example image's cross-attention
    # keys and values, for the request's text before its own <image>; None without examples.
    last_image: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...] | None

    @property
    def nbytes(self) -> int:
        tensors = [*self.key_values, *(kv for kv in self.last_image or () if kv is not None)]
        return sum(tensor_bytes(k) + tensor_bytes(v) for k, v in tensors)


def after_prefix(tensor: torch.Tensor, prefix: PrefixState) -> torch.Tensor:
    """A (1, heads, tokens, dim) cache tensor without the prefix's tokens, which the prefix state keeps."""
    length = len(prefix.token_ids)
    return tensor[:, :, length:].clone() if length else tensor


def layer_keys_values(layer: CacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled cache layer's keys and values (transformers types them optional: an unfilled layer has none)."""
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


class RowCache:
    """One row's keys and values, its prefix's included, in one buffer per layer with room for its
    remaining tokens: each forward writes its tokens' at the end and reads the past as a view."""

    def __init__(
        self, prefix: PrefixState, capacity: int, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device
    ) -> None:
        """Room for ``capacity`` tokens, the prefix's copied in; ``shape``: layers, heads, dim."""
        layers, heads, dim = shape
        self.prefix_length = self.length = len(prefix.token_ids)
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []  # per layer, (1, heads, capacity, dim)
        self.values: list[torch.Tensor] = []
        for index in range(layers):
            for which, store in enumerate((self.keys, self.values)):
                buffer = torch.empty((1, heads, capacity, dim), dtype=dtype, device=device)
                if self.prefix_length:
                    buffer[:, :, : self.prefix_length] = prefix.key_values[index][which]
                store.append(buffer)

    @classmethod
    def taking(cls, row: Running) -> RowCache:
        """The row's cache: its own buffer where it has one with room for its remaining tokens (a
        prefill's, or a batch's of one row), else a new one with the row's own cache copied in."""
        remaining = row.job.kwargs["max_new_tokens"] - len(row.generated)
        held, row.buffer = row.buffer, None
        if held is not None and held.length == row.cached_length and held.capacity >= held.length + remaining:
            row.key_values = []
            return held
        del held
        length, part = row.cached_length, row.key_values[0][0]
        shape = (len(row.key_values), part.shape[1], part.shape[3])
        cache = cls(row.job.prefix, length + remaining, shape, part.dtype, part.device)
        for index, own in enumerate(row.key_values):
            cache.keys[index][:, :, cache.prefix_length : length] = own[0]
            cache.values[index][:, :, cache.prefix_length : length] = own[1]
        row.key_values = []
        cache.length = length
        return cache

    def begin_step(self, tokens: int = 1) -> None:
        """The row gets places at the end of its buffer for the tokens this forward runs."""
        self.length += tokens

    def end_step(self) -> None:
        """Nothing to advance: ``begin_step`` made the places, which ``update`` filled."""

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the forward's (1, heads, tokens, dim) keys and values; the row's whole keys and values, as views."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:, :, self.length - key.shape[2] : self.length] = key
        values[:, :, self.length - key.shape[2] : self.length] = value
        return keys[:, :, : self.length], values[:, :, : self.length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length - 1

    def masked(self) -> None:
        return None  # nothing to mask: the row alone has no padding

    def own_key_values(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The row's tokens after its prefix, (1, heads, tokens, dim) per layer, as views."""
        return [
            (keys[:, :, self.prefix_length : self.length], values[:, :, self.prefix_length : self.length])
            for keys, values in zip(self.keys, self.values, strict=True)
        ]
