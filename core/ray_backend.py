"""The model on Ray Serve replicas: the calls of the in-process service, answered by a cluster.

The bot joins an existing Ray cluster as a driver, since Serve routes requests in the caller, and
deploys the Flamingo application there (a redeploy with the same settings changes nothing). Each
replica runs the same engine and service as a single process does, so answers are the same
token for token; requests reach it as bytes with content hashes (``core/wire.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence

from PIL import Image

from core.config import PROJECT_ROOT, RaySettings, Settings
from core.engine import Answer, PromptRules
from core.errors import (
    FlamingoError,
    GenerationFailed,
    ModelLoadError,
    RequestCancelled,
    RequestExpired,
    ServiceClosed,
)
from core.generation import GenerationParams
from core.loading import load_text_side
from core.prompts import Task
from core.service import start_service
from core.wire import WireDecoder, WireRequest, to_wire

log = logging.getLogger(__name__)


# Ray reports usage to its makers over the internet unless told not to, in every process it starts.
_NO_USAGE_STATS = {"RAY_USAGE_STATS_ENABLED": "0"}


def _no_usage_stats() -> None:
    os.environ.update(_NO_USAGE_STATS)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds with one line; ``ray.init`` would retry an unreachable cluster for minutes."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot reach the Ray cluster at {address}: {error}") from None


def deployment_options(config: RaySettings) -> dict:
    """Replica count (or autoscaling bounds), resources, health checks and a drain on redeploy.

    A replica being replaced finishes its requests first (up to two minutes), so a redeploy drops
    no accepted request.
    """
    options: dict = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        "health_check_period_s": 10,
        "graceful_shutdown_wait_loop_s": 2,
        "graceful_shutdown_timeout_s": 120,
    }
    if config.max_replicas is None:
        return options | {"num_replicas": config.replicas}
    autoscaling = {
        "min_replicas": config.replicas,
        "max_replicas": config.max_replicas,
        # Scale out before a replica's batch is full: half of it in flight on average.
        "target_ongoing_requests": max(1, config.max_ongoing_requests // 2),
    }
    return options | {"autoscaling_config": autoscaling}


class FlamingoReplica:
    """One replica: the bot's own service (worker thread, prefix cache, batching) behind Serve."""

    def __init__(self, settings_json: str) -> None:
        settings = Settings.model_validate_json(settings_json)
        self.service = start_service(settings)
        self.wire = WireDecoder(image_bytes=settings.service.image_cache_mb * 2**20)
        self.ongoing = 0

    async def answer(self, request: WireRequest) -> Answer:
        images, prompt, task, params = self.wire.request(request)
        self.ongoing += 1
        try:
            return await self.service.answer(images, prompt, task, params)
        finally:
            self.ongoing -= 1

    def status(self) -> dict:
        """Which actor this is and what its caches hold: for the admin status, metrics and benchmarks."""
        import ray

        return {
            "actor": ray.get_runtime_context().get_actor_name(),
            "ongoing": self.ongoing,
            "caches": self.service.cache_status()[0],
        }

    def check_health(self) -> None:
        """Serve restarts a replica whose model service has stopped."""
        if self.service.closed:
            raise RuntimeError("the model service of this replica has stopped")

    def __del__(self) -> None:
        self.service.close()


class RemoteTicket:
    """A request sent to a replica: Ray keeps the line, so no place in it is known here."""

    position: int | None = None

    def __init__(self, service: RayInferenceService, request: WireRequest, deadline: float | None) -> None:
        self._service = service
        self._request = request
        self._response = service.send(request)
        self._deadline = deadline

    def cancel(self) -> None:
        self._response.cancel()  # type: ignore[attr-defined]

    async def answer(self) -> Answer:
        """The answer; past the deadline the request is withdrawn, as the local line does with late ones.

        A replica that dies mid-request (a lost GPU machine, an out-of-memory kill) costs one retry,
        which the router sends to a live replica.
        """
        self._service.in_flight += 1
        timeout = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        try:
            try:
                return await asyncio.wait_for(self._response, timeout)  # type: ignore[arg-type]
            except Exception as error:
                if not _replica_lost(error):
                    raise
                log.warning("a replica was lost during a request; retrying it once elsewhere")
                self._response = self._service.send(self._request)
                return await asyncio.wait_for(self._response, timeout)  # type: ignore[arg-type]
        except TimeoutError:
            self.cancel()
            raise RequestExpired("Your request waited too long for the model; please ask again.") from None
        except asyncio.CancelledError:
            self.cancel()
            raise
        except Exception as error:
            raise _user_error(error) from None
        finally:
            self._service.in_flight -= 1


