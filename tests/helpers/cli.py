"""``python main.py ...`` as an operator runs it: a subprocess from the project's root, with only the
environment given (nothing of the test process's, such as a token or a hub cache, leaks in)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

from core.config import PROJECT_ROOT

# No route to the hub: the tiny models are local, and nothing in the tests may download.
OFFLINE = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}


def run_main(*args: object, env: Mapping[str, str] = OFFLINE, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "main.py", *map(str, args)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env),
    )
