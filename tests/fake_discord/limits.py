"""Rate limits as Discord sends them, plus injected 429s and 5xx for fault tests.

discord.py retries a 429 only when it carries a ``Via`` header (otherwise it assumes a proxy, or
Cloudflare, answered) and reads ``retry_after`` from a JSON body, so both are always sent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


class Clock:
    """Monotonic time that tests can move forward, so expiry is tested without waiting."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def wall(self) -> float:
        """Unix time, moved forward with the clock (signed CDN links expire by it)."""
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Fault:
    method: str
    path_contains: str
    status: int
    times: int
    retry_after: float
    served: int = 0


def too_many_requests(retry_after: float, bucket: str, scope: str = "user") -> web.Response:
    body = json.dumps({"message": "You are being rate limited.", "retry_after": retry_after, "global": False})
    return web.Response(
        status=429,
        body=body,
        headers={
            "Content-Type": "application/json",
            "Retry-After": str(max(1, round(retry_after))),
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Bucket": bucket,
            "X-RateLimit-Scope": scope,
            "Via": "1.1 google",
        },
    )


@dataclass
class RateLimiter:
    """Per-route buckets (method, route, major parameter), off unless a test turns them on."""

    clock: Callable[[], float]
    enabled: bool = False
    limit: int = 5
    window: float = 1.0
    faults: list[Fault] = field(default_factory=list)
    _windows: dict[str, tuple[float, int]] = field(default_factory=dict)
    limited: int = 0

    def inject(
        self, method: str, path_contains: str, status: int = 429, times: int = 1, retry_after: float = 0.2
    ) -> Fault:
        fault = Fault(method, path_contains, status, times, retry_after)
        self.faults.append(fault)
        return fault

    def check(self, request: web.Request, bucket: str) -> web.Response | None:
        """A refusal to send instead of handling the request, or None."""
        for fault in self.faults:
            if fault.served < fault.times and request.method == fault.method and fault.path_contains in request.path:
                fault.served += 1
                if fault.status == 429:
                    return too_many_requests(fault.retry_after, bucket)
                return web.Response(status=fault.status, text="<html>upstream error</html>", content_type="text/html")
        if not self.enabled:
            return None
        now = self.clock()
        started, used = self._windows.get(bucket, (now, 0))
        if now - started >= self.window:
            started, used = now, 0
        if used >= self.limit:
            self.limited += 1
            return too_many_requests(self.window - (now - started), bucket)
        self._windows[bucket] = (started, used + 1)
        return None

    def headers(self, bucket: str) -> dict[str, str]:
        if not self.enabled:
            return {}
        started, used = self._windows.get(bucket, (self.clock(), 0))
        reset_after = max(0.0, self.window - (self.clock() - started))
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.limit - used)),
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Bucket": bucket,
        }
