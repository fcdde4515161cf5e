"""The task-affinity router's choices, with replicas and queue lengths made up by the test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from core.generation import GenerationParams
from core.prompts import Task
from core.serving.ray.routing import TaskAffinityRouter, affinity_key, rendezvous_score
from core.serving.ray.wire import WireEncoder

pytestmark = pytest.mark.ray


def _replica(name: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=name))


def _router(lengths: dict[str, int | None], max_imbalance: int = 4) -> TaskAffinityRouter:
    router = TaskAffinityRouter.__new__(TaskAffinityRouter)  # the routing state only, no Serve machinery
    router.initialize_state(max_imbalance=max_imbalance)

    async def probe(replicas, backoff_index):
        return [(replica, lengths[replica.replica_id.unique_id]) for replica in replicas]

    router._probe_queue_lens = probe
    return router


def _pending(key: str | None, model: str = "") -> SimpleNamespace:
    request = WireEncoder().request([], "Output:", Task("t", "", "<image>Output:", key=key), GenerationParams())
    return SimpleNamespace(args=[request], metadata=SimpleNamespace(multiplexed_model_id=model))


async def _order(router, replicas, key, model: str = "") -> list[str]:
    ranks = await router.choose_replicas(replicas, _pending(key, model))
    return [replica.replica_id.unique_id for rank in ranks for replica in rank]


async def test_a_task_prefers_the_same_replica_until_its_queue_is_too_long():
    replicas = [_replica(name) for name in ("r1", "r2", "r3")]
    favourite = max(("r1", "r2", "r3"), key=lambda name: rendezvous_score("guild/1/cats/x/1", name))
    balanced = {"r1": 2, "r2": 2, "r3": 2}
    order = await _order(_router(balanced), replicas, "guild/1/cats/x/1")
    assert order[0] == favourite
    assert await _order(_router(balanced), list(reversed(replicas)), "guild/1/cats/x/1") == order

    busier = {name: 0 for name in balanced} | {favourite: 4}  # 4 longer than the shortest: still within bounds
    assert (await _order(_router(busier), replicas, "guild/1/cats/x/1"))[0] == favourite
    swamped = {name: 1 for name in balanced} | {favourite: 9}  # 8 longer: the least loaded come first
    assert (await _order(_router(swamped), replicas, "guild/1/cats/x/1"))[-1] == favourite


async def test_different_tasks_spread_and_unkeyed_requests_keep_the_default_order():
    replicas = [_replica(f"r{i}") for i in range(4)]
    lengths = {f"r{i}": 0 for i in range(4)}
    favourites = {(await _order(_router(lengths), replicas, f"task-{n}"))[0] for n in range(40)}
    assert len(favourites) == 4
    assert await _order(_router(lengths), replicas, None) == ["r0", "r1", "r2", "r3"]
    assert affinity_key(None) is None


async def test_a_chosen_model_keeps_to_one_replica_whatever_the_task():
    replicas = [_replica(f"r{i}") for i in range(4)]
    lengths = {f"r{i}": 0 for i in range(4)}
    homes = {(await _order(_router(lengths), replicas, f"task-{n}", model="models/mpt-1b"))[0] for n in range(20)}
    assert len(homes) == 1
    assert affinity_key(_pending("task-1", model="models/mpt-1b")) == "model\0models/mpt-1b"
    assert affinity_key(_pending("task-1")) == "task-1"


def test_replica_count_or_autoscaling_bounds_come_from_config():
    from core.config import RaySettings
    from core.serving.ray.replica import deployment_options

    fixed = deployment_options(RaySettings(replicas=3, num_gpus=1))
    assert (fixed["num_replicas"], fixed["ray_actor_options"]["num_gpus"]) == (3, 1)
    assert fixed["max_ongoing_requests"] == RaySettings().max_ongoing_requests + 1  # a place for a background job
    assert "autoscaling_config" not in fixed
    scaled = deployment_options(RaySettings(replicas=1, max_replicas=4, max_ongoing_requests=32))
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}
    assert "num_replicas" not in scaled
    with pytest.raises(ValueError, match="max_replicas 1 is below replicas 2"):
        RaySettings(replicas=2, max_replicas=1)
