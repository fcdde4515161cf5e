"""Shared fixtures: tiny random models of each family, built once per test session."""

# ruff: noqa: E402 (the helpers' asserts are rewritten only if registered before they are imported)

from __future__ import annotations

import pytest

# Helpers assert as tests do; pytest explains their failures as it does a test's.
pytest.register_assert_rewrite("tests.helpers")

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from core.config import PROJECT_ROOT, ImageSettings
from core.images import load_image
from core.model.engine import FlamingoEngine
from core.model.loading import load_model
from core.prompts import Task
from core.serving.local import InferenceService
from core.tasks.builtin import load_builtin_tasks
from tests.helpers.ray import RAY, RAY_LOOPBACK, RayHead
from tests.helpers.settings import IMAGES, tiny_settings
from tests.make_tiny_model import FAMILIES, REMOTE_CODE_FAMILY, TinyModelSpec, write_language_model, write_model

# Every Ray process the tests start, and every Ray client, stays on loopback.
os.environ.update(RAY_LOOPBACK)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    families = (*FAMILIES, REMOTE_CODE_FAMILY)
    return {family: write_model(root / family, TinyModelSpec(family=family)) for family in families}


@pytest.fixture(scope="session")
def other_language_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Plain causal LMs for the tiny LLaMA checkpoint's layers: one of its shape, one smaller."""
    root = tmp_path_factory.mktemp("language-models")
    shapes = {
        "twin": TinyModelSpec(family="llama", seed=1),
        "small": TinyModelSpec(family="llama", hidden=32, layers=2),
    }
    for name, spec in shapes.items():
        write_language_model(root / name, spec)
    return {name: root / name for name in shapes}


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


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("ray"))
    head.start()
    try:
        yield head.address
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=os.environ | RAY_LOOPBACK, capture_output=True, timeout=120)
