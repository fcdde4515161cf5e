"""Decode steps over fixed-size key/value buffers, replayed from CUDA graphs.

Why: at batch 1 a 9B model's decode step is about 900 small kernels launched from Python. On an
H200 that took 18 ms a token, five times the 3.6 ms the GPU needs to read the weights. A CUDA graph
replays the whole step in one launch, but it needs fixed shapes and addresses, so the step runs
over buffers of a fixed capacity: the rows' caches are copied in left-padded, each step writes its
keys and values at the next slot and masks the free slots. Where a token sits is computed on the
device from the slot: MPT's ALiBi bias (its distance to the newest token, upstream's bias bit for
bit) or, for LLaMA and GPT-NeoX, each row's rotary position (the slot less the row's first slot).
What differs from an unpadded forward is only the length of the reductions over masked slots, as
in any padded batch, so these steps are held to the batched paths' near-tie rule.

The step calls upstream's own layers (Flamingo's gated cross-attention, transformers' decoder
layers), so the arithmetic is theirs. Remote-code models (MPT-1B's MosaicGPT), rotary embeddings
that resize with the length (which ask the host), int8 weights (whose outlier handling synchronises
with the host) and CPUs use the eager loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from core.model.layers.layer_stack import LanguageModelParts, language_model_parts
from core.model.lru_cache import LruCache

if TYPE_CHECKING:
    from open_flamingo.src.flamingo import Flamingo

    from core.model.decode.conditioning import LayerConditioning
    from core.model.decode.state import Running

log = logging.getLogger(__name__)

CAPACITY_STEP = 128  # buffers grow in these many tokens, so few shapes (and graphs) are ever made
_WARM_UP_STEPS = 2  # eager runs on a side stream before capture, as PyTorch's CUDA graph notes ask


def supports_static_steps(model: Flamingo) -> bool:
    lm = model.lang_encoder
    int8 = any(type(module).__name__ == "Linear8bitLt" for module in lm.modules())
    return not int8 and language_model_parts(lm) is not None


def _rows_of(rows: int, like: torch.Tensor) -> torch.Tensor:
    """Zeros shaped as ``like`` but for its first dimension, ``rows``; on its device, in its dtype."""
    return torch.zeros((rows, *like.shape[1:]), device=like.device, dtype=like.dtype)


class _SlotCache:
    """What the decoder layers' attention asks of a cache: it stores the new keys and values at the step's slot."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor) -> None:
        self.keys, self.values, self.slot = keys, values, slot

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(2, self.slot, key)
        self.values[layer_idx].index_copy_(2, self.slot, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # the buffers are full length: MPT then takes the bias of all their slots


class StaticStep:
    """One decode step for a fixed number of rows and key/value capacity."""

    def __init__(self, conditioning: LayerConditioning, parts: LanguageModelParts, rows: int, capacity: int) -> None:
        self.conditioning = conditioning
        self.parts = parts
        self.rows, self.capacity = rows, capacity
        device, dtype = conditioning.device, conditioning.dtype
        shape = (rows, parts.key_value_heads, capacity, parts.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in conditioning.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in conditioning.layers]
        self.media: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.first = torch.zeros(rows, 1, 1, 1, dtype=torch.long, device=device)  # each row's first slot
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where this step's token goes
        self.slots = torch.arange(capacity, device=device)
        self.locations = torch.ones(rows, 1, dtype=torch.long, device=device)
        self.next_slot = 0  # the host's copy of ``slot``
        self.own: list[int] = []  # each row's tokens after its prefix
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits = torch.empty(0)

    @property
    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in (*self.keys, *self.values))

    def load(self, rows: Sequence[Running]) -> None:
        """Take the rows' caches and copy their latest images in, right-aligned at the same slot."""
        length = max(row.cached_length for row in rows)
        self.own = []
        for n, row in enumerate(rows):
            first, own = length - row.cached_length, row.cached_length - row.prefix_length
            self.first[n] = first
            self.own.append(own)
            for index, (keys, values) in enumerate(row.key_values):
                if row.prefix_length:
                    prefix_keys, prefix_values = row.job.prefix.key_values[index]
                    self.keys[index][n, :, first : first + row.prefix_length] = prefix_keys[0]
                    self.values[index][n, :, first : first + row.prefix_length] = prefix_values[0]
                self.keys[index][n, :, length - own : length] = keys[0]
                self.values[index][n, :, length - own : length] = values[0]
            row.key_values, row.buffer = [], None
        self.slot.fill_(length)
        self.next_slot = length
        self.make_image_buffers(rows)
        for index, buffers in enumerate(self.media):
            if buffers is not None:
                for n, row in enumerate(rows):
                    pair = row.image_keys_values[index]
                    if pair is not None:  # every row has one where the layer cross-attends
                        buffers[0][n] = pair[0][0]
                        buffers[1][n] = pair[1][0]

    def make_image_buffers(self, rows: Sequence[Running]) -> None:
        """The buffers for the rows' latest images' keys and values, made once their shapes are known."""
        if not self.media:
            self.media = [
                None if kv is None else (_rows_of(self.rows, kv[0]), _rows_of(self.rows, kv[1]))
                for kv in rows[0].image_keys_values
            ]

    def reading(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # each step gives the layers its own image buffers

    def step(self, rows: Sequence[Running]) -> torch.Tensor:
        """Logits (rows, vocab) of the rows' next token; the slot advances."""
        if self.next_slot >= self.capacity:
            raise RuntimeError(f"decode buffers of {self.capacity} tokens are full")
        self.tokens.copy_(torch.cat([row.sequence[:, -1:] for row in rows]))
        if self.graph is not None:
            self.graph.replay()
        else:
            with self._reading():
                self.logits = self._forward()
        self.next_slot += 1
        self.own = [own + 1 for own in self.own]
        return self.logits

    def hand_back(self, n: int, row: Running) -> None:
        """Row ``n`` leaves the batch with its cache (its latest image's keys and values stayed with it)."""
        row.key_values = self.own_key_values(n)

    def own_key_values(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row ``n``'s cache after its prefix, copied out of the shared buffers."""
        start = self.next_slot - self.own[n]
        return [
            (keys[n : n + 1, :, start : self.next_slot].clone(), values[n : n + 1, :, start : self.next_slot].clone())
            for keys, values in zip(self.keys, self.values, strict=True)
        ]

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            for layer, buffers in zip(self.conditioning.layers, self.media, strict=True):
                if buffers is not None:
                    layer.use_keys_values(buffers, images=1, latents=buffers[0].shape[2])
                    layer.condition_use_cached_media(False)
                layer.condition_media_locations(self.locations)
            yield
        finally:
            self.conditioning.forget_media()

    def _forward(self) -> torch.Tensor:
        """The LM's forward for one token per row, over the buffers."""
        masked = (self.slots < self.first) | (self.slots > self.slot)  # (rows, 1, 1, capacity)
        positions = self.slot - self.first.view(self.rows, 1)
        cache = _SlotCache(self.keys, self.values, self.slot)
        layers = self.conditioning.layers
        logits = self.parts.last_logits(layers, self.tokens, cache, masked, self.slots - self.slot, positions)
        self.slot.add_(1)
        return logits

    def capture(self) -> None:
        """Record the step (its warm-ups write only at the current slot, which the first step rewrites)."""
        slot = self.slot.clone()
        stream = torch.cuda.Stream(self.conditioning.device)
        stream.wait_stream(torch.cuda.current_stream(self.conditioning.device))
        with self._reading():
            with torch.cuda.stream(stream):
                for _ in range(_WARM_UP_STEPS):
                    self._forward()
                    self.slot.copy_(slot)  # the warm-ups wrote at this slot; the step rewrites it
            torch.cuda.current_stream(self.conditioning.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use the GPU
                self.logits = self._forward()
        self.slot.copy_(slot)
        self.graph = graph


class StaticSteps:
    """The static steps made so far, by (rows, capacity), the least recently used let go first."""

    def __init__(self, conditioning: LayerConditioning, max_rows: int, memory_bytes: int, graphed: bool) -> None:
        self.conditioning = conditioning
        self.max_rows = max_rows
        self.graphed = graphed
        self.steps: LruCache[tuple[int, int], StaticStep] = LruCache(memory_bytes, lambda step: step.nbytes)
        self.used = 0  # batches decoded with a static step
        self.failed = False
        self.memory_bytes = memory_bytes
        parts = language_model_parts(conditioning.model.lang_encoder)
        if parts is None:
            raise ValueError("this language model's decode steps cannot run over fixed buffers")
        self.parts = parts
        # Key and value bytes of one token of one row, over all layers.
        width = parts.key_value_heads * parts.head_dim
        self.bytes_per_token = 2 * len(conditioning.layers) * width * conditioning.dtype.itemsize

    def for_rows(self, rows: Sequence[Running]) -> StaticStep | None:
        """A step loaded with the rows, or None where the eager loop must take them."""
        if self.failed or len(rows) > self.max_rows:
            return None
        length = max(row.cached_length for row in rows)
        remaining = max(row.job.kwargs["max_new_tokens"] - len(row.generated) for row in rows)
        capacity = -(-(length + remaining) // CAPACITY_STEP) * CAPACITY_STEP
        if len(rows) * capacity * self.bytes_per_token > self.memory_bytes:
            return None  # longer answers than the graphs' memory allows: they go through the eager loop
        key = (len(rows), capacity)
        step = self.steps.get(key)
        if step is None:
            step = StaticStep(self.conditioning, self.parts, len(rows), capacity)
            self.steps.put(key, step)
        if self.graphed and step.graph is None:
            step.make_image_buffers(rows)
            try:
                step.capture()  # before the rows' caches are taken, so that a failure leaves them whole
            except torch.OutOfMemoryError:  # the memory of the moment, not the model: these rows go eagerly
                log.warning("no memory to capture a decode step for %d rows; they decode without a graph", len(rows))
                self.steps.discard(key)
                return None
            except RuntimeError as error:  # an operation a graph cannot hold: decode eagerly from now on
                log.warning("CUDA graphs are off for this model: %s", error)
                self.failed = True
                self.steps = LruCache(0, lambda step: step.nbytes)
                return None
        step.load(rows)
        self.used += 1
        return step
