"""What every CPU benchmark sends: the pinned model sizes, fresh photos and captioned tasks.

Kept apart from any one benchmark so that each can import it without importing another.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageOps

from core.prompts import END_OF_CHUNK, Example, Task

NEW_TOKENS = 16
# The fixed sizes that keep figures comparable from one run and one change to the next.
SIZES = {
    "hidden": 512,
    "layers": 8,
    "heads": 8,
    "intermediate": 1376,
    "vocab": 1000,
    "cross_attn_every_n_layers": 2,
    "vision_width": 384,
    "vision_layers": 6,
    "max_positions": 1024,
}
PHOTOS = Path(__file__).resolve().parent.parent / "data" / "images"
WORDS = (
    "a small red cat sits on the wooden table next to a cup of coffee while the sun sets behind "
    "the city and two people walk along the river with a dog"
).split()


class Photos:
    """Distinct images on demand (flips and crops of the project's photos), never repeated."""

    def __init__(self) -> None:
        self.sources = [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*.jpg"))]
        self.count = 0

    def fresh(self) -> Image.Image:
        self.count += 1
        image = self.sources[self.count % len(self.sources)]
        if (self.count // len(self.sources)) % 2:
            image = ImageOps.mirror(image)
        inset = self.count % 37
        # Source, mirroring and inset repeat every 370 photos; a narrower right edge each round after.
        trim = self.count // (2 * 37 * len(self.sources))
        return image.crop((inset, inset, image.width - inset - trim, image.height - inset))


def caption(rng: random.Random) -> str:
    """About 14 tokens of text after the image marker."""
    return "<image>Output:" + " ".join(rng.choice(WORDS) for _ in range(9)) + "."


def make_task(name: str, shots: int, photos: Photos, rng: random.Random) -> Task:
    examples = tuple(Example(photos.fresh(), caption(rng)) for _ in range(shots))
    return Task(name, "", "<image>Output:", examples, key=f"bench/{name}")


def upstream_input(task: Task, image: Image.Image) -> tuple[list[Image.Image], str]:
    """What upstream ``generate`` is given for a request, as the prototype gave it: every example's
    image and text, then the query's image and the task's template."""
    prompt = "".join(example.text + END_OF_CHUNK for example in task.examples) + task.prompt_template
    return [example.image for example in task.examples] + [image], prompt
