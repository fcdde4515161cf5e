"""The read-only tasks every guild sees, defined by JSON files and photos under ``data/``."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from core.config import ImageSettings
from core.images import load_image
from core.prompts import END_OF_CHUNK, Example, Task, check_user_text

DEFAULT_TASK = "caption"
_MAX_TEXT = 2000


class _ExampleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str
    text: str


class _TaskFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str
    prompt_template: str
    examples: list[_ExampleFile]


def load_builtin_tasks(data_dir: Path, image_settings: ImageSettings) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for path in sorted((data_dir / "tasks").glob("*.json")):
        spec = _TaskFile.model_validate(json.loads(path.read_text()))
        where = f"built-in task {spec.name!r} ({path.name})"
        check_user_text(spec.prompt_template, images=1, reserved=[END_OF_CHUNK], max_chars=_MAX_TEXT, what=where)
        examples = tuple(
            Example(
                source=load_image((data_dir / example.image).read_bytes(), image_settings),
                text=check_user_text(example.text, images=1, reserved=[END_OF_CHUNK], max_chars=_MAX_TEXT, what=where),
            )
            for example in spec.examples
        )
        tasks[spec.name] = Task(spec.name, spec.description, spec.prompt_template, examples, key=f"builtin/{spec.name}")
    return tasks
