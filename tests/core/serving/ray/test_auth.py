"""The cluster refuses a client without its token: an open head port would run anyone's code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

JOIN = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); print('joined')"


def _join(address: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("RAY_AUTH")} | env
    return subprocess.run(
        [sys.executable, "-c", JOIN, address], env=environment, capture_output=True, text=True, timeout=180
    )


@pytest.mark.parametrize(
    "client", [{}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}], ids=["no token", "wrong token"]
)
def test_a_client_without_the_clusters_token_cannot_join(ray_head, client, tmp_path):
    refused = _join(ray_head, HOME=str(tmp_path), **client)  # HOME: no token file of the machine's
    assert refused.returncode != 0
    assert "joined" not in refused.stdout
    assert "InvalidAuthToken" in refused.stderr


def test_a_client_with_the_token_joins(ray_head):
    joined = _join(ray_head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.environ["RAY_AUTH_TOKEN"])
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert "joined" in joined.stdout
