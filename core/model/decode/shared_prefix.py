"""A batch's key/value cache that stores each task's prefix once, however many rows share it.

Why: requests of one task share its examples' keys and values, but a batch cache made of
left-padded rows copies them into every row. With 32 four-shot requests of OpenFlamingo-9B that
was about 2 GiB, nine tenths of it the same examples again. Here each distinct prefix and each
row's own tokens are kept once, in one store per layer, and each step gathers the rows' keys and
values from it as the left-padded batch that transformers' attention expects: the same values in
the same places, so MPT's position bias (taken from the place in the row) and the padding mask
are as before. Only the gathered tensors of one layer exist at a time.

A row decoding alone has nothing to share and no padding: its cache is one buffer per layer
(``RowCache``), whose attention reads a view of the past instead of a gathered copy of it. Its
prefill writes into that buffer already (``FlamingoDecoder.prefill``), so the row starts decoding
without a copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from core.model.decode.state import PrefixState, RowCache, Running

if TYPE_CHECKING:
    from core.model.decode.conditioning import LayerConditioning
    from core.model.layers.layer_stack import LanguageModelParts


class StoreLayout:
    """Where a store keeps each distinct prefix once and each row's own tokens (with its room)."""

    def __init__(self, prefixes: Sequence[PrefixState], room: Sequence[int], first_free: int) -> None:
        """``room``: slots for each row's tokens; slots before ``first_free`` are the caller's."""
        self.prefixes = {id(prefix): prefix for prefix in prefixes}
        self.prefix_start: dict[int, int] = {}
        start = first_free
        for key, prefix in self.prefixes.items():
            self.prefix_start[key] = start
            start += len(prefix.token_ids)
        self.own_start = []
        for tokens in room:
            self.own_start.append(start)
            start += tokens
        self.size = start

    def store(self, index: int, which: int, heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s (size, heads, dim) store of keys (``which`` 0) or values (1): zeros but
        for the prefixes', on ``like``'s device in its dtype."""
        buffer = like.new_zeros((self.size, heads, dim))
        for key, prefix in self.prefixes.items():
            if prefix.token_ids:
                tensor = prefix.key_values[index][which][0]  # (heads, tokens, dim)
                buffer[self.prefix_start[key] : self.prefix_start[key] + tensor.shape[1]] = tensor.transpose(0, 1)
        return buffer


def store_and_gather(
    keys: torch.Tensor,
    values: torch.Tensor,
    writes: torch.Tensor,
    slots: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write (rows, heads, queries, dim) keys and values into (slots, heads, dim) stores at ``writes``
    (rows * queries), then gather ``slots`` (rows, columns) as (rows, heads, columns, dim)."""
    rows, heads, queries, dim = new_keys.shape
    gathered = []
    for store, new in ((keys, new_keys), (values, new_values)):
        store.index_copy_(0, writes, new.transpose(1, 2).reshape(rows * queries, heads, dim))
        picked = store.index_select(0, slots.flatten())
        gathered.append(picked.view(*slots.shape, heads, dim).transpose(1, 2))
    return gathered[0], gathered[1]


class SharedPrefixCache:
    """What transformers' decoder layers ask of a cache, for one token per row per forward."""

    def __init__(self, rows: Sequence[Running], device: torch.device) -> None:
        """Take the rows' own caches, with room for each row's remaining tokens."""
        own = [row.cached_length - row.prefix_length for row in rows]
        self.length = max(row.cached_length for row in rows)
        room = [
            tokens + row.job.kwargs["max_new_tokens"] - len(row.generated)
            for row, tokens in zip(rows, own, strict=True)
        ]
        # Slot 0 stays zero: what the padding reads.
        layout = StoreLayout([row.job.prefix for row in rows], room, first_free=1)
        self.own_start = layout.own_start
        slots = torch.zeros(len(rows), self.length, dtype=torch.long)
        for n, row in enumerate(rows):
            first = self.length - row.cached_length
            if row.prefix_length:
                begin = layout.prefix_start[id(row.job.prefix)]
                slots[n, first : first + row.prefix_length] = torch.arange(begin, begin + row.prefix_length)
            slots[n, self.length - own[n] :] = torch.arange(self.own_start[n], self.own_start[n] + own[n])
        self.slots = slots.to(device)  # (rows, length): where each place of each row is stored
        self.own = own
        self.writes = torch.tensor([s + o for s, o in zip(self.own_start, own, strict=True)], device=device)
        self.keys: list[torch.Tensor] = []  # per layer, (tokens, heads, dim)
        self.values: list[torch.Tensor] = []
        while rows[0].key_values:  # layer by layer, so each row's old copy goes as soon as it is stored
            index = len(self.keys)
            parts = [row.key_values.pop(0) for row in rows]
            for row in rows:
                row.buffer = None  # its views are what ``parts`` took
            for which, store in enumerate((self.keys, self.values)):
                first_part = parts[0][which]
                buffer = layout.store(index, which, first_part.shape[1], first_part.shape[3], first_part)
                for n, part in enumerate(parts):
                    buffer[self.own_start[n] : self.own_start[n] + own[n]] = part[which][0].transpose(0, 1)
                store.append(buffer)
            del parts
        self.is_sliding = [False] * len(self.keys)
        self.is_compileable = False

    def begin_step(self) -> None:
        """Each row gets one more place, at the end, for the token this forward runs."""
        self.slots = torch.cat([self.slots, self.writes[:, None]], dim=1)
        self.length += 1

    def end_step(self) -> None:
        self.writes += 1
        self.own = [o + 1 for o in self.own]

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's (rows, heads, 1, dim) keys and values; the rows' whole keys and values, gathered."""
        return store_and_gather(self.keys[layer_idx], self.values[layer_idx], self.writes, self.slots, key, value)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length - 1  # what was cached before this step's token

    def past(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' keys and values before this step's token, (rows, heads, columns, dim): for a
        model that appends the new ones itself (``core.model.decode.mosaic_cache``)."""
        slots = self.slots[:, :-1]
        gathered = []
        for store in (self.keys[layer_idx], self.values[layer_idx]):
            picked = store.index_select(0, slots.flatten())
            gathered.append(picked.view(*slots.shape, *store.shape[1:]).transpose(1, 2))
        return gathered[0], gathered[1]

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        return self.length, 0

    def masked(self) -> torch.Tensor:
        """(rows, 1, 1, columns): True at the padding a row may not read."""
        return (self.slots == 0)[:, None, None]

    def own_key_values(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row ``n``'s own tokens' keys and values, (1, heads, tokens, dim) per layer, as views."""
        begin, end = self.own_start[n], self.own_start[n] + self.own[n]
        return [
            (keys[begin:end].transpose(0, 1)[None], values[begin:end].transpose(0, 1)[None])
            for keys, values in zip(self.keys, self.values, strict=True)
        ]


class SharedPrefixSteps:
    """The rows stepped through the LM's layers, over a cache that holds each prefix once.

    With the language model's parts (``core.model.layers.layer_stack``) the step drives its decoder
    layers directly, as upstream's forward would for these positions and this mask, without the
    model-level wrapping done again for every token; a row alone then steps over its own
    ``RowCache``. Without them (MPT-1B's hub code), the step is the LM's own forward.
    """

    def __init__(
        self, conditioning: LayerConditioning, rows: list[Running], parts: LanguageModelParts | None = None
    ) -> None:
        self.conditioning = conditioning
        self.parts = parts
        self.cache: SharedPrefixCache | RowCache
        if parts is not None and len(rows) == 1:
            self.cache = RowCache.taking(rows[0])
        else:
            self.cache = SharedPrefixCache(rows, conditioning.device)
            self.mask = (self.cache.slots != 0).long()
        self.images = conditioning.latest_images(rows, take=True)

    def reading(self) -> contextlib.AbstractContextManager[None]:
        return self.conditioning.reading_images(self.images)

    def step(self, rows: Sequence[Running]) -> torch.Tensor:
        """One new token for every row: logits (rows, vocab). Each row reads its latest image."""
        device = self.conditioning.device
        self.cache.begin_step()
        tokens = rows[0].sequence[:, -1:] if len(rows) == 1 else torch.cat([row.sequence[:, -1:] for row in rows])
        positions = torch.tensor([[row.sequence.shape[1] - 1] for row in rows], device=device)
        if self.parts is None:
            assert isinstance(self.cache, SharedPrefixCache)  # a row alone takes its own only with the parts
            self.mask = F.pad(self.mask, (0, 1), value=1)
            logits = self.conditioning.step_tokens(tokens, positions, self.cache, self.mask)
        else:
            distance = torch.arange(1 - self.cache.length, 1, device=device)
            layers = self.conditioning.layers
            logits = self.parts.last_logits(layers, tokens, self.cache, self.cache.masked(), distance, positions)
        self.cache.end_step()
        return logits

    def hand_back(self, n: int, row: Running) -> None:
        """Row ``n`` leaves the batch with its caches: views of the batch's, let go when the next batch takes them."""
        row.key_values = self.cache.own_key_values(n)
        row.buffer = self.cache if isinstance(self.cache, RowCache) else None
        row.image_keys_values = [None if kv is None else (kv[0][n : n + 1], kv[1][n : n + 1]) for kv in self.images]
