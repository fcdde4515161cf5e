"""The language model's layers, conditioned on images explicitly for each forward.

Conditioning is passed to upstream's layers explicitly for each forward (image features and each
token's image index) and cleared afterwards, instead of through the mixin's forward, which
recomputes image positions from the token ids it sees and would lose the prefix's images.

Kept apart from the decoder, which owns the caches and the decode loop, so that the steppers
(shared prefix, static steps, batched prefill) are given the layers and their forward without
taking the decoder back.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import cast

import torch
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from torch import nn
from transformers import DynamicCache

from core.model.decode.mosaic_cache import CacheWithPast, TupleCacheView, keeps_tuple_cache
from core.model.decode.state import Running
from core.model.layers.flamingo_layer import ReusableMediaLayer, media_keys_values
from core.model.layers.layer_stack import LanguageModelParts, LayerCache


class LayerConditioning:
    """The Flamingo model's decoder layers and the LM's own forward, with the images each forward reads."""

    def __init__(self, model: Flamingo, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.dtype = dtype
        self.device = device
        lm = model.lang_encoder
        mro = type(lm).__mro__
        # The language model's own forward, beneath the Flamingo mixin.
        self._lm_forward = cast("type[nn.Module]", mro[mro.index(FlamingoLMMixin) + 1]).forward
        self.layers: list[ReusableMediaLayer] = list(lm._get_decoder_layers())
        # MPT places tokens with ALiBi and takes no position ids; LLaMA and GPT-NeoX need them in a batch.
        self._takes_positions = "position_ids" in inspect.signature(self._lm_forward).parameters
        self._tuple_cache = keeps_tuple_cache(lm)  # MPT-1B's hub code: its own cache format

    @contextlib.contextmanager
    def reading(self, media: torch.Tensor | None) -> Iterator[None]:
        """Give every layer the images (and their keys and values, once) for the forwards inside."""
        if media is None:
            media = torch.zeros(1, 1, 1, self.model.vis_dim, device=self.device, dtype=self.dtype)
        try:
            for layer in self.layers:
                layer.condition_vis_x(media)
                layer.condition_use_cached_media(False)
                layer.use_media(media)
            yield
        finally:
            self.forget_media()

    def latest_images(self, rows: list[Running], take: bool) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per layer, the keys and values of each row's latest image, one row after another.

        ``take``: the rows give theirs up, so the batch holds the only copy.
        """
        batched: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for index in range(len(self.layers)):
            parts = [row.image_keys_values[index] for row in rows]
            pairs = [part for part in parts if part is not None]
            if len(pairs) < len(parts):  # a layer without cross-attention: no row has an image there
                batched.append(None)
                continue
            batched.append((torch.cat([pair[0] for pair in pairs]), torch.cat([pair[1] for pair in pairs])))
        if take:
            for row in rows:
                row.image_keys_values = []
        return batched

    @contextlib.contextmanager
    def reading_images(self, per_layer: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> Iterator[None]:
        """Each row reads its own image's keys and values (row ``n`` of each layer's)."""
        try:
            for layer, keys_values in zip(self.layers, per_layer, strict=True):
                if keys_values is not None:
                    layer.use_keys_values(keys_values, images=1, latents=keys_values[0].shape[2])
                    layer.condition_use_cached_media(False)
            yield
        finally:
            self.forget_media()

    def reading_latest_images(self, rows: list[Running]) -> contextlib.AbstractContextManager[None]:
        """Each row reads the image its prompt ended with, from the keys and values its prefill made."""
        return self.reading_images(self.latest_images(rows, take=False))

    @contextlib.contextmanager
    def reading_after(
        self, earlier: Sequence[tuple[torch.Tensor, torch.Tensor] | None], media: torch.Tensor | None
    ) -> Iterator[None]:
        """As ``reading``, after one image whose keys and values are known (the task's last example's)."""
        try:
            for layer, known in zip(self.layers, earlier, strict=True):
                if known is None:
                    continue
                keys, values = known
                if media is not None:
                    new_keys, new_values = media_keys_values(layer.gated_cross_attn_layer, media)
                    keys, values = torch.cat([keys, new_keys], dim=2), torch.cat([values, new_values], dim=2)
                images = 1 + (media.shape[1] if media is not None else 0)
                layer.use_keys_values((keys, values), images=images, latents=known[0].shape[2])
                layer.condition_use_cached_media(False)
            yield
        finally:
            self.forget_media()

    def forget_media(self) -> None:
        """No image or position may outlive its forward, whatever happened during it."""
        self.model.lang_encoder.clear_conditioned_layers()
        for layer in self.layers:
            layer.use_media(None)

    def _locate_media(self, image_index: torch.Tensor) -> None:
        """Tell the layers each token's 1-based image (0: none).

        Upstream numbers a token's image by a cumulative sum over media flags; giving it the
        per-token increments of our index reproduces the same numbers for any offset.
        """
        increments = torch.diff(image_index, dim=1, prepend=torch.zeros_like(image_index[:, :1]))
        for layer in self.layers:
            layer.condition_media_locations(increments)

    def forward(self, ids: torch.Tensor, image_index: torch.Tensor, cache: DynamicCache, past: int) -> torch.Tensor:
        """Logits of the last position; ``image_index`` is each token's 1-based image (0: none)."""
        self._locate_media(image_index)
        output = self._lm_forward(
            self.model.lang_encoder,
            input_ids=ids,
            attention_mask=torch.ones(1, past + ids.shape[1], dtype=torch.long, device=self.device),
            past_key_values=self._as_taken(cache, rows=1),
            use_cache=True,
        )
        return output.logits[:, -1, :]

    def forward_driven(
        self, parts: LanguageModelParts, ids: torch.Tensor, image_index: torch.Tensor, cache: LayerCache, past: int
    ) -> torch.Tensor:
        """As ``forward`` for one row, through the layers driven directly: into a cache of our own
        (a row's buffer) with no copy of its past, LLaMA's projections side by side."""
        self._locate_media(image_index)
        queries = ids.shape[1]
        positions = torch.arange(past, past + queries, device=self.device)[None]
        column = torch.arange(past + queries, device=self.device)
        masked = (column > positions[..., None])[:, None] if queries > 1 else None  # causal; one token sees all
        return parts.last_logits(self.layers, ids, cache, masked, column - (past + queries - 1), positions)

    def step_tokens(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | CacheWithPast, mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (rows, vocab) of one token per row, each row reading the image it was given."""
        for layer in self.layers:
            layer.condition_media_locations(torch.ones_like(tokens))
        extra = {"position_ids": positions} if self._takes_positions else {}
        output = self._lm_forward(
            self.model.lang_encoder,
            input_ids=tokens,
            attention_mask=mask,
            past_key_values=self._as_taken(cache, rows=tokens.shape[0]),
            use_cache=True,
            **extra,
        )
        return output.logits[:, -1, :]

    def _as_taken(self, cache: DynamicCache | CacheWithPast, rows: int) -> object:
        """The cache in the form the language model takes."""
        if not self._tuple_cache:
            return cache
        config = self.model.lang_encoder.config
        empty = torch.empty(rows, 0, config.d_model, dtype=self.dtype, device=self.device)
        return TupleCacheView(cache, len(self.layers), config.n_heads, empty)
