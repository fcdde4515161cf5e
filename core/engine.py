"""One request through the model: validate and encode it, then decode on the model's worker.

``prepare`` is cheap and runs where the request arrives, so bad input is refused before it waits
in the queue; ``run`` touches the model and must only be called from the service's worker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from open_flamingo.src.flamingo import Flamingo
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from core.config import Settings
from core.errors import BadPrompt, GenerationFailed
from core.generation import GenerationParams, generation_kwargs
from core.images import crop_extreme_aspect
from core.loading import LoadedModel
from core.prompts import IMAGE_TOKEN, Task, assemble_prompt, check_user_text


@dataclass(frozen=True)
class PreparedRequest:
    prompt: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    vision_x: torch.Tensor
    generate_kwargs: dict[str, Any]


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: tuple[int, ...]
    prompt: str
    prompt_tokens: int
    finished: bool
    seconds: float


class _StopWhen(StoppingCriteria):
    """Lets a cancelled request give the worker back between two tokens."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self._should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self._should_stop(), dtype=torch.bool, device=input_ids.device)


def clear_conditioning(model: Flamingo) -> None:
    """Remove the images and media positions that upstream leaves on the layers when it raises."""
    model.lang_encoder.clear_conditioned_layers()
    model.lang_encoder._use_cached_vision_x = False


def holds_conditioning(model: Flamingo) -> bool:
    layers = model.lang_encoder._get_decoder_layers()
    return model.lang_encoder._use_cached_vision_x or any(
        layer.vis_x is not None or layer.media_locations is not None for layer in layers
    )


class FlamingoEngine:
    def __init__(self, loaded: LoadedModel, settings: Settings) -> None:
        self.loaded = loaded
        self.settings = settings
        tokenizer = loaded.tokenizer
        self.reserved_tokens = frozenset(tokenizer.all_special_tokens) | frozenset(tokenizer.get_added_vocab())
        self._stop_ids = {loaded.model.eoc_token_id, tokenizer.eos_token_id} - {None}

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    def count_tokens(self, text: str) -> int:
        return len(self.loaded.tokenizer(text)["input_ids"])

    def check_text(self, text: str, images: int, what: str = "prompt") -> str:
        return check_user_text(
            text, images=images, reserved=self.reserved_tokens, max_chars=self.settings.prompts.max_chars, what=what
        )

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Shape (1, images, frames=1, channels, height, width), as upstream expects."""
        frames = [self.loaded.image_transform(crop_extreme_aspect(image)) for image in images]
        return torch.stack(frames).unsqueeze(1).unsqueeze(0)

    def prepare(
        self, images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams
    ) -> PreparedRequest:
        kwargs = generation_kwargs(params, self.settings.generation)
        request_text = self.check_text(prompt, len(images))
        full_prompt = assemble_prompt((example.text for example in task.examples), request_text)
        encoded = self.loaded.tokenizer(full_prompt, return_tensors="pt")
        input_ids = encoded["input_ids"]
        all_images = [example.image for example in task.examples] + list(images)
        media = int((input_ids == self.loaded.model.media_token_id).sum())
        if media != len(all_images):
            raise BadPrompt(f"The prompt was read as {media} `{IMAGE_TOKEN}` markers for {len(all_images)} images.")
        length = input_ids.shape[1]
        budget = self.loaded.context_length
        if length + kwargs["max_new_tokens"] > budget:
            raise BadPrompt(
                f"The prompt with the task's {len(task.examples)} examples is {length} tokens and "
                f"{kwargs['max_new_tokens']} new tokens were asked for, but the model reads at most {budget}. "
                "Shorten the prompt, lower max_new_tokens or use a task with fewer examples."
            )
        return PreparedRequest(
            prompt=full_prompt,
            input_ids=input_ids,
            attention_mask=encoded["attention_mask"],
            vision_x=self._pixels(all_images),
            generate_kwargs=kwargs,
        )

    def run(self, request: PreparedRequest, should_stop: Callable[[], bool] = lambda: False) -> Answer:
        """Decode one request. Only the service's worker thread may call this."""
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        device, dtype = self.loaded.device, self.loaded.precision.dtype
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = model.generate(
                    vision_x=request.vision_x.to(device=device, dtype=dtype),
                    lang_x=request.input_ids.to(device),
                    attention_mask=request.attention_mask.to(device),
                    pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([_StopWhen(should_stop)]),
                    **request.generate_kwargs,
                )
        except torch.OutOfMemoryError:
            raise GenerationFailed(
                "The model ran out of memory on this request; try fewer examples, fewer beams or fewer new tokens."
            ) from None
        finally:
            clear_conditioning(model)
        new_tokens = output[0, request.input_ids.shape[1] :].tolist()
        stop = next((i for i, token in enumerate(new_tokens) if token in self._stop_ids), None)
        kept = new_tokens if stop is None else new_tokens[:stop]
        return Answer(
            text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
            token_ids=tuple(kept),
            prompt=request.prompt,
            prompt_tokens=request.input_ids.shape[1],
            finished=stop is not None,
            seconds=time.perf_counter() - started,
        )
