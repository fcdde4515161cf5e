"""deploy/flamingo-bot.service: systemd accepts it, and it keeps what the bot relies on when stopped and restarted."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from core.config import PROJECT_ROOT, load_settings

pytestmark = pytest.mark.deploy

UNIT = PROJECT_ROOT / "deploy" / "flamingo-bot.service"
INSTALLED = "/opt/flamingo-bot"  # where the unit expects the checkout


def _directives(text: str) -> dict[str, dict[str, list[str]]]:
    """Section → directive → its values in order (Environment= and the like may repeat)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


def _one(values: list[str]) -> str:
    assert len(values) == 1, values
    return values[0]


def _seconds(span: str) -> int:
    """A systemd time span as this unit writes them: '90', '30s' or '3min'."""
    match = re.fullmatch(r"(\d+)(s|min)?", span)
    assert match, f"not a time span this test reads: {span!r}"
    return int(match[1]) * (60 if match[2] == "min" else 1)


# The specifiers of a system unit's StateDirectory and CacheDirectory.
_DIRECTORIES = {"%S": "/var/lib", "%C": "/var/cache"}


def _expand(value: str) -> str:
    return re.sub("%[SC]", lambda specifier: _DIRECTORIES[specifier[0]], value)


def _verify(unit: Path) -> str:
    """All ``systemd-analyze verify`` says of the unit: warnings too, since it exits 0 on an unknown directive."""
    assert shutil.which("systemd-analyze"), "the unit's check needs systemd-analyze (Debian's systemd package)"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "SYSTEMD_LOG_COLOR": "0"},
    )
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else f"\n(exit {result.returncode})")


def _as_installed_here(tmp_path: Path, text: str) -> Path:
    """The unit with only its install paths moved to this checkout, since verify checks that ExecStart's
    program exists: the venv's Python (this interpreter) and the checkout (the project). The rest is as written."""
    unit = tmp_path / "flamingo-bot.service"
    moved = text.replace(f"{INSTALLED}/.venv/bin/python", sys.executable).replace(INSTALLED, str(PROJECT_ROOT))
    unit.write_text(moved)
    return unit


def test_systemd_verifies_the_unit_without_a_word(tmp_path):
    assert _verify(_as_installed_here(tmp_path, UNIT.read_text())) == ""


@pytest.mark.parametrize(
    ("broken", "complaint"),
    [
        (("Restart=on-failure", "Restrat=on-failure"), "Unknown key 'Restrat' in section [Service]"),
        (("KillSignal=SIGTERM", "KillSignal=SIGTREM"), "Failed to parse"),
        (("ProtectSystem=strict", "ProtectSystem=stricter"), "Failed to parse"),
    ],
    ids=["misspelt-directive", "misspelt-signal", "bad-value"],
)
def test_verify_reports_a_broken_unit(tmp_path, broken, complaint):
    """The check above can fail: a typo systemd would ignore at start is reported."""
    text = UNIT.read_text()
    assert broken[0] in text
    said = _verify(_as_installed_here(tmp_path, text.replace(broken[0], broken[1])))
    assert complaint in said, said


def test_verify_reports_a_missing_interpreter(tmp_path):
    """Why the test moves the install paths: as written, they exist only on the server."""
    unit = tmp_path / "flamingo-bot.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(tmp_path / "nowhere")))
    assert "is not executable: No such file or directory" in _verify(unit)


def test_the_unit_restarts_on_failure_and_gives_a_shutdown_its_time():
    from cogs.utils.bot import _SHUTDOWN_GRACE_SECONDS
    from core.serving.local import _STOPPING_SECONDS, InferenceService
    from core.serving.ray.backend import CLOSE_WAIT_SECONDS

    unit = _directives(UNIT.read_text())
    service = unit["Service"]
    assert _one(service["Restart"]) == "on-failure"
    assert _seconds(_one(service["RestartSec"])) > 0
    assert int(_one(unit["Unit"]["StartLimitBurst"])) > 1 and _seconds(_one(unit["Unit"]["StartLimitIntervalSec"])) > 0
    assert _one(service["KillSignal"]) == "SIGTERM"
    # What SIGTERM waits for at most: the local service's batch, then its stop at the next token, or
    # the Ray backend's answers and then its cluster watcher; and after either, commands' replies.
    local = inspect.signature(InferenceService.close).parameters["grace_seconds"].default + _STOPPING_SECONDS
    ray = 2 * CLOSE_WAIT_SECONDS
    assert _seconds(_one(service["TimeoutStopSec"])) > max(local, ray) + _SHUTDOWN_GRACE_SECONDS


def test_the_unit_runs_the_checkout_as_its_own_user_with_the_token_from_a_file_that_must_exist():
    service = _directives(UNIT.read_text())["Service"]
    assert _one(service["ExecStart"]) == f"{INSTALLED}/.venv/bin/python {INSTALLED}/main.py run"
    assert _one(service["WorkingDirectory"]) == INSTALLED
    assert _one(service["User"]) == _one(service["Group"]) == "flamingo-bot"
    assert _one(service["EnvironmentFile"]) == "/etc/flamingo-bot/env"  # no "-": a missing file fails the start
    assert all(_one(service[output]) == "journal" for output in ("StandardOutput", "StandardError"))


def test_the_hardening_leaves_the_gpu_reachable():
    service = _directives(UNIT.read_text())["Service"]
    assert service["PrivateDevices"] in ([], ["no"])  # it hides /dev/nvidia*
    assert "MemoryDenyWriteExecute" not in service  # CUDA and torch generate code at run time
    # Any DeviceAllow (ProtectClock implies one) turns the device policy into an allow-list.
    assert not {"DeviceAllow", "ProtectClock"} & service.keys()
    assert service["DevicePolicy"] in ([], ["auto"])
    assert "ProcSubset" not in service  # CUDA reads /proc/driver/nvidia
    assert set(_one(service["RestrictAddressFamilies"]).split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert _one(service["ProtectSystem"]) == "strict" and _one(service["NoNewPrivileges"]) == "yes"


def test_the_units_settings_are_real_and_put_what_the_bot_writes_where_it_may(monkeypatch):
    """With ProtectSystem=strict only the state and cache directories are writable: the database and
    the model cache must be there, and the FLAMINGO_ variables that move them must name real settings."""
    service = _directives(UNIT.read_text())["Service"]
    environment = {name: _expand(value) for name, _, value in (line.partition("=") for line in service["Environment"])}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()  # refuses a FLAMINGO_ variable that names no setting
    assert settings.storage.database_path.parent == Path("/var/lib", _one(service["StateDirectory"]))
    assert Path(environment["HF_HOME"]).is_relative_to(Path("/var/cache", _one(service["CacheDirectory"])))
