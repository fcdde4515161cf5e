"""One request through the model: validate and encode it, then decode on the model's worker.

``prepare`` is cheap and runs where the request arrives, so bad input is refused before it waits
in the queue; ``run`` touches the model and must only be called from the service's worker.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from open_flamingo.src.flamingo import Flamingo
from PIL import Image
from transformers import PreTrainedTokenizerBase

from core.config import Settings
from core.errors import BadPrompt, FlamingoError, GenerationFailed, unexpected_failure
from core.generation import GenerationParams, decode_steps, generation_kwargs
from core.images import crop_extreme_aspect
from core.model.decode.beam_search import BeamSettings, beam_search
from core.model.decode.decoder import FlamingoDecoder
from core.model.decode.state import DecodeJob, Progress
from core.model.loading import LoadedModel
from core.prompts import IMAGE_TOKEN, Task, assemble_prompt, check_user_text

log = logging.getLogger(__name__)

# The last whitespace and the word after it, which may still be growing.
_LAST_WORD = re.compile(r"\s\S*\Z")


@dataclass(frozen=True)
class PreparedRequest:
    prompt: str
    input_ids: torch.Tensor
    prefix_length: int  # tokens up to the end of the task's last example
    task_key: str | None
    example_images: Sequence[Image.Image]  # each decoded when read: only on a miss of the task's prefix
    request_images: tuple[Image.Image, ...]
    generate_kwargs: dict[str, Any]
    background: bool = False  # a background job's (``InferenceService.submit``): its caches' entries yield
    # Where its batched decoding publishes the tokens so far, for whoever follows it (``Progress``).
    progress: Progress = field(default_factory=Progress, compare=False, repr=False)

    @property
    def batchable(self) -> bool:
        """Decoded with other greedy and sampled requests; beam requests are searched apart."""
        return self.generate_kwargs.get("num_beams", 1) == 1

    @property
    def cost(self) -> int:
        return decode_steps(self.generate_kwargs, len(self.request_images))


# Hands the running batch requests that arrived meanwhile, given how many it runs now.
Joining = Callable[[int], Sequence[tuple[PreparedRequest, Callable[[], bool]]]]


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: tuple[int, ...]
    prompt: str
    prompt_tokens: int
    finished: bool
    seconds: float


# Takes each request's outcome, by its number: its answer, or the error that ended it alone.
Deliver = Callable[[int, Answer | FlamingoError], None]


@dataclass(frozen=True)
class EngineStatus:
    """The loaded model as the owner's status shows it."""

    model: str
    precision: str
    device: str
    memory_bytes: int  # allocated on the GPU; on the CPU, the process's resident memory
    caches: dict[str, dict[str, int]]  # "prefix", "image" and, where decode steps may be graphed, "graphs"
    graphs_failed: bool  # a CUDA-graph capture failed, so decode steps run eagerly
    graphed_batches: int  # batches decoded with steps replayed from CUDA graphs


def _as_user_error(error: Exception) -> FlamingoError:
    """What to tell the asker; anything unexpected is logged, as a bug."""
    if isinstance(error, FlamingoError):
        return error
    if isinstance(error, torch.OutOfMemoryError):
        return GenerationFailed(
            "The model ran out of memory on this request; try fewer examples, fewer beams or fewer new tokens."
        )
    return unexpected_failure(error, log)


def clear_conditioning(model: Flamingo) -> None:
    """Remove the images and media positions that upstream leaves on the layers when it raises."""
    model.lang_encoder.clear_conditioned_layers()
    model.lang_encoder._use_cached_vision_x = False


def holds_conditioning(model: Flamingo) -> bool:
    layers = model.lang_encoder._get_decoder_layers()
    return model.lang_encoder._use_cached_vision_x or any(
        layer.vis_x is not None or layer.media_locations is not None for layer in layers
    )


