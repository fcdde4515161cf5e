"""Jobs for the worker pools' tests: run in a worker process, so found there by their module's name."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import NoReturn

from core.errors import BadImage


def twice(value: int) -> int:
    return 2 * value


def refuse(message: str) -> NoReturn:
    raise BadImage(message)


def niceness() -> int:
    return os.nice(0)


def wait_for(path: str) -> str:
    """Runs until ``path`` exists (the test's way of letting a job end), writing its process id
    beside it first."""
    Path(f"{path}.pid").write_text(str(os.getpid()))
    while not Path(path).exists():
        time.sleep(0.01)
    return Path(path).read_text()


def crash(*_: object) -> NoReturn:
    """As a decoder's crash would: the process ends without a word."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")
