"""A lean decode loop over the Flamingo model, with the task's prefix computed once.

Why it is exact: Flamingo's text attends only to the latest image before it, and a causal LM's
keys and values for a prefix do not depend on what follows. So a task's examples (their image
features and the LM's key/value cache) can be computed once; a request then runs only its own
tokens against that cache. Its first tokens, before its own ``<image>``, attend to the last
example's image, which the prefix state keeps for them.

The layers' conditioning (which images each forward reads) is its own object
(``core.model.decode.conditioning``): the steppers are given it, not this decoder, so they do not
import it back.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence

import torch
from einops import rearrange
from open_flamingo.src.flamingo import Flamingo
from PIL import Image
from transformers import DynamicCache

from core.model.decode.batched_prefill import groups as prefill_groups
from core.model.decode.batched_prefill import prefill_together
from core.model.decode.conditioning import LayerConditioning
from core.model.decode.graphed_steps import StaticStep, StaticSteps, supports_static_steps
from core.model.decode.logits import processed
from core.model.decode.shared_prefix import SharedPrefixSteps
from core.model.decode.state import (
    DecodeJob,
    PrefixState,
    RowCache,
    Running,
    after_prefix,
    layer_keys_values,
    tensor_bytes,
)
from core.model.layers.layer_stack import language_model_parts
from core.model.lru_cache import LruCache


def image_key(image: Image.Image) -> str:
    """Identical pixels give identical features, whatever file they came from."""
    digest = hashlib.sha256(image.tobytes())
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.hexdigest()


# Images per vision forward: a 16-shot task's examples in one, and arrivals' images in as few as
# that allows, so the encoder's activations stay what a 16-shot prefix already takes.
VISION_BATCH = 16


class FlamingoDecoder:
    """Runs Flamingo forwards through its layers' conditioning; owns the image and prefix caches."""

    def __init__(
        self,
        model: Flamingo,
        dtype: torch.dtype,
        device: torch.device,
        prefix_cache_bytes: int,
        image_cache_bytes: int,
        graph_max_rows: int = 0,
        graph_bytes: int = 0,
    ) -> None:
        self.conditioning = LayerConditioning(model, dtype, device)
        self._parts = language_model_parts(model.lang_encoder)  # None: requests arriving together go one by one
        self.prefixes: LruCache[tuple[str, tuple[int, ...]], PrefixState] = LruCache(
            prefix_cache_bytes, lambda state: state.nbytes
        )
        self.images: LruCache[str, torch.Tensor] = LruCache(image_cache_bytes, tensor_bytes)
        # Small batches on a GPU replay their decode steps from CUDA graphs (core.model.decode.graphed_steps).
        self.static_steps = (
            StaticSteps(self.conditioning, graph_max_rows, graph_bytes, graphed=True)
            if graph_max_rows > 0 and device.type == "cuda" and supports_static_steps(model)
            else None
        )

    def image_features(
        self, images: Sequence[Image.Image], pixels: Callable[[Image.Image], torch.Tensor], background: bool = False
    ) -> list[torch.Tensor]:
        """(latents, dim) per image; images seen before come from the cache, the others are encoded
        together, at most ``VISION_BATCH`` per forward. ``background``: a background job's, kept only in
        room nobody else needs (``LruCache``)."""
        model, device, dtype = self.conditioning.model, self.conditioning.device, self.conditioning.dtype
        keys = [image_key(image) for image in images]
        cached = {key: self.images.get(key, refresh=not background) for key in dict.fromkeys(keys)}
        found = {key: features for key, features in cached.items() if features is not None}
        missing = [key for key, features in cached.items() if features is None]
        for start in range(0, len(missing), VISION_BATCH):
            chunk = missing[start : start + VISION_BATCH]
            batch = torch.stack([pixels(images[keys.index(key)]) for key in chunk]).to(device, dtype)
            with torch.inference_mode():
                tokens = model.vision_encoder(batch)[1]
                latents = model.perceiver(rearrange(tokens, "(b t f) v d -> b t f v d", b=1, f=1))[0]
            for key, features in zip(chunk, latents, strict=True):
                found[key] = features
                self.images.put(key, features, evicting=not background)
        return [found[key] for key in keys]

    def prefix(
        self,
        task_key: str | None,
        token_ids: list[int],
        example_images: Sequence[Image.Image],
        pixels: Callable[[Image.Image], torch.Tensor],
        media_token_id: int,
        background: bool = False,
    ) -> PrefixState:
        """The task's prefix state, from the cache or computed and kept; ``background`` as ``image_features``."""
        key = (task_key, tuple(token_ids)) if task_key is not None else None
        state = self.prefixes.get(key, refresh=not background) if key is not None else None
        if state is not None:
            return state
        conditioning = self.conditioning
        cache = DynamicCache()
        last_image = None
        if token_ids:
            features = self.image_features(example_images, pixels, background)
            media = torch.stack(features).unsqueeze(0) if features else None
            ids = torch.tensor([token_ids], device=conditioning.device)
            with torch.inference_mode(), conditioning.reading(media):
                conditioning.forward(ids, (ids == media_token_id).cumsum(dim=1), cache, past=0)
                if features:
                    last_image = tuple(layer.latest_image_keys_values() for layer in conditioning.layers)
        state = PrefixState(tuple(token_ids), tuple(layer_keys_values(layer) for layer in cache.layers), last_image)
        if key is not None:
            self.prefixes.put(key, state, evicting=not background)
        return state

    def prefill(self, job: DecodeJob, media_token_id: int) -> Running:
        """Run one request's own tokens against its task's prefix: alone, so exactly as unbatched.

        With the language model's parts, through its layers driven directly and straight into the
        buffer the row decodes in (``RowCache``): transformers' forward copied the prefix's keys and
        values into its cache, the row's own out of it, and both into that buffer again; it also built
        its masks through vmap. The same bits: the same layers' arithmetic, the same mask, the head
        over every token as transformers takes it (tested against the LM's forward). On a GPU, whose
        attention kernels are chosen by the mask's type, the LM's forward still runs it.
        """
        conditioning, prefix = self.conditioning, job.prefix
        media = torch.stack(job.request_images).unsqueeze(0) if job.request_images else None
        start = 1 if prefix.last_image is not None else 0
        ids = torch.tensor([job.request_ids], device=conditioning.device)
        image_index = start + (ids == media_token_id).cumsum(dim=1)
        last_image = prefix.last_image
        reading = conditioning.reading(media) if last_image is None else conditioning.reading_after(last_image, media)
        if self._parts is not None and conditioning.device.type == "cpu":  # checked to the bit on CPUs only
            capacity = len(prefix.token_ids) + len(job.request_ids) + job.kwargs["max_new_tokens"]
            shape = (len(conditioning.layers), self._parts.key_value_heads, self._parts.head_dim)
            buffer = RowCache(prefix, capacity, shape, conditioning.dtype, conditioning.device)
            buffer.begin_step(len(job.request_ids))
            with reading:
                logits = conditioning.forward_driven(self._parts, ids, image_index, buffer, past=len(prefix.token_ids))
                latest = [layer.latest_image_keys_values() for layer in conditioning.layers]
            return Running.prefilled(job, logits, buffer.own_key_values(0), latest, conditioning.device, buffer)
        cache = DynamicCache(ddp_cache_data=prefix.key_values) if prefix.key_values else DynamicCache()
        with reading:
            logits = conditioning.forward(ids, image_index, cache, past=len(prefix.token_ids))
            latest = [layer.latest_image_keys_values() for layer in conditioning.layers]
        pairs = [layer_keys_values(layer) for layer in cache.layers]
        key_values = [(after_prefix(keys, prefix), after_prefix(values, prefix)) for keys, values in pairs]
        return Running.prefilled(job, logits, key_values, latest, conditioning.device)

    def prefill_many(self, jobs: Sequence[DecodeJob], media_token_id: int) -> list[Running]:
        """Requests arriving together, prefilled in groups (``core.model.decode.batched_prefill``) where the model's
        family allows it; a request alone runs the exact single path."""
        if self._parts is None:
            return [self.prefill(job, media_token_id) for job in jobs]
        rows: list[Running] = []
        for group in prefill_groups(self.conditioning, jobs):
            if len(group) == 1:
                rows.append(self.prefill(group[0], media_token_id))
            else:
                rows.extend(prefill_together(self.conditioning, self._parts, group, media_token_id))
        return rows

    def _choose(self, row: Running, logits: torch.Tensor) -> bool:
        """Pick the row's next token; True when the row is finished."""
        scores = processed(row.processors, row.sequence, logits.float())
        if row.job.kwargs.get("do_sample"):
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        row.generated.append(int(token))
        row.sequence = torch.cat([row.sequence, token], dim=1)
        if row.job.progress is not None:
            row.job.progress.stepped(row.generated)
        return (
            row.generated[-1] in row.job.stop_ids
            or len(row.generated) >= row.job.kwargs["max_new_tokens"]
            or row.job.should_stop()
        )

    def decode_many(
        self,
        jobs: Sequence[DecodeJob],
        media_token_id: int,
        finished: Callable[[int, list[int]], None],
        joining: Callable[[int], Sequence[DecodeJob]] = lambda running: (),
    ) -> None:
        """Decode requests together, one token of every unfinished request per forward.

        Requests that arrive together run their own tokens together first (a request alone
        exactly as unbatched); then the requests share forwards. A request that stops is handed
        back at once and leaves the batch, so nobody waits for a longer answer; and between two
        forwards, ``joining(running)`` may hand over requests that arrived meanwhile, which join
        the batch (continuous batching), so nobody waits for a longer answer to start either.
        Requests are numbered for ``finished`` in the order they came: ``jobs`` first, then each
        joiner.
        """
        rows: dict[int, Running] = {}  # the unfinished ones: a finished request is let go at once
        active: list[int] = []
        numbers = itertools.count()

        def admit(new_jobs: Sequence[DecodeJob]) -> None:
            """Prefill them, then at once those that arrived meanwhile: a request that came during
            another's prefill does not wait a decode step more for it (a task's evaluation, run in
            the background, then delays a member by at most the rest of its own prefill)."""
            while new_jobs:
                for row in self.prefill_many(new_jobs, media_token_id):
                    index = next(numbers)
                    if not self._finish_if_done(index, row, row.logits, finished):
                        rows[index] = row
                        active.append(index)
                new_jobs = joining(len(active))

        with torch.inference_mode():
            admit(jobs)
            while active or (joined := joining(0)):
                if not active:
                    admit(joined)
                    continue
                batch = [rows[i] for i in active]
                stepper = self._stepper(batch)  # it takes the rows' caches
                while True:
                    with stepper.reading():  # not around joining, whose prefixes condition the layers
                        logits = stepper.step(batch)
                    done = {
                        i for n, i in enumerate(active) if self._finish_if_done(i, rows[i], logits[n : n + 1], finished)
                    }
                    joined = joining(len(active) - len(done))
                    if done or joined:
                        break
                for n, index in enumerate(active):
                    if index in done:
                        del rows[index]
                    else:
                        stepper.hand_back(n, batch[n])
                del stepper, batch  # the rows' views of its cache are let go layer by layer by the next batch
                active = [i for i in active if i not in done]
                admit(joined)

    def _stepper(self, rows: list[Running]) -> StaticStep | SharedPrefixSteps:
        static = self.static_steps.for_rows(rows) if self.static_steps is not None else None
        return static if static is not None else SharedPrefixSteps(self.conditioning, rows, self._parts)

    def _finish_if_done(
        self, index: int, row: Running, logits: torch.Tensor, finished: Callable[[int, list[int]], None]
    ) -> bool:
        if self._choose(row, logits):
            finished(index, row.generated)
            return True
        return False
