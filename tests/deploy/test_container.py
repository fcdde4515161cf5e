"""The container image (Dockerfile) built with podman and run as an operator runs it: ``main.py describe`` on a
tiny model, then the bot against the local Discord stand-in, healthy by its /health and by podman's healthcheck;
and compose.yaml's promises, read without building.

The build installs the pinned wheels offline from a folder this machine's pip fills once per set of pins (its
own indexes and caches, so torch's GB come from disk where they lie there). The container shares the host's
network only to reach the stand-in: everything talks over 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import yaml

from core.config import PROJECT_ROOT
from tests.fake_discord.server import FakeDiscord
from tests.helpers.e2e import Scene
from tests.helpers.settings import free_port

IMAGE = "localhost/flamingo-bot:test"
BASE = "localhost/flamingo-base:bookworm"
WHEELS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flamingo-bot" / "wheels"
PINS = ("requirements.txt", "requirements-nodeps.txt", "constraints.txt")
ANSWER_ARGS = ("describe", "data/images/chelsea.jpg", "--max-new-tokens", "8")
_START_TIMEOUT = 180


def _run(*command: str | Path, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, f"{' '.join(map(str, command))} exited with {result.returncode}:\n{result.stderr}"
    return result


def _podman() -> str:
    """podman's path: without it the tests fail, saying what to install (they never skip)."""
    found = shutil.which("podman")
    if found is None:
        pytest.fail(
            "podman is not installed; the container tests need it (README: 'Running in a container'): "
            "apt-get install -y podman runc mmdebstrap uidmap slirp4netns fuse-overlayfs",
            pytrace=False,
        )
    return found


def _wheelhouse() -> Path:
    """Every pinned wheel for this Python, fetched by this machine's pip when the pins change."""
    pins = hashlib.sha256(b"".join((PROJECT_ROOT / name).read_bytes() for name in PINS)).hexdigest()
    stamp = WHEELS / ".pins.sha256"
    if not stamp.is_file() or stamp.read_text() != pins:
        download = (sys.executable, "-m", "pip", "download", "--quiet", "--dest", WHEELS, "-c", "constraints.txt")
        _run(*download, "-r", "requirements.txt", timeout=3600)
        _run(*download, "--no-deps", "-r", "requirements-nodeps.txt", timeout=600)
        stamp.write_text(pins)
    return WHEELS


@functools.cache
def _image() -> str:
    """The image, on the Debian base made here (no registry is reachable), its pip offline on the wheelhouse.

    Built by the first test that needs it rather than by a fixture, so that a missing podman fails the tests."""
    podman = _podman()
    _run("scripts/container-base.sh", BASE, timeout=1800)
    with tempfile.TemporaryDirectory() as build:
        pip_conf = Path(build, "pip.conf")
        pip_conf.write_text("[global]\nfind-links = /wheels\nno-index = true\n")
        _run(
            podman,
            "build",
            "--format=docker",  # podman's default OCI format drops HEALTHCHECK
            "--network=none",  # everything it installs is on the base or in the wheelhouse
            f"--build-arg=BASE_IMAGE={BASE}",
            f"--volume={_wheelhouse()}:/wheels:ro",
            f"--volume={pip_conf}:/etc/pip.conf:ro",
            f"--tag={IMAGE}",
            ".",
            timeout=3600,
        )
    return IMAGE


