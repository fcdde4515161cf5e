"""A lean decode loop over the Flamingo model, with the task's prefix computed once.

Why it is exact: Flamingo's text attends only to the latest image before it, and a causal LM's
keys and values for a prefix do not depend on what follows. So a task's examples (their image
features and the LM's key/value cache) can be computed once; a request then runs only its own
tokens against that cache. Its first tokens, before its own ``<image>``, attend to the last
example's image, which the prefix state keeps for them.

Conditioning is passed to upstream's layers explicitly for each forward (image features and each
token's image index) and cleared afterwards, instead of through the mixin's forward, which
recomputes image positions from the token ids it sees and would lose the prefix's images.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
from collections.abc import Callable, Iterator, Sequence

import torch
from einops import rearrange
from open_flamingo.src.flamingo import Flamingo
from open_flamingo.src.flamingo_lm import FlamingoLMMixin
from PIL import Image
from transformers import DynamicCache

from core.model.decode.batched_prefill import groups as prefill_groups
from core.model.decode.batched_prefill import prefill_together
from core.model.decode.graphed_steps import StaticStep, StaticSteps, supports_static_steps
from core.model.decode.logits import logits_processors
from core.model.decode.mosaic_cache import TupleCacheView, keeps_tuple_cache
from core.model.decode.shared_prefix import SharedPrefixCache, SharedPrefixSteps
from core.model.decode.state import DecodeJob, PrefixState, Running, after_prefix, tensor_bytes
from core.model.layers.flamingo_layer import ReusableMediaLayer, media_keys_values
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
    """Runs Flamingo forwards with explicit conditioning; owns the image and prefix caches."""

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
        self.model = model
        self.dtype = dtype
        self.device = device
        lm = model.lang_encoder
        mro = type(lm).__mro__
        # The language model's own forward, beneath the Flamingo mixin.
        self._lm_forward = mro[mro.index(FlamingoLMMixin) + 1].forward
        self._layers: list[ReusableMediaLayer] = list(lm._get_decoder_layers())
        # MPT places tokens with ALiBi and takes no position ids; LLaMA and GPT-NeoX need them in a batch.
        self._takes_positions = "position_ids" in inspect.signature(self._lm_forward).parameters
        self._parts = language_model_parts(lm)  # None: requests arriving together are prefilled one by one
        self._tuple_cache = keeps_tuple_cache(lm)  # MPT-1B's hub code: its own cache format
        self.prefixes: LruCache[tuple[str, tuple[int, ...]], PrefixState] = LruCache(
            prefix_cache_bytes, lambda state: state.nbytes
        )
        self.images: LruCache[str, torch.Tensor] = LruCache(image_cache_bytes, tensor_bytes)
        # Small batches on a GPU replay their decode steps from CUDA graphs (core.model.decode.graphed_steps).
        self.static_steps = (
            StaticSteps(self, graph_max_rows, graph_bytes, graphed=True)
            if graph_max_rows > 0 and device.type == "cuda" and supports_static_steps(model)
            else None
        )

    def image_features(
        self, images: Sequence[Image.Image], pixels: Callable[[Image.Image], torch.Tensor]
    ) -> list[torch.Tensor]:
        """(latents, dim) per image; images seen before come from the cache, the others are encoded
        together, at most ``VISION_BATCH`` per forward."""
        keys = [image_key(image) for image in images]
        found = {key: self.images.get(key) for key in dict.fromkeys(keys)}
        missing = [key for key, features in found.items() if features is None]
        for start in range(0, len(missing), VISION_BATCH):
            chunk = missing[start : start + VISION_BATCH]
            batch = torch.stack([pixels(images[keys.index(key)]) for key in chunk]).to(self.device, self.dtype)
            with torch.inference_mode():
                tokens = self.model.vision_encoder(batch)[1]
                latents = self.model.perceiver(rearrange(tokens, "(b t f) v d -> b t f v d", b=1, f=1))[0]
            for key, features in zip(chunk, latents, strict=True):
                found[key] = features
                self.images.put(key, features)
        return [found[key] for key in keys]  # type: ignore[misc]

    @contextlib.contextmanager
    def _reading(self, media: torch.Tensor | None) -> Iterator[None]:
        """Give every layer the images (and their keys and values, once) for the forwards inside."""
        if media is None:
            media = torch.zeros(1, 1, 1, self.model.vis_dim, device=self.device, dtype=self.dtype)
        try:
            for layer in self._layers:
                layer.condition_vis_x(media)
                layer.condition_use_cached_media(False)
                layer.use_media(media)
            yield
        finally:
            self._forget_media()

    def latest_images(self, rows: list[Running], take: bool) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per layer, the keys and values of each row's latest image, one row after another.

        ``take``: the rows give theirs up, so the batch holds the only copy.
        """
        batched: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for index in range(len(self._layers)):
            parts = [row.image_keys_values[index] for row in rows]
            if parts[0] is None:
                batched.append(None)
                continue
            keys = torch.cat([part[0] for part in parts])  # type: ignore[index]
            batched.append((keys, torch.cat([part[1] for part in parts])))  # type: ignore[index]
        if take:
            for row in rows:
                row.image_keys_values = []
        return batched

    @contextlib.contextmanager
    def reading_images(self, per_layer: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> Iterator[None]:
        """Each row reads its own image's keys and values (row ``n`` of each layer's)."""
        try:
            for layer, keys_values in zip(self._layers, per_layer, strict=True):
                if keys_values is not None:
                    layer.use_keys_values(keys_values, images=1, latents=keys_values[0].shape[2])
                    layer.condition_use_cached_media(False)
            yield
        finally:
            self._forget_media()

    def reading_latest_images(self, rows: list[Running]) -> contextlib.AbstractContextManager[None]:
        """Each row reads the image its prompt ended with, from the keys and values its prefill made."""
        return self.reading_images(self.latest_images(rows, take=False))

    @contextlib.contextmanager
    def _reading_after(
        self, earlier: Sequence[tuple[torch.Tensor, torch.Tensor] | None], media: torch.Tensor | None
    ) -> Iterator[None]:
        """As ``_reading``, after one image whose keys and values are known (the task's last example's)."""
        try:
            for layer, known in zip(self._layers, earlier, strict=True):
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
            self._forget_media()

    def _forget_media(self) -> None:
        """No image or position may outlive its forward, whatever happened during it."""
        self.model.lang_encoder.clear_conditioned_layers()
        for layer in self._layers:
            layer.use_media(None)

    def _forward(self, ids: torch.Tensor, image_index: torch.Tensor, cache: DynamicCache, past: int) -> torch.Tensor:
        """Logits of the last position; ``image_index`` is each token's 1-based image (0: none)."""
        # Upstream numbers a token's image by a cumulative sum over media flags; giving it the
        # per-token increments of our index reproduces the same numbers for any offset.
        increments = torch.diff(image_index, dim=1, prepend=torch.zeros_like(image_index[:, :1]))
        for layer in self._layers:
            layer.condition_media_locations(increments)
        output = self._lm_forward(
            self.model.lang_encoder,
            input_ids=ids,
            attention_mask=torch.ones(1, past + ids.shape[1], dtype=torch.long, device=self.device),
            past_key_values=self._as_taken(cache, rows=1),
            use_cache=True,
        )
        return output.logits[:, -1, :]

    def _as_taken(self, cache: DynamicCache | SharedPrefixCache, rows: int) -> object:
        """The cache in the form the language model takes."""
        if not self._tuple_cache:
            return cache
        config = self.model.lang_encoder.config
        empty = torch.empty(rows, 0, config.d_model, dtype=self.dtype, device=self.device)
        return TupleCacheView(cache, len(self._layers), config.n_heads, empty)

    def prefix(
        self,
        task_key: str | None,
        token_ids: list[int],
        example_images: Sequence[Image.Image],
        pixels: Callable[[Image.Image], torch.Tensor],
        media_token_id: int,
    ) -> PrefixState:
        key = (task_key, tuple(token_ids)) if task_key is not None else None
        state = self.prefixes.get(key) if key is not None else None
        if state is not None:
            return state
        cache = DynamicCache()
        last_image = None
        if token_ids:
            features = self.image_features(example_images, pixels)
            media = torch.stack(features).unsqueeze(0) if features else None
            ids = torch.tensor([token_ids], device=self.device)
            with torch.inference_mode(), self._reading(media):
                self._forward(ids, (ids == media_token_id).cumsum(dim=1), cache, past=0)
                if features:
                    last_image = tuple(layer.latest_image_keys_values() for layer in self._layers)
        state = PrefixState(tuple(token_ids), tuple((layer.keys, layer.values) for layer in cache.layers), last_image)
        if key is not None:
            self.prefixes.put(key, state)
        return state

    def prefill(self, job: DecodeJob, media_token_id: int) -> Running:
        """Run one request's own tokens against its task's prefix: alone, so exactly as unbatched."""
        prefix = job.prefix
        media = torch.stack(job.request_images).unsqueeze(0) if job.request_images else None
        start = 1 if prefix.last_image is not None else 0
        ids = torch.tensor([job.request_ids], device=self.device)
        image_index = start + (ids == media_token_id).cumsum(dim=1)
        cache = DynamicCache(ddp_cache_data=prefix.key_values) if prefix.key_values else DynamicCache()
        reading = self._reading(media) if prefix.last_image is None else self._reading_after(prefix.last_image, media)
        with reading:
            logits = self._forward(ids, image_index, cache, past=len(prefix.token_ids))
            latest = [layer.latest_image_keys_values() for layer in self._layers]
        key_values = [(after_prefix(layer.keys, prefix), after_prefix(layer.values, prefix)) for layer in cache.layers]
        return self.running(job, logits, key_values, latest)

    def running(
        self,
        job: DecodeJob,
        logits: torch.Tensor,
        key_values: list[tuple[torch.Tensor, torch.Tensor]],
        latest: list[tuple[torch.Tensor, torch.Tensor] | None],
    ) -> Running:
        """A prefilled request, ready to decode: its tokens so far, caches and first logits."""
        sequence = torch.tensor([list(job.prefix.token_ids) + job.request_ids], device=self.device)
        return Running(
            job=job,
            sequence=sequence,
            processors=logits_processors(job.kwargs, sequence.shape[1], job.stop_ids, self.device),
            key_values=key_values,
            image_keys_values=latest,
            logits=logits,
        )

    def prefill_many(self, jobs: Sequence[DecodeJob], media_token_id: int) -> list[Running]:
        """Requests arriving together, prefilled in groups (``core.model.decode.batched_prefill``) where the model's
        family allows it; a request alone runs the exact single path."""
        if self._parts is None:
            return [self.prefill(job, media_token_id) for job in jobs]
        rows: list[Running] = []
        for group in prefill_groups(self, jobs):
            if len(group) == 1:
                rows.append(self.prefill(group[0], media_token_id))
            else:
                rows.extend(prefill_together(self, self._parts, group, media_token_id))
        return rows

    def _choose(self, row: Running, logits: torch.Tensor) -> bool:
        """Pick the row's next token; True when the row is finished."""
        scores = row.processors(row.sequence, logits.float())
        if row.job.kwargs.get("do_sample"):
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        row.generated.append(int(token))
        row.sequence = torch.cat([row.sequence, token], dim=1)
        return (
            row.generated[-1] in row.job.stop_ids
            or len(row.generated) >= row.job.kwargs["max_new_tokens"]
            or row.job.should_stop()
        )

    def step_tokens(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | SharedPrefixCache, mask: torch.Tensor
    ) -> torch.Tensor:
        for layer in self._layers:
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
            for row in self.prefill_many(new_jobs, media_token_id):
                index = next(numbers)
                if not self._finish_if_done(index, row, row.logits, finished):
                    rows[index] = row
                    active.append(index)

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
        return static if static is not None else SharedPrefixSteps(self, rows)

    def _finish_if_done(
        self, index: int, row: Running, logits: torch.Tensor, finished: Callable[[int, list[int]], None]
    ) -> bool:
        if self._choose(row, logits):
            finished(index, row.generated)
            return True
        return False
