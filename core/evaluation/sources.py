"""The tasks the command line evaluates: a built-in one by name, a task file that ``/tasks export``
made, or a folder of images with a ``texts.json`` (for trying out a task before it is made).

``texts.json`` is a JSON object: ``examples`` maps each image's file name (in the folder) to its
example text, in order, and ``template``, if given, is the task's template (else the built-in
caption task's, ``<image>Output:``)::

    {"template": "<image>Output:", "examples": {"cat.jpg": "<image>Output:A cat on a sofa."}}

Every text is checked as a server's example text is, so a text without exactly one ``<image>`` is
refused before any model loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from core.config import Settings
from core.errors import BadImage, FlamingoError, UnknownTask
from core.images import load_image
from core.prompts import END_OF_CHUNK, Example, Task, check_user_text
from core.tasks.archive import BadArchive, archive_limits, read_archive
from core.tasks.builtin import DEFAULT_TASK, load_builtin_tasks

TEXTS_FILE = "texts.json"


class BadTaskFolder(FlamingoError):
    """A folder of examples without a usable ``texts.json``; the message says why."""


class _TextsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template: str | None = None
    examples: dict[str, str]


def _checked(text: str, settings: Settings, what: str) -> str:
    return check_user_text(
        text, images=1, reserved=[END_OF_CHUNK], max_chars=settings.limits.max_example_chars, what=what
    )


def _from_file(path: Path, settings: Settings) -> Task:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadArchive(f"Cannot read {path}: {error.strerror or error}.") from None
    from core.tasks.library import MAX_NAME_CHARS  # the library needs the database's modules: not for folders

    try:
        archive = read_archive(data, archive_limits(settings.limits, MAX_NAME_CHARS))
    except BadArchive as error:
        raise BadArchive(f"{path}: {error}") from None
    examples = []
    for position, example in enumerate(archive.examples, start=1):
        what = f"text of example {position} in {path}"
        try:
            image = load_image(example.image, settings.images)
        except BadImage as error:
            raise BadImage(f"Example {position} of {path}: {error}") from None
        examples.append(Example(image, _checked(example.text, settings, what)))
    return Task(archive.name, archive.description, archive.prompt_template, tuple(examples))


def _from_folder(folder: Path, settings: Settings, read_image: Callable[[Path], Image.Image]) -> Task:
    texts = folder / TEXTS_FILE
    try:
        spec = _TextsFile.model_validate(json.loads(texts.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise BadTaskFolder(
            f"{folder} has no {TEXTS_FILE}: give it one mapping each image's file name to its example text."
        ) from None
    except OSError as error:
        raise BadTaskFolder(f"Cannot read {texts}: {error.strerror or error}.") from None
    except (ValueError, ValidationError) as error:  # not UTF-8, not JSON, or not the expected shape
        detail = str(error)
        if isinstance(error, ValidationError):
            first = error.errors()[0]
            detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}"
        raise BadTaskFolder(f"{texts} must hold “examples” and may hold a “template” ({detail}).") from None
    template = spec.template
    if template is None:
        template = load_builtin_tasks(settings.data_dir, settings.images)[DEFAULT_TASK].prompt_template
    examples = tuple(
        Example(read_image(folder / name), _checked(text, settings, f"text of {name} in {texts}"))
        for name, text in spec.examples.items()
    )
    return Task(folder.resolve().name, "", template, examples)


def load_task(source: str, settings: Settings, read_image: Callable[[Path], Image.Image]) -> Task:
    """An existing folder or file at ``source``, else the built-in task of that name. ``read_image``
    reads a folder's image, with errors that name its file."""
    path = Path(source)
    if path.is_dir():
        return _from_folder(path, settings, read_image)
    if path.exists():
        return _from_file(path, settings)
    tasks = load_builtin_tasks(settings.data_dir, settings.images)
    if source not in tasks:
        raise UnknownTask(
            f"There is no task called {source!r} and no file or folder of that name; "
            f"built-in tasks: {', '.join(sorted(tasks))}."
        )
    return tasks[source]