@pytest.fixture(scope="module")
def model(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama model, readable by the image's user (safetensors writes its weights as mode 600)."""
    copy = tmp_path_factory.mktemp("readable") / "llama"
    shutil.copytree(model_dirs["llama"], copy, copy_function=shutil.copyfile)
    return copy


@pytest.mark.container
def test_the_image_runs_as_its_own_user_with_a_healthcheck_and_no_secrets():
    podman, image = _podman(), _image()
    inspected = json.loads(_run(podman, "image", "inspect", image, timeout=60).stdout)[0]
    assert inspected["Config"]["User"] == "flamingo"
    assert "/health" in " ".join(inspected["Healthcheck"]["Test"])
    assert not [variable for variable in inspected["Config"]["Env"] if variable.startswith("DISCORD_TOKEN")]
    listing = _run(podman, "run", "--rm", "--network=none", "--entrypoint=ls", image, "-A", "/app", timeout=120)
    assert {"main.py", "config.toml", "data"} <= set(listing.stdout.split())
    assert not {".env", ".git", ".venv", "tests"} & set(listing.stdout.split())


@pytest.mark.container
def test_describe_in_the_container_answers_as_on_this_machine(model):
    podman, image = _podman(), _image()
    inside = _run(
        *(podman, "run", "--rm", "--network=none", "--env=HF_HUB_OFFLINE=1", f"--volume={model}:/model:ro", image),
        *(*ANSWER_ARGS, "--model", "/model"),
        timeout=600,
    )
    here = _run(
        *(sys.executable, "main.py", *ANSWER_ARGS, "--model", model),
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert inside.stdout.strip()
    assert inside.stdout == here.stdout


@pytest_asyncio.fixture
async def stand_in() -> AsyncIterator[FakeDiscord]:
    fake = FakeDiscord()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def _podman_async(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(_run, _podman(), *args, timeout=120)


async def _health(port: int) -> tuple[int, str]:
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/health") as response:
            return response.status, await response.text()
    except aiohttp.ClientConnectionError:
        return 0, "not listening"


async def _logs(name: str) -> str:
    result = await _podman_async("logs", name)
    return result.stdout + result.stderr


async def _wait_until_serving(stand_in: FakeDiscord, container: str, port: int) -> None:
    async with asyncio.timeout(_START_TIMEOUT):
        while (await _health(port)) != (200, "ok") or not stand_in.gateway.sessions:
            state = (await _podman_async("inspect", "--format={{.State.Status}}", container)).stdout.strip()
            assert state == "running", f"the container is {state}:\n{await _logs(container)}"
            await asyncio.sleep(0.5)
        await stand_in.gateway.session.identified.wait()


@pytest.mark.container
async def test_the_bot_in_the_container_answers_on_the_stand_in_and_is_healthy(stand_in, model, tmp_path):
    podman, image = _podman(), await asyncio.to_thread(_image)
    admin_guild = stand_in.add_guild("Bot HQ")
    port = free_port()
    env_file = tmp_path / ".env"  # as compose's env_file: the token never on a command line
    env_file.write_text(
        f"DISCORD_TOKEN={stand_in.token}\n"
        f"FLAMINGO_DISCORD__API_BASE_URL={stand_in.base_url}/api/v10\n"
        f"FLAMINGO_DISCORD__GATEWAY_URL={stand_in.gateway.url}\n"
        f"FLAMINGO_DISCORD__ADMIN_GUILD_ID={admin_guild.id}\n"
        "FLAMINGO_MODEL__NAME=/model\nFLAMINGO_MODEL__DEVICE=cpu\nFLAMINGO_MODEL__PRECISION=fp32\n"
        # The host's network: the metrics stay on its loopback, on a port of this test's own.
        f"FLAMINGO_METRICS__HOST=127.0.0.1\nFLAMINGO_METRICS__PORT={port}\nHF_HUB_OFFLINE=1\n"
    )
    container = f"flamingo-bot-test-{os.getpid()}"
    await _podman_async(
        *("run", "--detach", "--init", f"--name={container}", "--network=host", f"--env-file={env_file}"),
        *(f"--volume={model}:/model:ro", image),
    )
    try:
        await _wait_until_serving(stand_in, container, port)
        guild = await stand_in.join("Readers")
        scene = Scene(stand_in, guild, stand_in.add_member(guild, "reader"), stand_in.add_member(guild, "moderator"))
        answer = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=3))[0]
        assert answer.embeds and not answer.ephemeral, answer
        stand_in.check_violations()

        # The image's own healthcheck, run now: podman's timer for it needs systemd, which a test machine may lack.
        await _podman_async("healthcheck", "run", container)
        health = await _podman_async("inspect", "--format={{.State.Health.Status}}", container)
        assert health.stdout.strip() == "healthy"
        # The database is on its volume, written by the bot's user.
        await _podman_async("exec", container, "test", "-s", "/var/lib/flamingo-bot/flamingo.db")

        await _podman_async("stop", "--time=60", container)
        exit_code = await _podman_async("inspect", "--format={{.State.ExitCode}}", container)
        logs = await _logs(container)
        assert exit_code.stdout.strip() == "0" and "Closed: " in logs and "Traceback" not in logs, logs
    finally:
        subprocess.run([podman, "rm", "--force", "--volumes", container], capture_output=True, timeout=120)


def _seconds(duration: str) -> int:
    """A compose duration as compose.yaml writes them: '90s' or '3m'."""
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, f"not a duration this test reads: {duration!r}"
    return int(match[1]) * (60 if match[2] == "m" else 1)


@pytest.mark.deploy
def test_compose_gives_the_bot_a_gpu_its_volumes_and_a_shutdown_its_time():
    from cogs.utils.bot import _SHUTDOWN_GRACE_SECONDS
    from core.serving.local import _STOPPING_SECONDS, InferenceService
    from core.serving.ray.backend import CLOSE_WAIT_SECONDS

    bot = yaml.safe_load((PROJECT_ROOT / "compose.yaml").read_text())["services"]["bot"]
    assert bot["env_file"] == ".env" and bot["init"] is True and bot["restart"] == "unless-stopped"
    devices = bot["deploy"]["resources"]["reservations"]["devices"]
    assert [(device["driver"], device["capabilities"]) for device in devices] == [("nvidia", ["gpu"])]
    declared = re.search(r"^VOLUME (\[.*\])$", (PROJECT_ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert declared is not None
    assert {volume.split(":")[1] for volume in bot["volumes"]} == set(json.loads(declared[1]))
    # What SIGTERM waits for at most, as deploy/flamingo-bot.service's test reckons it.
    local = inspect.signature(InferenceService.close).parameters["grace_seconds"].default + _STOPPING_SECONDS
    ray = 2 * CLOSE_WAIT_SECONDS
    assert _seconds(bot["stop_grace_period"]) > max(local, ray) + _SHUTDOWN_GRACE_SECONDS
