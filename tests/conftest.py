"""Shared fixtures: tiny random models of each family, built once per test session."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.config import PROJECT_ROOT, ImageSettings, ModelSettings, Settings
from core.images import load_image
from core.model.engine import FlamingoEngine
from core.model.loading import load_model
from core.prompts import Task
from core.serving.local import InferenceService
from core.tasks.builtin import load_builtin_tasks
from tests.make_tiny_model import FAMILIES, REMOTE_CODE_FAMILY, TinyModelSpec, write_model

IMAGES = PROJECT_ROOT / "data" / "images"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    families = (*FAMILIES, REMOTE_CODE_FAMILY)
    return {family: write_model(root / family, TinyModelSpec(family=family)) for family in families}


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


RAY = Path(sys.executable).parent / "ray"
# Ray swaps 127.0.0.1 for the machine's network address when it connects, unless told it runs
# without a cluster network; tests keep every byte on loopback.
RAY_LOOPBACK = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
os.environ.update(RAY_LOOPBACK)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RayHead:
    """A Ray head on loopback with two CPUs, as an operator would start one with ``ray start``."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [str(RAY), "start", "--head", f"--port={self.port}", "--num-cpus=2", "--include-dashboard=false"]
        command += ["--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={self.temp_dir}"]
        command += [f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
        subprocess.run(command, check=True, env=os.environ | RAY_LOOPBACK, capture_output=True, timeout=120)

    def kill(self) -> None:
        """As if its machine went away: every process of this head (only), at once."""
        import psutil

        mine = [
            process
            for process in psutil.process_iter(["cmdline"])
            if any(str(self.temp_dir) in arg or arg.endswith(self.address) for arg in process.info["cmdline"] or ())
        ]
        victims = {p for process in mine for p in (process, *process.children(recursive=True))}
        for process in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(victims, timeout=30)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    head = RayHead(tmp_path_factory.mktemp("ray"))
    head.start()
    try:
        yield head.address
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=os.environ | RAY_LOOPBACK, capture_output=True, timeout=120)
