"""A Ray head on loopback, started and killed as an operator (or a lost machine) would."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

from tests.helpers.settings import free_port

RAY = Path(sys.executable).parent / "ray"
# Ray swaps 127.0.0.1 for the machine's network address when it connects, unless told it runs
# without a cluster network; tests keep every byte on loopback. Every cluster and client runs with
# token authentication, as the README's recipe has operators do, on a token of the test run's own.
RAY_LOOPBACK = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
}


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
