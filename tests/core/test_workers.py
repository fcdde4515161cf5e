"""Worker pools: jobs run in processes of their own, which are killed past their time and replaced,
and callers wait without taking the event loop's default threads."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from core.errors import BadImage
from core.workers import PoolFull, TimedOut, WorkerDied, WorkerPool
from tests.helpers.jobs import crash, niceness, refuse, twice, wait_for

# Every test's pool is this one (size 1), started once: a worker's start-up is paid once per session.
_POOL = WorkerPool("test-workers", size=1, waiting=1, preload=("tests.helpers.jobs",))
_LONG = 60.0  # a bound never reached


@pytest.fixture
def pool() -> WorkerPool:
    return _POOL


async def _started(path: Path) -> int:
    """The process id a ``wait_for`` job wrote once running."""
    pid_file = Path(f"{path}.pid")
    while not pid_file.exists():
        await asyncio.sleep(0.01)
    return int(pid_file.read_text())


def _ended(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_job_runs_in_another_process_and_its_result_or_refusal_comes_back(pool, tmp_path):
    assert await pool.run(_LONG, twice, 21) == 42
    with pytest.raises(BadImage, match=r"^The file is empty\.$"):
        await pool.run(_LONG, refuse, "The file is empty.")
    release = tmp_path / "release"
    release.write_text("done")
    assert await pool.run(_LONG, wait_for, str(release)) == "done"
    assert await _started(release) != os.getpid()


async def test_a_job_past_its_time_has_its_process_killed_and_the_next_job_gets_a_new_one(pool, tmp_path):
    never = tmp_path / "never"
    with pytest.raises(TimedOut):
        await pool.run(0.2, wait_for, str(never))
    killed = await _started(never)
    assert _ended(killed)  # killed and reaped, not left running
    released = tmp_path / "released"
    released.write_text("fine")
    assert await pool.run(_LONG, wait_for, str(released)) == "fine"
    assert await _started(released) != killed


async def test_a_worker_that_dies_is_told_and_replaced(pool):
    with pytest.raises(WorkerDied):
        await pool.run(_LONG, crash)
    assert await pool.run(_LONG, twice, 2) == 4


async def test_jobs_beyond_the_running_and_the_waiting_are_refused_at_once(pool, tmp_path):
    release = tmp_path / "release"
    running = asyncio.ensure_future(pool.run(_LONG, wait_for, str(release)))
    await _started(release)
    waiting = asyncio.ensure_future(pool.run(_LONG, twice, 5))
    await asyncio.sleep(0)
    with pytest.raises(PoolFull):
        await pool.run(_LONG, twice, 6)
    release.write_text("go")
    assert await asyncio.gather(running, waiting) == ["go", 10]
    assert await pool.run(_LONG, twice, 6) == 12  # their places are free again


async def test_waiting_for_a_job_takes_none_of_the_event_loops_default_threads(pool, tmp_path):
    """The default executor stands for everyone's work; here its one thread is busy throughout."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(1))
    busy = threading.Event()
    held = loop.run_in_executor(None, busy.wait)
    try:
        assert await pool.run(_LONG, twice, 8) == 16
    finally:
        busy.set()
        await held


async def test_workers_can_run_at_a_lower_cpu_priority_than_the_bot():
    lower = WorkerPool("test-nice", size=1, waiting=0, niceness=5, preload=("tests.helpers.jobs",))
    assert await lower.run(_LONG, niceness) == os.nice(0) + 5
