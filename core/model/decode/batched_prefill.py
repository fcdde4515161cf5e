"""Requests that arrive together run their own tokens in one forward.

Why: a request's own tokens after its task's prefix are few ("<image>Output:"), so on a GPU its
prefill costs about what a decode step does: kernel launches, not arithmetic. Thirty-two requests
arriving together spent most of their time in thirty-two prefills one after another. Here a group
runs as one forward over the layers (``core.model.layers.layer_stack``):

- each distinct prefix is stored once per layer and gathered into left-padded rows, as
  ``core.model.decode.shared_prefix`` does for decode steps; the requests' tokens are left-padded to the
  longest, and a padding token writes its keys to a scratch slot that no row reads;
- each row reads its own images: first the prefix's last example image (which the request's text
  before its own ``<image>`` attends to), then its own, padded to the most any row has.

Padding changes only the length of reductions, so these rows are held to the batched paths'
near-tie rule. A request alone keeps the exact path (``FlamingoDecoder.prefill``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from core.model.decode.shared_prefix import StoreLayout, store_and_gather
from core.model.decode.state import Running
from core.model.layers.flamingo_layer import media_keys_values
from core.model.layers.layer_stack import LanguageModelParts

if TYPE_CHECKING:
    from core.model.decode.conditioning import LayerConditioning
    from core.model.decode.state import DecodeJob

# Transient bytes of one group's forward (one layer's attention scores, every layer's image keys
# and values); larger arrivals are split into groups, so a batched prefill stays a small part of
# the memory a batch's cache takes.
GROUP_BYTES = 2**28
_PADDING, _SCRATCH = 0, 1  # store slots: zeros that padding columns read, and where padding tokens write


class _PrefillCache:
    """Each layer's keys and values in one store; a forward writes its tokens' and gathers the rows'."""

    def __init__(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], writes: torch.Tensor, slots: torch.Tensor
    ) -> None:
        self.keys, self.values = keys, values  # per layer, (store slots, heads, dim)
        self.writes = writes  # (rows * queries,): the store slot of each new token
        self.slots = slots  # (rows, columns): the store slot each column of each row reads

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return store_and_gather(self.keys[layer_idx], self.values[layer_idx], self.writes, self.slots, key, value)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # the gathered columns are the whole length: MPT then takes the bias of them all


def transient_bytes(conditioning: LayerConditioning, jobs: Sequence[DecodeJob]) -> int:
    """What a group's forward holds beyond the rows' caches: see ``GROUP_BYTES``."""
    queries = max(len(job.request_ids) for job in jobs)
    columns = max(len(job.prefix.token_ids) + len(job.request_ids) for job in jobs)
    heads = conditioning.model.lang_encoder.config.num_attention_heads  # the queries' heads, which the scores have
    scores = len(jobs) * heads * queries * columns * 4
    images = 1 + max(len(job.request_images) for job in jobs)
    latents = jobs[0].request_images[0].shape[0]
    blocks = [layer.gated_cross_attn_layer for layer in conditioning.layers if layer.gated_cross_attn_layer is not None]
    media = sum(block.attn.to_kv.out_features for block in blocks) * len(jobs) * images * latents
    return scores + media * conditioning.dtype.itemsize


def groups(conditioning: LayerConditioning, jobs: Sequence[DecodeJob]) -> list[list[DecodeJob]]:
    """Consecutive jobs, in groups whose forward stays within ``GROUP_BYTES``; a job without images of
    its own goes alone."""
    result: list[list[DecodeJob]] = []
    for job in jobs:
        joinable = result and job.request_images and result[-1][-1].request_images
        if joinable and transient_bytes(conditioning, [*result[-1], job]) <= GROUP_BYTES:
            result[-1].append(job)
        else:
            result.append([job])
    return result


def _media_keys_values(
    conditioning: LayerConditioning, jobs: Sequence[DecodeJob], latents: int
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per layer, (rows, heads, (1 + images) * latents, dim): the prefix's last image (zeros without
    one), then the row's own images (zeros past its last)."""
    most = max(len(job.request_images) for job in jobs)
    vis_dim, device, dtype = conditioning.model.vis_dim, conditioning.device, conditioning.dtype
    media = torch.zeros(len(jobs), most, latents, vis_dim, device=device, dtype=dtype)
    for n, job in enumerate(jobs):
        media[n, : len(job.request_images)] = torch.stack(job.request_images)
    per_layer: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for index, layer in enumerate(conditioning.layers):
        if layer.gated_cross_attn_layer is None:
            per_layer.append(None)
            continue
        own = media_keys_values(layer.gated_cross_attn_layer, media)
        earlier = [tensor.new_zeros((len(jobs), tensor.shape[1], latents, tensor.shape[3])) for tensor in own]
        for n, job in enumerate(jobs):
            last = job.prefix.last_image[index] if job.prefix.last_image is not None else None
            if last is not None:  # a layer that cross-attends keeps the last example's image
                for which, tensor in enumerate(last):
                    earlier[which][n] = tensor[0]
        per_layer.append((torch.cat([earlier[0], own[0]], dim=2), torch.cat([earlier[1], own[1]], dim=2)))
    return per_layer


