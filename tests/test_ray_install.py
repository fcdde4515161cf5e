"""Ray Serve is installed only where the ray backend is used, and its absence is said in one line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from core.config import PROJECT_ROOT, ServiceSettings, Settings
from core.errors import ModelLoadError
from core.serving import start_model_service


def _uses_ray(*args: str, backend: str | None = None, config: str | None = None) -> bool:
    env = {"PATH": "/usr/bin:/bin"} | ({"FLAMINGO_SERVICE__BACKEND": backend} if backend else {})
    result = subprocess.run(
        [sys.executable, "scripts/uses_ray.py", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
    )
    assert result.stdout == result.stderr == ""
    return result.returncode == 0


def test_run_sh_installs_ray_only_when_the_bot_runs_on_the_ray_backend(tmp_path):
    assert not _uses_ray()
    assert _uses_ray(backend="ray") and _uses_ray("run", backend="ray")
    assert not _uses_ray("describe", "photo.jpg", "--model", "x", backend="ray")  # describe loads no backend
    assert not _uses_ray("backup", "b.db", backend="ray")
    chosen = tmp_path / "ray.toml"
    chosen.write_text('[service]\nbackend = "ray"\n')
    assert _uses_ray("--config", str(chosen)) and _uses_ray("run", "--config", str(chosen))
    assert not _uses_ray("--config", str(tmp_path / "missing.toml"))  # main.py reports it, in its own words


def test_the_ray_backend_without_ray_installed_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"Ray is not installed: run scripts/setup.sh --ray"):
        start_model_service(Settings(service=ServiceSettings(backend="ray")))
