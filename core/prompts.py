"""The OpenFlamingo prompt format, and the checks that keep user text inside it.

``<image>`` marks where an image is read, ``<|endofchunk|>`` ends an in-context example, and a
request is an unfinished chunk appended to its task's examples::

    <image>Output:A cat.<|endofchunk|><image>Output:
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, overload

from PIL import Image

from core.errors import BadPrompt
from core.wording import plural

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
_ALLOWED_CONTROLS = {"\n", "\r", "\t"}


class DeferredImage(Protocol):
    """An image decoded the first time its pixels are asked for, then kept (a stored example's)."""

    def load(self) -> Image.Image: ...


@dataclass(frozen=True)
class Example:
    """One in-context example: an image and a text with exactly one ``<image>`` marker. A server's task
    defers its images: the model reads their pixels only to compute the task's prefix, which it keeps,
    so most requests decode none of them."""

    source: Image.Image | DeferredImage
    text: str

    @property
    def image(self) -> Image.Image:
        return self.source if isinstance(self.source, Image.Image) else self.source.load()


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    prompt_template: str
    examples: tuple[Example, ...] = ()
    key: str | None = None  # identifies this version of the task, for caches; None: not cached

    @property
    def example_images(self) -> Sequence[Image.Image]:
        """The examples' images, each decoded only when it is read."""
        return _ExampleImages(self.examples)


class _ExampleImages(Sequence[Image.Image]):
    def __init__(self, examples: tuple[Example, ...]) -> None:
        self._examples = examples

    def __len__(self) -> int:
        return len(self._examples)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Image.Image]: ...

    def __getitem__(self, index: int | slice) -> Image.Image | Sequence[Image.Image]:
        if isinstance(index, slice):
            return _ExampleImages(self._examples[index])
        return self._examples[index].image


def check_user_text(text: str, *, images: int, reserved: Iterable[str], max_chars: int, what: str) -> str:
    """Return ``text`` stripped, or raise ``BadPrompt`` saying exactly what is wrong with it.

    ``reserved`` are the tokenizer's special tokens; ``<image>`` is allowed only as many times as
    there are images.
    """
    text = text.strip()
    if not text:
        raise BadPrompt(f"The {what} is empty.")
    if len(text) > max_chars:
        raise BadPrompt(f"The {what} is {len(text)} characters long; the limit is {max_chars}.")
    bad_controls = sorted(
        {f"U+{ord(c):04X}" for c in text if unicodedata.category(c) == "Cc" and c not in _ALLOWED_CONTROLS}
    )
    if bad_controls:
        raise BadPrompt(f"The {what} contains control characters ({', '.join(bad_controls)}); remove them.")
    if any("\ud800" <= c <= "\udfff" for c in text):  # half of a UTF-16 pair: no tokenizer can read it
        raise BadPrompt(f"The {what} contains a broken character (half of an emoji or symbol); retype it.")
    for token in sorted(set(reserved) - {IMAGE_TOKEN}, key=len, reverse=True):
        if token and token in text:
            raise BadPrompt(f"The {what} contains the reserved token `{token}`; remove it.")
    markers = text.count(IMAGE_TOKEN)
    if markers != images:
        raise BadPrompt(
            f"The {what} has {plural(markers, IMAGE_TOKEN + ' marker')} but {plural(images, 'image')} "
            f"{'was' if images == 1 else 'were'} given; put one `{IMAGE_TOKEN}` where each image should be read."
        )
    return text


def assemble_prompt(example_texts: Iterable[str], request: str) -> str:
    """Examples as finished chunks, then the request as an unfinished one."""
    return "".join(text + END_OF_CHUNK for text in example_texts) + request