def prefill_together(
    conditioning: LayerConditioning, parts: LanguageModelParts, jobs: Sequence[DecodeJob], media_token_id: int
) -> list[Running]:
    """Each job's own tokens against its task's prefix, all in one forward; jobs must have images."""
    device = conditioning.device
    rows = len(jobs)
    own = [len(job.request_ids) for job in jobs]
    prefix_lengths = [len(job.prefix.token_ids) for job in jobs]
    queries = max(own)
    columns = max(p + o for p, o in zip(prefix_lengths, own, strict=True))
    latents = jobs[0].request_images[0].shape[0]
    # The store: padding's zeros, the scratch slot, each distinct prefix once, then each row's tokens.
    layout = StoreLayout([job.prefix for job in jobs], own, first_free=_SCRATCH + 1)
    own_start = layout.own_start
    slots = torch.full((rows, columns), _PADDING, dtype=torch.long)
    writes = torch.full((rows, queries), _SCRATCH, dtype=torch.long)
    tokens = torch.zeros(rows, queries, dtype=torch.long)
    positions = torch.zeros(rows, queries, dtype=torch.long)
    image_index = torch.zeros(rows, queries, dtype=torch.long)
    first_column = torch.zeros(rows, dtype=torch.long)
    for n, job in enumerate(jobs):
        length, prefix_length = own[n], prefix_lengths[n]
        first_column[n] = columns - length - prefix_length
        begin = layout.prefix_start[id(job.prefix)]
        slots[n, columns - length - prefix_length : columns - length] = torch.arange(begin, begin + prefix_length)
        slots[n, columns - length :] = torch.arange(own_start[n], own_start[n] + length)
        writes[n, queries - length :] = torch.arange(own_start[n], own_start[n] + length)
        ids = torch.tensor(job.request_ids)
        tokens[n, queries - length :] = ids
        positions[n, queries - length :] = torch.arange(prefix_length, prefix_length + length)
        seen = (ids == media_token_id).cumsum(dim=0)
        # Image 1 is the prefix's last example; a row without one reads nothing before its own first.
        image_index[n, queries - length :] = seen + 1 if job.prefix.last_image is not None else (seen + 1) * (seen > 0)
    like = jobs[0].request_images[0]  # the model's device and dtype
    heads, dim = parts.key_value_heads, parts.head_dim
    stores = tuple(
        [layout.store(index, which, heads, dim, like) for index in range(len(conditioning.layers))] for which in (0, 1)
    )
    column = torch.arange(columns)
    newest_seen = columns - queries + torch.arange(queries)  # query j sits at this column
    masked = (column < first_column.view(rows, 1, 1, 1)) | (column > newest_seen.view(1, 1, queries, 1))
    media = _media_keys_values(conditioning, jobs, latents)
    images = 1 + max(len(job.request_images) for job in jobs)  # the prefix's last, then the most any row has
    increments = torch.diff(image_index, dim=1, prepend=torch.zeros(rows, 1, dtype=torch.long)).to(device)
    cache = _PrefillCache(stores[0], stores[1], writes.flatten().to(device), slots.to(device))
    try:
        for layer, keys_values in zip(conditioning.layers, media, strict=True):
            layer.use_keys_values(keys_values, images=images, latents=latents)
            layer.condition_use_cached_media(False)
            layer.condition_media_locations(increments)
        logits = parts.last_logits(
            conditioning.layers,
            tokens.to(device),
            cache,
            masked.to(device),
            (column - (columns - 1)).to(device),
            positions.to(device),
        )
    finally:
        conditioning.forget_media()
    running = []
    for n, job in enumerate(jobs):
        last = len(job.request_images)  # the row's latest image: its own last
        image = slice(last * latents, (last + 1) * latents)
        latest = [
            None if kv is None else (kv[0][n : n + 1, :, image].clone(), kv[1][n : n + 1, :, image].clone())
            for kv in media
        ]
        key_values = [
            tuple(store[own_start[n] : own_start[n] + own[n]].transpose(0, 1)[None] for store in (keys, values))
            for keys, values in zip(*stores, strict=True)
        ]
        running.append(Running.prefilled(job, logits[n : n + 1], key_values, latest, device))
    return running
