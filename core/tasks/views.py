"""What the task library shows of its tasks: their summaries, examples and room left, as plain data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskInfo:
    name: str
    description: str
    example_count: int
    builtin: bool


@dataclass(frozen=True)
class ExampleView:
    position: int
    text: str
    image: bytes
    added_by: int  # 0: nobody (a built-in task's); an export keeps it, so /forget-me reaches imported copies


@dataclass(frozen=True)
class TaskDetails:
    info: TaskInfo
    prompt_template: str
    examples: list[ExampleView]


@dataclass(frozen=True)
class LibraryUsage:
    """How much of its room a server's library takes, so managers see a limit coming."""

    tasks: int
    max_tasks: int
    image_bytes: int
    max_image_bytes: int
