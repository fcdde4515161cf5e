"""Health and Prometheus metrics over HTTP, on loopback unless configured: the same for both backends.

Counters and the latency histogram are updated as requests finish; everything else (queue depth,
cache hit rates, replicas, shard latencies, the database's refused writes) is read from its owner
at scrape time through providers, so nothing is copied or kept in step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.storage.database import WriteState

log = logging.getLogger(__name__)

CacheStats = dict[str, dict[str, int]]  # cache name -> entries, bytes, hits, misses
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)


class _Snapshot(Collector):
    """Gauges read when Prometheus scrapes, from the latest values the providers gave."""

    def __init__(self) -> None:
        self.queue_depth = 0
        self.caches: CacheStats = {}
        self.replicas: int | None = None
        self.reachable = True
        self.shard_latency: dict[int, float] = {}
        self.writes = WriteState()

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("flamingo_queue_depth", "Requests waiting for or on the model")
        queue.add_metric([], self.queue_depth)
        yield queue
        for counter in ("entries", "bytes", "hits", "misses"):
            family = GaugeMetricFamily(f"flamingo_cache_{counter}", f"Cache {counter}", labels=["cache"])
            for cache, stats in self.caches.items():
                family.add_metric([cache], stats[counter])
            yield family
        reachable = GaugeMetricFamily("flamingo_model_reachable", "1 while the model answers; 0 for a lost cluster")
        reachable.add_metric([], int(self.reachable))
        yield reachable
        if self.replicas is not None:
            replicas = GaugeMetricFamily("flamingo_replicas", "Model replicas that answered the last status call")
            replicas.add_metric([], self.replicas)
            yield replicas
        latency = GaugeMetricFamily("flamingo_shard_latency_seconds", "Gateway heartbeat latency", labels=["shard"])
        for shard, seconds in self.shard_latency.items():
            latency.add_metric([str(shard)], seconds)
        yield latency
        refused = CounterMetricFamily(
            "flamingo_storage_refused_writes", "Writes the database refused (disk full, read-only, I/O error, locked)"
        )
        refused.add_metric([], self.writes.refused)
        yield refused
        degraded = GaugeMetricFamily(
            "flamingo_storage_degraded", "1 from a refused write until a write succeeds: answers go unstored"
        )
        degraded.add_metric([], int(self.writes.degraded))
        yield degraded


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("flamingo_requests", "Requests by outcome", ["outcome"], registry=self.registry)
        self.latency = Histogram(
            "flamingo_request_seconds",
            "From queueing to the answer, for answered requests",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)

    def answered(self, seconds: float) -> None:
        self.requests.labels("answered").inc()
        self.latency.observe(seconds)

    def ended(self, outcome: str) -> None:
        """A request that got no answer: cancelled, refused or failed."""
        self.requests.labels(outcome).inc()

    def exposition(
        self,
        queue_depth: int,
        caches: CacheStats,
        replicas: int | None,
        shard_latency: dict[int, float],
        reachable: bool,
        writes: WriteState,
    ) -> bytes:
        snapshot = self._snapshot
        snapshot.queue_depth, snapshot.caches = queue_depth, caches
        snapshot.replicas, snapshot.shard_latency, snapshot.reachable = replicas, shard_latency, reachable
        snapshot.writes = writes
        return generate_latest(self.registry)


@dataclass(frozen=True)
class Health:
    """What ``/health`` says.

    ``serving`` False (not connected, closing, the model unreachable) answers 503, so that a load
    balancer or supervisor acts. A part that fails while the bot still answers (``degraded``, e.g.
    "storage" when the database refuses writes and answers go unstored) answers 200 with
    ``degraded: storage``: restarting a bot that still answers would cost its queue and fix no disk;
    the body, the metrics and ``/admin status`` tell the operator instead.
    """

    serving: bool
    degraded: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        if not self.serving:
            return "unavailable"
        return f"degraded: {', '.join(self.degraded)}" if self.degraded else "ok"


async def serve_metrics(
    host: str, port: int, render: Callable[[], Awaitable[bytes]], healthy: Callable[[], Health]
) -> web.AppRunner:
    """``/metrics`` (Prometheus text) and ``/health`` (200, perhaps degraded, or 503: see ``Health``)
    until the runner is cleaned up."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=await render(), content_type="text/plain", charset="utf-8")

    async def health(_: web.Request) -> web.Response:
        state = healthy()
        return web.Response(status=200 if state.serving else 503, text=state.text)

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics), web.get("/health", health)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return runner


async def gather_caches(read: Callable[[], list[CacheStats]]) -> tuple[CacheStats, int]:
    """Summed cache counters over replicas (read in a thread: it may wait on the cluster), and how many."""
    statuses = await asyncio.to_thread(read)
    summed: CacheStats = {}
    for status in statuses:
        for cache, stats in status.items():
            into = summed.setdefault(cache, dict.fromkeys(stats, 0))
            for counter, value in stats.items():
                into[counter] += value
    return summed, len(statuses)
