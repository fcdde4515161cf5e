"""Settings for a tiny model on the CPU, the sample photos, and a free loopback port."""

from __future__ import annotations

import socket
from pathlib import Path

from core.config import PROJECT_ROOT, ModelSettings, Settings

IMAGES = PROJECT_ROOT / "data" / "images"


def tiny_settings(model_dir: Path, precision: str = "fp32") -> Settings:
    return Settings(model=ModelSettings(name=str(model_dir), precision=precision, device="cpu"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
