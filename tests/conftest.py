"""Shared fixtures: tiny random models of each family, built once per test session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.builtin_tasks import load_builtin_tasks
from core.config import PROJECT_ROOT, ImageSettings, ModelSettings, Settings
from core.engine import FlamingoEngine
from core.images import load_image
from core.loading import load_model
from core.prompts import Task
from core.service import InferenceService
from tests.make_tiny_model import FAMILIES, TinyModelSpec, write_model

IMAGES = PROJECT_ROOT / "data" / "images"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {family: write_model(root / family, TinyModelSpec(family=family)) for family in FAMILIES}


def tiny_settings(model_dir: Path, precision: str = "fp32") -> Settings:
    return Settings(model=ModelSettings(name=str(model_dir), precision=precision, device="cpu"))


@pytest.fixture(scope="session")
def engines(model_dirs: dict[str, Path]) -> dict[str, FlamingoEngine]:
    engines = {}
    for family, directory in model_dirs.items():
        settings = tiny_settings(directory)
        engines[family] = FlamingoEngine(load_model(settings.model), settings)
    return engines


@pytest.fixture(scope="session")
def llama_engine(engines: dict[str, FlamingoEngine]) -> FlamingoEngine:
    return engines["llama"]


@pytest.fixture
def make_service() -> Iterator[Callable[..., InferenceService]]:
    services: list[InferenceService] = []

    def make(engine: object, max_queue: int = 8) -> InferenceService:
        service = InferenceService(engine, max_queue)  # type: ignore[arg-type]
        services.append(service)
        return service

    yield make
    for service in services:
        service.close()


@pytest.fixture(scope="session")
def photos() -> dict[str, object]:
    return {path.stem: load_image(path.read_bytes(), ImageSettings()) for path in sorted(IMAGES.glob("*.jpg"))}


@pytest.fixture(scope="session")
def builtin_tasks() -> dict[str, Task]:
    return load_builtin_tasks(PROJECT_ROOT / "data", ImageSettings())
