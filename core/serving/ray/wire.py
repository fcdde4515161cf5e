"""Requests as they travel to a model replica on another process or machine: bytes with content hashes.

Images go as PNG, which is lossless, so a replica sees exactly the pixels the bot checked and its
answer is token for token the one a local model would give. Nothing travels through a shared
filesystem. A replica keeps decoded images and tasks by hash and key, so a task's examples are
decoded once per replica, and the features behind them are cached by its engine as usual.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass

from PIL import Image

from core.generation import GenerationParams
from core.model.lru_cache import LruCache
from core.prompts import Example, Task

Asked = tuple[list[Image.Image], str, Task, GenerationParams]  # a request as a replica's service takes it


@dataclass(frozen=True)
class WireImage:
    png: bytes
    sha256: str

    @classmethod
    def of(cls, image: Image.Image) -> WireImage:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
        return cls(data, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class WireTask:
    name: str
    description: str
    prompt_template: str
    key: str | None
    examples: tuple[tuple[WireImage, str], ...]

    @classmethod
    def of(cls, task: Task) -> WireTask:
        examples = tuple((WireImage.of(example.image), example.text) for example in task.examples)
        return cls(task.name, task.description, task.prompt_template, task.key, examples)


@dataclass(frozen=True)
class WireRequest:
    images: tuple[WireImage, ...]
    prompt: str
    task: WireTask
    params: GenerationParams
    background: bool = False  # a job's request (a task's evaluation), run beside members' on the replica


class WireEncoder:
    """The bot's side: a keyed task's examples are encoded once (its key changes with every edit),
    not for every request: eight large examples take about a second to encode."""

    def __init__(self, task_bytes: int = 256 * 2**20) -> None:
        self._tasks: LruCache[str, WireTask] = LruCache(
            task_bytes, lambda task: 1 + sum(len(image.png) for image, _ in task.examples)
        )
        self._lock = threading.Lock()  # requests are encoded on worker threads

    def request(
        self, images: list[Image.Image], prompt: str, task: Task, params: GenerationParams, background: bool = False
    ) -> WireRequest:
        images_sent = tuple(WireImage.of(image) for image in images)
        return WireRequest(images_sent, prompt, self._task(task), params, background)

    def _task(self, task: Task) -> WireTask:
        if task.key is None:
            return WireTask.of(task)
        with self._lock:
            known = self._tasks.get(task.key)
        if known is not None:
            return known
        encoded = WireTask.of(task)
        with self._lock:
            self._tasks.put(task.key, encoded)
        return encoded


class WireDecoder:
    """A replica's side: images by hash and keyed tasks kept (bounded), so repeats cost nothing."""

    def __init__(self, image_bytes: int = 256 * 2**20, max_tasks: int = 64) -> None:
        self._images: LruCache[str, Image.Image] = LruCache(image_bytes, lambda i: i.width * i.height * 3)
        self._tasks: LruCache[str, Task] = LruCache(max_tasks, lambda _: 1)
        # Requests are decoded on worker threads (a request with a large task took a third of a
        # second, which the replica's event loop could not spare); decoding itself runs unlocked.
        self._lock = threading.Lock()

    def image(self, wire: WireImage) -> Image.Image:
        with self._lock:
            image = self._images.get(wire.sha256)
        if image is None:
            if hashlib.sha256(wire.png).hexdigest() != wire.sha256:
                raise ValueError("an image arrived damaged: its content does not match its hash")
            image = Image.open(io.BytesIO(wire.png))
            image.load()
            with self._lock:
                self._images.put(wire.sha256, image)
        return image

    def task(self, wire: WireTask) -> Task:
        if wire.key is not None:
            with self._lock:
                known = self._tasks.get(wire.key)
            if known is not None:
                return known
        examples = tuple(Example(self.image(image), text) for image, text in wire.examples)
        task = Task(wire.name, wire.description, wire.prompt_template, examples, key=wire.key)
        if wire.key is not None:
            with self._lock:
                self._tasks.put(wire.key, task)
        return task

    def request(self, wire: WireRequest) -> Asked:
        return [self.image(image) for image in wire.images], wire.prompt, self.task(wire.task), wire.params
