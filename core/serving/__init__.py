"""Serving: one model service per process, or replicas on a Ray cluster, behind the same calls.

The bot sees only ``ModelService``; which backend answers is chosen here, in one place above both,
so the local service never imports Ray and Ray is imported only by those who use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from PIL import Image

from core.config import Settings
from core.generation import GenerationParams
from core.model.engine import Answer, PromptRules
from core.prompts import Task
from core.serving.local import start_service


class QueuedRequest(Protocol):
    """What a caller holds for a queued request, wherever the model runs."""

    @property
    def position(self) -> int | None: ...

    def cancel(self) -> None: ...

    async def answer(self) -> Answer: ...


class ModelService(Protocol):
    """The model as the bot uses it: in this process (``InferenceService``) or on Ray replicas."""

    @property
    def rules(self) -> PromptRules: ...

    @property
    def waiting(self) -> int: ...

    @property
    def reachable(self) -> bool:
        """False while the model cannot be reached (a lost cluster); requests are refused meanwhile."""
        ...

    def estimated_wait(self, position: int) -> float: ...

    def cache_status(self) -> list[dict[str, dict[str, int]]]: ...

    def submit(
        self,
        images: Sequence[Image.Image],
        prompt: str,
        task: Task,
        params: GenerationParams,
        deadline: float | None = None,
        model: str | None = None,
    ) -> QueuedRequest: ...

    async def answer(
        self, images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams
    ) -> Answer: ...

    def close(self) -> None: ...


def start_model_service(settings: Settings) -> ModelService:
    """The bot's model: loaded here (``service.backend = "local"``) or on a Ray cluster's replicas."""
    if settings.service.backend == "ray":
        from core.serving.ray.backend import RayInferenceService  # Ray is imported only where it is used

        return RayInferenceService.connect(settings)
    return start_service(settings)
