"""Uploads as the task library takes them (fetched on demand), and settings whose task-upload quotas
stay out of the way of tests about something else."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.config import Settings
from tests.helpers.settings import IMAGES

if TYPE_CHECKING:
    from core.tasks.library import UploadReader


def uploaded(data: bytes) -> UploadReader:
    """An upload already at hand."""

    async def read() -> bytes:
        return data

    return read


def photo_upload(name: str) -> UploadReader:
    """One of the project's sample photos (``data/images``)."""
    return uploaded((IMAGES / f"{name}.jpg").read_bytes())


def without_upload_quotas(settings: Settings) -> Settings:
    """Tests add examples one after another, and at once; the quotas have tests of their own."""
    quotas = settings.quotas.model_copy(
        update={"task_upload_cooldown_seconds": 0, "task_uploads_in_flight": 64, "task_uploads_per_period": 10_000}
    )
    return settings.model_copy(update={"quotas": quotas})