def _replica_lost(error: BaseException) -> bool:
    from ray.exceptions import RayActorError  # died or unreachable

    return isinstance(error, RayActorError)


def _user_error(error: Exception) -> FlamingoError:
    """The replica's own refusal when it raised one (Ray wraps it), else one line for the user."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, FlamingoError):
        return cause
    if type(error).__name__ == "RequestCancelledError":
        return RequestCancelled("The request was cancelled.")
    log.error("a replica failed a request", exc_info=error)
    return GenerationFailed("The model's server failed while answering; try again in a moment.")


class RayInferenceService:
    """Same calls as ``core.service.InferenceService``; the model runs on the cluster's replicas."""

    def __init__(self, settings: Settings, rules: PromptRules, handle: object) -> None:
        self.settings = settings
        self.rules = rules
        self._handle = handle
        self.in_flight = 0
        self._closed = False

    @classmethod
    def connect(cls, settings: Settings) -> RayInferenceService:
        """Join the cluster, deploy (or find) the application, and load the tokenizer for local checks."""
        _no_usage_stats()
        import ray
        from ray import serve

        config = settings.ray
        _check_reachable(config.address)
        tokenizer, context_length = load_text_side(settings.model)
        # Replicas import this project's code: workers must have the same checkout, at ray.project_path.
        runtime_env = {"env_vars": {"PYTHONPATH": config.project_path or str(PROJECT_ROOT), **_NO_USAGE_STATS}}
        try:
            ray.init(
                address=config.address,
                namespace=config.namespace,
                runtime_env=runtime_env,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ModelLoadError(f"cannot reach the Ray cluster at {config.address}: {error}") from None
        serve.start(proxy_location="Disabled")
        router = None
        if config.routing == "task_affinity":
            from ray.serve.config import RequestRouterConfig

            from core.ray_routing import TaskAffinityRouter

            router = RequestRouterConfig(
                request_router_class=TaskAffinityRouter,
                request_router_kwargs={"max_imbalance": config.max_imbalance},
            )
        options = deployment_options(config) | ({"request_router_config": router} if router is not None else {})
        deployment = serve.deployment(FlamingoReplica, name="FlamingoReplica").options(**options)
        settings_json = settings.model_dump_json(exclude={"discord_token"})
        handle = serve.run(deployment.bind(settings_json), name=config.app_name, route_prefix=None)
        return cls(settings, PromptRules(tokenizer, context_length, settings), handle)

    @property
    def waiting(self) -> int:
        return self.in_flight

    def replica_status(self) -> list[dict]:
        """Every replica's ``FlamingoReplica.status`` (blocking: call it from a thread)."""
        return self._handle.broadcast("status").results()  # type: ignore[attr-defined]

    def cache_status(self) -> list[dict[str, dict[str, int]]]:
        return [replica["caches"] for replica in self.replica_status()]

    def estimated_wait(self, position: int) -> float:
        return 0.0

    def submit(
        self,
        images: Sequence[Image.Image],
        prompt: str,
        task: Task,
        params: GenerationParams,
        deadline: float | None = None,
    ) -> RemoteTicket:
        if self._closed:
            raise ServiceClosed("The bot is shutting down; try again in a moment.")
        self.rules.check_text(prompt, len(images))
        return RemoteTicket(self, to_wire(list(images), prompt, task, params), deadline)

    def send(self, request: WireRequest) -> object:
        return self._handle.answer.remote(request)  # type: ignore[attr-defined]

    async def answer(self, images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams) -> Answer:
        return await self.submit(images, prompt, task, params).answer()

    def close(self) -> None:
        """Leave the cluster; the application keeps serving other bot processes (shards) that use it."""
        self._closed = True
        import ray

        ray.shutdown()