class PromptRules:
    """What a request's text must satisfy; it needs only the tokenizer, so the bot can check text
    before queueing wherever the model runs (in this process or on a replica)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context_length: int, settings: Settings) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_chars = settings.prompts.max_chars
        # Only special tokens: GPT-NeoX's tokenizer (MPT, RedPajama) also adds plain runs of spaces.
        self.reserved_tokens = frozenset(tokenizer.all_special_tokens) | frozenset(
            token.content for token in tokenizer.added_tokens_decoder.values() if token.special
        )

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def check_text(self, text: str, images: int, what: str = "prompt") -> str:
        return check_user_text(text, images=images, reserved=self.reserved_tokens, max_chars=self.max_chars, what=what)


class FlamingoEngine:
    def __init__(self, loaded: LoadedModel, settings: Settings) -> None:
        self.loaded = loaded
        self.settings = settings
        tokenizer = loaded.tokenizer
        self.rules = PromptRules(tokenizer, loaded.context_length, settings)
        self._stop_ids = {loaded.model.eoc_token_id, tokenizer.eos_token_id} - {None}
        service = settings.service
        self.decoder = FlamingoDecoder(
            loaded.model,
            loaded.precision.dtype,
            loaded.device,
            prefix_cache_bytes=service.prefix_cache_mb * 2**20,
            image_cache_bytes=service.image_cache_mb * 2**20,
            graph_max_rows=service.cuda_graph_max_batch,
            graph_bytes=service.cuda_graph_mb * 2**20,
        )

    def status(self) -> EngineStatus:
        loaded, decoder = self.loaded, self.decoder
        caches = {"prefix": decoder.prefixes.stats(), "image": decoder.images.stats()}
        graphs = decoder.static_steps
        if graphs is not None:
            caches["graphs"] = graphs.steps.stats()
        if loaded.device.type == "cuda":
            memory = torch.cuda.memory_allocated(loaded.device)
        else:
            memory = psutil.Process().memory_info().rss
        return EngineStatus(
            loaded.spec.name,
            loaded.precision.name,
            str(loaded.device),
            memory,
            caches,
            graphs_failed=graphs is not None and graphs.failed,
            graphed_batches=graphs.used if graphs is not None else 0,
        )

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        return self.loaded.image_transform(crop_extreme_aspect(image))

    def prepare(
        self, images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams, background: bool = False
    ) -> PreparedRequest:
        kwargs = generation_kwargs(params, self.settings.generation)
        request_text = self.rules.check_text(prompt, len(images))
        full_prompt = assemble_prompt((example.text for example in task.examples), request_text)
        encoded = self.loaded.tokenizer(full_prompt, return_tensors="pt")
        input_ids = encoded["input_ids"]
        image_count = len(task.examples) + len(images)
        media = int((input_ids == self.loaded.model.media_token_id).sum())
        if media != image_count:
            raise BadPrompt(f"The prompt was read as {media} `{IMAGE_TOKEN}` markers for {image_count} images.")
        length = input_ids.shape[1]
        budget = self.loaded.context_length
        if length + kwargs["max_new_tokens"] > budget:
            raise BadPrompt(
                f"The prompt with the task's {len(task.examples)} examples is {length} tokens and "
                f"{kwargs['max_new_tokens']} new tokens were asked for, but the model reads at most {budget}. "
                "Shorten the prompt, lower max_new_tokens or use a task with fewer examples."
            )
        end_of_chunks = (input_ids[0] == self.loaded.model.eoc_token_id).nonzero().flatten().tolist()
        prefix_length = end_of_chunks[len(task.examples) - 1] + 1 if task.examples else 0
        return PreparedRequest(
            prompt=full_prompt,
            input_ids=input_ids,
            prefix_length=prefix_length,
            task_key=task.key,
            example_images=task.example_images,
            request_images=tuple(images),
            generate_kwargs=kwargs,
            background=background,
        )

    def run(self, request: PreparedRequest, should_stop: Callable[[], bool] = lambda: False) -> Answer:
        """Decode one request. Only the service's worker thread may call this."""
        outcomes: list[Answer | FlamingoError] = []
        self.run_many([request], [should_stop], lambda _, outcome: outcomes.append(outcome))
        outcome = outcomes[0]
        if isinstance(outcome, FlamingoError):
            raise outcome
        return outcome

    def run_many(
        self,
        requests: Sequence[PreparedRequest],
        stops: Sequence[Callable[[], bool]],
        deliver: Deliver,
        joining: Joining | None = None,
    ) -> None:
        """Answer several requests, handing each answer over as soon as it is complete.

        Beam requests are searched first (``_search_beams``); the others are decoded together, and
        ``joining(running)`` may add batchable requests that arrived meanwhile (numbered after
        ``requests``, in order). A request whose own preparation or beam search fails is handed its
        error and the others go on; a failure of the shared decode raises. Each request is let go
        once answered, so a batch that keeps taking joiners does not hold every past request.
        Only the service's worker thread may call this.
        """
        pending = dict(enumerate(requests))
        pending_stops = dict(enumerate(stops))
        started = dict.fromkeys(pending, time.perf_counter())
        numbers = itertools.count(len(requests))
        decoded: list[int] = []  # ours, by the decoder's numbering of the batched requests

        def let_go(index: int) -> tuple[PreparedRequest, float]:
            del pending_stops[index]
            return pending.pop(index), started.pop(index)

        def answered(index: int, tokens: list[int]) -> None:
            deliver(index, self._answer(*let_go(index), tokens))

        def failed(indices: Sequence[int], error: Exception) -> None:
            clear_conditioning(self.loaded.model)  # before the asker hears of it
            reason = _as_user_error(error)
            for index in indices:
                let_go(index)
                deliver(index, reason)

        def join(running: int) -> list[DecodeJob]:
            arrived = joining(running) if joining is not None else []
            indices = [next(numbers) for _ in arrived]
            for index, (request, should_stop) in zip(indices, arrived, strict=True):
                pending[index], pending_stops[index], started[index] = request, should_stop, time.perf_counter()
            kept, jobs = self._jobs_apart(indices, pending, pending_stops, failed)
            decoded.extend(kept)
            return jobs

        try:
            batched = [i for i, request in pending.items() if request.batchable]
            beams = [i for i in pending if i not in batched]
            self._search_beams(pending, pending_stops, beams, answered, failed)
            kept, jobs = self._jobs_apart(batched, pending, pending_stops, failed)
            decoded.extend(kept)
            if jobs:
                done = lambda n, tokens: answered(decoded[n], tokens)  # noqa: E731
                self.decoder.decode_many(jobs, self.loaded.model.media_token_id, done, join)
        except torch.OutOfMemoryError as error:
            raise _as_user_error(error) from None
        finally:
            clear_conditioning(self.loaded.model)

    def _jobs_apart(
        self,
        indices: Sequence[int],
        requests: dict[int, PreparedRequest],
        stops: dict[int, Callable[[], bool]],
        failed: Callable[[Sequence[int], Exception], None],
    ) -> tuple[list[int], list[DecodeJob]]:
        """The requests' jobs, with the indices of those that have one. When preparing them together
        fails (a prefix too large for memory, say), each is tried alone, so only a request that
        fails by itself is refused."""
        try:
            return list(indices), self._jobs([requests[i] for i in indices], [stops[i] for i in indices])
        except Exception as error:
            if len(indices) <= 1:
                failed(indices, error)
                return [], []
        kept: list[int] = []
        jobs: list[DecodeJob] = []
        for index in indices:
            alone, job = self._jobs_apart([index], requests, stops, failed)
            kept += alone
            jobs += job
        return kept, jobs

    def _answer(self, request: PreparedRequest, started: float, new_tokens: list[int]) -> Answer:
        stop = self._stop(new_tokens)
        kept = new_tokens[:stop]
        return Answer(
            text=self._text(kept).strip(),
            token_ids=tuple(kept),
            prompt=request.prompt,
            prompt_tokens=request.input_ids.shape[1],
            finished=stop is not None,
            seconds=time.perf_counter() - started,
        )

    def partial_text(self, new_tokens: Sequence[int]) -> str:
        """An unfinished answer's text up to its last complete word, decoded as the answer will be.

        A word is complete once whitespace follows it: the last one may still grow (or hold a
        character whose bytes are not all out yet), so it is left out, and the text is a prefix of
        the final answer's. Cheap enough for the event loop: no model, only the tokenizer.
        """
        text = self._text(list(new_tokens[: self._stop(new_tokens)])).lstrip()
        last_word = _LAST_WORD.search(text)
        return text[: last_word.start()].rstrip() if last_word else ""

    def _stop(self, new_tokens: Sequence[int]) -> int | None:
        """Where the answer ends: at its first stop token, None if it has none (yet)."""
        return next((i for i, token in enumerate(new_tokens) if token in self._stop_ids), None)

    def _text(self, tokens: list[int]) -> str:
        return self.loaded.tokenizer.decode(tokens, skip_special_tokens=True)

    def _jobs(self, requests: Sequence[PreparedRequest], stops: Sequence[Callable[[], bool]]) -> list[DecodeJob]:
        """The fast path: each task's prefix from cache (computed on a miss); members' own images
        encoded together, in one vision forward for all of them, a background job's apart (its cache
        entries take only free room)."""
        media_token = self.loaded.model.media_token_id
        features: dict[int, list[torch.Tensor]] = {}
        for background in (False, True):  # members' images kept as usual, a background job's only where room is free
            chosen = [n for n, request in enumerate(requests) if request.background == background]
            images = [image for n in chosen for image in requests[n].request_images]
            encoded = self.decoder.image_features(images, self._pixels, background) if images else []
            for n in chosen:
                count = len(requests[n].request_images)
                features[n], encoded = encoded[:count], encoded[count:]
        jobs = []
        for n, (request, should_stop) in enumerate(zip(requests, stops, strict=True)):
            ids = request.input_ids[0].tolist()
            prefix = self.decoder.prefix(
                request.task_key,
                ids[: request.prefix_length],
                request.example_images,
                self._pixels,
                media_token,
                request.background,
            )
            kwargs = request.generate_kwargs
            own_ids = ids[request.prefix_length :]
            jobs.append(DecodeJob(prefix, own_ids, features[n], kwargs, self._stop_ids, should_stop, request.progress))
        return jobs

    def _search_beams(
        self,
        requests: dict[int, PreparedRequest],
        stops: dict[int, Callable[[], bool]],
        indices: Sequence[int],
        finished: Callable[[int, list[int]], None],
        failed: Callable[[Sequence[int], Exception], None],
    ) -> None:
        """Beam search (sampled or not) on the cached prefixes, requests with the same beam settings
        together; a search that fails fails only its own requests."""
        groups: dict[BeamSettings, list[int]] = {}
        for i in indices:
            groups.setdefault(self._beam_settings(requests[i]), []).append(i)
        media_token = self.loaded.model.media_token_id
        for settings, members in groups.items():
            # At most a batch's worth of rows in one search, so beams take no more memory than a batch.
            per_search = max(1, self.settings.service.max_batch // settings.num_beams)
            for start in range(0, len(members), per_search):
                chunk, jobs = self._jobs_apart(members[start : start + per_search], requests, stops, failed)
                if not jobs:
                    continue
                try:
                    done = lambda n, tokens, chunk=chunk: finished(chunk[n], tokens)  # noqa: E731
                    beam_search(self.decoder, jobs, media_token, settings, done)
                except Exception as error:
                    failed([i for i in chunk if i in requests], error)

    def _beam_settings(self, request: PreparedRequest) -> BeamSettings:
        defaults = self.loaded.model.lang_encoder.generation_config
        model = self.loaded.model
        return BeamSettings(
            num_beams=request.generate_kwargs["num_beams"],
            do_sample=bool(request.generate_kwargs.get("do_sample")),
            length_penalty=request.generate_kwargs.get("length_penalty", defaults.length_penalty),
            early_stopping=defaults.early_stopping,
            eos_id=model.eoc_token_id,
            pad_id=self.loaded.tokenizer.pad_token_id or model.eoc_token_id,  # as generate fills
        )
