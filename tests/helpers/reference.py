"""The reference: upstream open_flamingo, built by its own factory and called as its evaluation code does."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from open_flamingo import create_model_and_transforms

from core.generation import GenerationParams
from core.model.engine import FlamingoEngine
from core.model.loading import as_trained
from core.prompts import END_OF_CHUNK, Example, Task
from tests.make_tiny_model import MANIFEST_NAME

# Examples' texts for the equivalence tests' tasks, by the photo they caption.
CAPTIONS = {
    "astronaut": "<image>Output:An astronaut in an orange suit.",
    "coffee": "<image>Output:A cup of coffee on a saucer.",
    "chelsea": "<image>Output:A tabby cat.",
}


def captioned_task(photos: dict, names: list[str]) -> Task:
    """A task whose examples are these photos with their captions."""
    examples = tuple(Example(photos[name], CAPTIONS[name]) for name in names)
    return Task("test", "", "<image>Output:", examples)


def one_shot_answers(
    engine: FlamingoEngine, reference: Reference, photos: dict, example: str, query: str, seed: int, **options: Any
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The engine's and upstream's answers to a 1-shot caption with these options, each drawn from ``seed``."""
    torch.manual_seed(seed)
    task = captioned_task(photos, [example])
    ours = engine.run(engine.prepare([photos[query]], "<image>Output:", task, GenerationParams(**options)))
    torch.manual_seed(seed)
    prompt = CAPTIONS[example] + END_OF_CHUNK + "<image>Output:"
    return ours.token_ids, reference.generate([photos[example], photos[query]], prompt, **options)


class Reference:
    def __init__(self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
        with contextlib.redirect_stdout(io.StringIO()):
            self.model, self.image_processor, self.tokenizer = create_model_and_transforms(
                clip_vision_encoder_path=f"local-dir:{model_dir / 'vision'}",
                clip_vision_encoder_pretrained=None,
                lang_encoder_path=str(model_dir / manifest["lang_encoder_path"]),
                tokenizer_path=str(model_dir / manifest["tokenizer_path"]),
                cross_attn_every_n_layers=manifest["cross_attn_every_n_layers"],
                use_local_files=True,
            )
        self.model.load_state_dict(torch.load(model_dir / "checkpoint.pt"), strict=False)
        as_trained(self.model.vision_encoder)  # the open_clip upstream trained with, not today's
        self.model.to(device, dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.stop_ids = {self.model.eoc_token_id, self.tokenizer.eos_token_id}
        # transformers' generate hands MPT-1B's MosaicGPT a cache object it cannot read; without a
        # cache it re-reads the prompt for each token, as upstream does for MPT-7B's shipped config.
        self.options = {"use_cache": False} if manifest.get("trust_remote_code") else {}

    def generate(self, images: Sequence[object], prompt: str, **kwargs: object) -> tuple[int, ...]:
        """New tokens up to (not including) the first end-of-chunk or end-of-sequence token."""
        return self.generate_with_margins(images, prompt, **kwargs)[0]

    def generate_with_margins(
        self, images: Sequence[object], prompt: str, **kwargs: object
    ) -> tuple[tuple[int, ...], list[float]]:
        """The tokens, and at each step the gap between the two best scores (small: a near tie)."""
        vision_x = torch.stack([self.image_processor(image) for image in images]).unsqueeze(1).unsqueeze(0)
        vision_x = vision_x.to(self.device, self.dtype)
        encoded = self.tokenizer([prompt], return_tensors="pt").to(self.device)
        with torch.inference_mode():
            output = self.model.generate(
                vision_x=vision_x,
                lang_x=encoded["input_ids"],
                attention_mask=encoded["attention_mask"],
                output_scores=True,
                return_dict_in_generate=True,
                **self.options | kwargs,
            )
        new_tokens = output.sequences[0, encoded["input_ids"].shape[1] :].tolist()
        margins = [float(top[0, 0] - top[0, 1]) for top in (score.topk(2, dim=-1).values for score in output.scores)]
        for index, token in enumerate(new_tokens):
            if token in self.stop_ids:
                return tuple(new_tokens[:index]), margins[:index]
        return tuple(new_tokens), margins
