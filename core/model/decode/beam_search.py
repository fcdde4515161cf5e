"""Beam search on the decoder's cached prefixes, choosing exactly as upstream's ``generate`` does.

Upstream runs a request's whole prompt through ``generate`` with one copy per beam. Here each
request's own tokens run once against its task's prefix and its beams share that cache; requests
with the same beam settings are searched together, left-padded to one length as transformers pads
a batch. The bookkeeping is transformers' own (the beam helpers of the pinned version), so every
choice is the one upstream makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from core.model.decode.decoder import FlamingoDecoder
from core.model.decode.logits import logits_processors, processed
from core.model.decode.state import DecodeJob, Running


@dataclass(frozen=True)
class BeamSettings:
    """Beam search as upstream's ``generate`` runs it: its end-of-chunk token is the only stop.

    ``do_sample``: beams are drawn from the processed scores instead of taken best first."""

    num_beams: int
    do_sample: bool
    length_penalty: float
    early_stopping: bool | str
    eos_id: int
    pad_id: int


def beam_search(
    decoder: FlamingoDecoder,
    jobs: Sequence[DecodeJob],
    media_token_id: int,
    beams: BeamSettings,
    finished: Callable[[int, list[int]], None],
) -> None:
    """Search ``jobs`` together; ``finished(n, tokens)`` gets each one's best beam as soon as its search ends."""
    conditioning = decoder.conditioning  # the layers' forward, which the beams step through
    lm, device = conditioning.model.lang_encoder, conditioning.device
    width, early, count = beams.num_beams, beams.early_stopping, len(jobs)
    with torch.inference_mode():
        rows = [decoder.prefill(job, media_token_id) for job in jobs]
        own = [row.sequence.shape[1] for row in rows]  # each request's prompt length
        prompt_length = max(own)
        longest = max(job.kwargs["max_new_tokens"] for job in jobs)
        max_length = prompt_length + longest
        most = torch.tensor([[job.kwargs["max_new_tokens"]] for job in jobs], device=device)
        processors = [
            logits_processors(job.kwargs, n, {beams.eos_id}, device) for job, n in zip(jobs, own, strict=True)
        ]
        keep = 2 * width  # transformers keeps (1 + number of eos tokens) * beams candidates
        top_mask = torch.arange(keep, device=device) < width
        running = torch.full((count, width, max_length), beams.pad_id, dtype=torch.int64, device=device)
        for b, row in enumerate(rows):
            running[b, :, prompt_length - own[b] : prompt_length] = row.sequence
        best = running.clone()
        running_scores = torch.zeros(count, width, device=device)
        running_scores[:, 1:] = -1e9
        best_scores = torch.full((count, width), -1e9, device=device)
        is_finished = torch.zeros(count, width, dtype=torch.bool, device=device)
        improvable = torch.ones(count, 1, dtype=torch.bool, device=device)
        shape = (count, width, longest)
        running_indices = torch.full(shape, -1, dtype=torch.int32, device=device)
        best_indices = running_indices.clone()
        cache, mask = padded_batch(rows, device)
        cache.batch_repeat_interleave(width)
        mask = mask.repeat_interleave(width, dim=0)
        offsets = torch.tensor(own, device=device).repeat_interleave(width)[:, None] - prompt_length
        logits = torch.cat([row.logits for row in rows]).repeat_interleave(width, dim=0)
        length, searching = prompt_length, set(range(count))
        with conditioning.reading_latest_images([row for row in rows for _ in range(width)]):
            while True:
                log_probs = F.log_softmax(logits.float(), dim=-1).view(count, width, -1)
                for b in range(count):  # on each request's own tokens, as if it ran alone
                    own_tokens = running[b, :, prompt_length - own[b] : length]
                    log_probs[b] = processed(processors[b], own_tokens, log_probs[b])
                accumulated = (log_probs + running_scores[:, :, None]).reshape(count, -1)
                top_scores, top_sequences, top_indices = lm._get_top_k_continuations(
                    accumulated, running, running_indices, length, prompt_length, beams.do_sample, keep, width,
                    log_probs.shape[-1], count,
                )  # fmt: skip
                stopped = torch.tensor([[job.should_stop()] for job in jobs], device=device)
                hits = (top_sequences[:, :, length] == beams.eos_id) | (length + 1 - prompt_length >= most)
                hits |= stopped
                running, running_scores, running_indices = lm._get_running_beams_for_next_iteration(
                    top_scores, top_sequences, top_indices, hits, width
                )
                best, best_scores, best_indices, is_finished = lm._update_finished_beams(
                    best, top_sequences, best_scores, top_scores, best_indices, top_indices,
                    improvable, is_finished, hits, top_mask, width, length, prompt_length,
                    beams.length_penalty, early,
                )  # fmt: skip
                length += 1
                for b in sorted(searching):  # per request: each has its own length limit
                    one = slice(b, b + 1)
                    improvable[one] = lm._check_early_stop_heuristic(
                        improvable[one], running_scores[one], best_scores[one], is_finished[one], length,
                        prompt_length + int(most[b]), prompt_length, early, beams.length_penalty,
                    )  # fmt: skip
                    if not lm._beam_search_has_unfinished_sequences(
                        improvable[one], is_finished[one], hits[one], early
                    ):
                        searching.discard(b)
                        generated = int(((best_indices[b, 0] + 1) != 0).sum())
                        finished(b, best[b, 0, prompt_length : prompt_length + generated].tolist())
                if not searching:
                    return
                cache.reorder_cache(running_indices[:, :, length - 1 - prompt_length].flatten())
                mask = F.pad(mask, (0, 1), value=1)
                positions = offsets + length - 1
                logits = conditioning.step_tokens(running[:, :, length - 1].reshape(-1, 1), positions, cache, mask)


def padded_batch(rows: list[Running], device: torch.device) -> tuple[DynamicCache, torch.Tensor]:
    """One cache for the rows, left-padded to the longest (prefix included), with the mask that hides the padding.

    The rows' own caches are taken, layer by layer, so each layer's old copy goes as soon as its new one exists.
    """
    cached = [row.cached_length for row in rows]
    length = max(cached)
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    while rows[0].key_values:
        index = len(layers)
        keys, values = zip(*(row.key_values.pop(0) for row in rows), strict=True)
        for row in rows:
            row.buffer = None  # its views are what ``keys`` and ``values`` took
        layers.append((_left_padded(rows, keys, index, 0), _left_padded(rows, values, index, 1)))
        del keys, values
    mask = torch.stack([F.pad(torch.ones(n, dtype=torch.long, device=device), (length - n, 0)) for n in cached])
    return DynamicCache(ddp_cache_data=layers), mask


def _left_padded(rows: Sequence[Running], parts: Sequence[torch.Tensor], index: int, which: int) -> torch.Tensor:
    """(rows, heads, longest, dim): each row's prefix and own ``parts`` of layer ``index``, zeros before them."""
    cached = [row.prefix_length + part.shape[2] for row, part in zip(rows, parts, strict=True)]
    length = max(cached)
    first = parts[0]
    padded = first.new_zeros((len(parts), first.shape[1], length, first.shape[3]))
    for n, (row, part) in enumerate(zip(rows, parts, strict=True)):
        if row.prefix_length:
            start = length - cached[n]
            padded[n, :, start : start + row.prefix_length] = row.job.prefix.key_values[index][which][0]
        padded[n, :, length - part.shape[2] :] = part[0]
    return padded
