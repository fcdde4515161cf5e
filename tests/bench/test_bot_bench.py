"""The busy-bot benchmark, briefly (``--quick``): every part runs and its figures come last, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

from core.config import PROJECT_ROOT


def test_quick_run_answers_every_request_and_prints_its_figures_as_the_last_line():
    done = subprocess.run(
        [sys.executable, "-m", "bench.bot_bench", "--quick"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(done.stdout.splitlines()[-1])

    assert [level["concurrency"] for level in result["levels"]] == [1, 8, 32]
    for level in result["levels"]:
        assert level["answered"] == level["requests"]  # nothing refused: a refusal is an unanswered request
        assert level["p50_s"] <= level["p95_s"]
        assert level["answers_per_s"] > 0 and level["service_answers_per_s"] > 0
        assert level["reference_answers_per_s"] > 0 and level["speedup"] > 0
        assert level["hit_rate"] == 1.0  # every task was asked once before: the default cache holds all
    assert isinstance(result["overhead_ratio"], float)
    small = result["small_cache"]
    assert small["tasks_held"] == 1 and 0 <= small["hit_rate"] < 1  # three tasks through a cache for one
    assert small["answered"] == result["levels"][-1]["requests"] and small["speedup"] > 0
    assert result["startup_s"] > 0 and result["first_answer_s"] > 0
    soak = result["soak"]
    assert soak["answered"] == soak["requests"] == 16
    assert soak["rss_end_mb"] > 0 and soak["rss_warm_mb"] > 0
    assert 0 < soak["database_mb"] < soak["database_bound_mb"]
    assert result["settings"]["quotas.user_cooldown_seconds"] == 0
