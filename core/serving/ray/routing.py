"""Task affinity for Ray Serve: a task's requests go to the replica that holds its prefix cache.

Serve's default router spreads requests by load, so with N replicas each task's examples would be
computed on every replica and the prefix-cache hit rate divided by about N. Here each task key
ranks the replicas by rendezvous hashing (stable when replicas come and go: only the tasks of a
removed replica move), and the top one is preferred unless its queue is longer than the shortest
by more than ``max_imbalance``; then the least loaded come first.

Serve's request-router API is alpha: this is written against the pinned ``ray==2.60.0`` and its
probe of queue lengths, and a test keeps it honest.
"""

from __future__ import annotations

import hashlib
import math

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from core.serving.ray.wire import WireRequest


def affinity_key(pending_request: PendingRequest | None) -> str | None:
    """What a request needs in a replica's memory: a model a server chose, else its task's cached examples.

    Loading a model costs far more than computing a task's examples, so all requests for a chosen
    model share one replica (until it is too busy), whatever their task.
    """
    if pending_request is None:
        return None
    if model := pending_request.metadata.multiplexed_model_id:
        return f"model\0{model}"
    request = pending_request.args[0] if pending_request.args else None
    return request.task.key if isinstance(request, WireRequest) else None


def rendezvous_score(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(), "big")


def _or_infinity(length: int | None) -> float:
    """Replicas whose queue length is unknown go last."""
    return math.inf if length is None else length


class TaskAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, max_imbalance: int = 4) -> None:  # type: ignore[override]  # upstream takes any **kwargs
        self.max_imbalance = max_imbalance

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = affinity_key(pending_request)
        if key is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        ranked = sorted(candidate_replicas, key=lambda r: rendezvous_score(key, r.replica_id.unique_id), reverse=True)
        probed = await self._probe_queue_lens(ranked, 0)
        lengths = {replica.replica_id.unique_id: length for replica, length in probed}
        known = [length for length in lengths.values() if length is not None]
        preferred = lengths.get(ranked[0].replica_id.unique_id)
        if preferred is None or (known and preferred - min(known) > self.max_imbalance):
            ranked.sort(key=lambda r: _or_infinity(lengths.get(r.replica_id.unique_id)))
        return [[replica] for replica in ranked]
