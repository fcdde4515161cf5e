"""Serving: one model service per process, or replicas on a Ray cluster, behind the same calls.

The bot sees only ``ModelService``; which backend answers is chosen here, in one place above both,
so the local service never imports Ray and Ray is imported only by those who use it.
"""

from __future__ import annotations

import importlib.util

from core.config import Settings
from core.errors import ModelLoadError
from core.serving.local import start_service
from core.serving.protocol import LineStatus, ModelService, QueuedRequest, ServiceStatus

__all__ = ["LineStatus", "ModelService", "QueuedRequest", "ServiceStatus", "start_model_service"]


def start_model_service(settings: Settings) -> ModelService:
    """The bot's model: loaded here (``service.backend = "local"``) or on a Ray cluster's replicas."""
    if settings.service.backend == "ray":
        if importlib.util.find_spec("ray") is None:
            raise ModelLoadError(
                'service.backend is "ray" but Ray is not installed: run scripts/setup.sh --ray '
                "(./run.sh does when the settings choose Ray)"
            )
        from core.serving.ray.backend import RayInferenceService  # Ray is imported only where it is used

        return RayInferenceService.connect(settings)
    return start_service(settings)
