"""A replica of the Flamingo Serve application: the bot's own service, plus the models servers chose.

Each replica runs the same engine and service as a single process does (worker thread, prefix
cache, batching), so its answers are the local ones token for token. The default model stays
loaded; a request carrying another model's multiplexed id is answered by that model, loaded on
first use through Serve's multiplexing within ``ray.extra_model_memory_gib`` (``core/serving/model_choice.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from core.config import RaySettings, Settings
from core.errors import BadParameter
from core.model.engine import Answer
from core.serving.local import InferenceService, start_service
from core.serving.model_choice import ModelCatalog
from core.serving.ray.wire import Asked, WireDecoder, WireRequest

log = logging.getLogger(__name__)


def deployment_options(config: RaySettings) -> dict:
    """Replica count (or autoscaling bounds), resources, health checks and a drain on redeploy.

    A replica being replaced finishes its requests first (up to two minutes), so a redeploy drops
    no accepted request.
    """
    options: dict = {
        # One place more than members' requests take: a background request's (a task's evaluation),
        # which the bot sends one at a time, so that it never waits for a member's place, nor takes one.
        "max_ongoing_requests": config.max_ongoing_requests + 1,
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


class ChosenModel:
    """A model other than the default, loaded on a replica because a server chose it.

    Serve's multiplexer calls ``__del__`` when it evicts the model, which stops its worker and
    lets its memory go.
    """

    def __init__(self, name: str, service: InferenceService, loaded: dict[str, ChosenModel]) -> None:
        self.name = name
        self.service = service
        self._loaded = loaded
        loaded[name] = self

    def __del__(self) -> None:
        self._loaded.pop(self.name, None)
        self.service.close()


def _multiplexed(count: int, load: Callable[[str], Awaitable[ChosenModel]]) -> Callable[[str], Awaitable[ChosenModel]]:
    """Serve's model multiplexing around ``load``, holding at most ``count`` models per replica."""
    from ray import serve

    async def chosen_model(model: str) -> ChosenModel:  # a plain function: Serve keeps its cache on it
        return await load(model)

    return serve.multiplexed(max_num_models_per_replica=count)(chosen_model)


def _retrieved(answered: asyncio.Future[Answer]) -> None:
    if not answered.cancelled():
        answered.exception()


class FlamingoReplica:
    """One replica: the bot's own service (worker thread, prefix cache, batching) behind Serve.

    The default model stays loaded; a request carrying another model's multiplexed id is answered
    by that model, loaded on first use within the budget of ``ray.extra_model_memory_gib``.
    """

    def __init__(self, settings_json: str) -> None:
        self.settings = Settings.model_validate_json(settings_json)
        self.service = start_service(self.settings, shares=False)
        self.catalog = ModelCatalog.from_settings(self.settings)
        self.wire = WireDecoder(image_bytes=self.settings.service.image_cache_mb * 2**20)
        self.ongoing = 0
        self.chosen: dict[str, ChosenModel] = {}
        count = self.catalog.models_per_replica
        self._chosen_model = _multiplexed(count, self._load_chosen) if count else None

    async def _load_chosen(self, model: str) -> ChosenModel:
        self.catalog.check_choice(model)
        settings = self.settings.model_copy(update={"model": self.settings.model.chosen(model)})
        log.info("loading %s, which a server chose", model)
        return ChosenModel(model, await asyncio.to_thread(start_service, settings, False), self.chosen)

    async def _service_for(self, model: str) -> InferenceService:
        if not model or model == self.catalog.default:
            return self.service
        self.catalog.check_choice(model)
        if self._chosen_model is None:
            raise BadParameter("This bot's model servers have no memory set aside for models other than the default.")
        return (await self._chosen_model(model)).service

    @contextlib.asynccontextmanager
    async def _taken(self, request: WireRequest) -> AsyncIterator[tuple[InferenceService, Asked]]:
        """The request decoded (off the event loop) and the service of the model it asked for,
        counted as ongoing while it is answered."""
        from ray import serve

        asked = await asyncio.to_thread(self.wire.request, request)
        self.ongoing += 1
        try:
            yield await self._service_for(serve.get_multiplexed_model_id()), asked
        finally:
            self.ongoing -= 1

    async def answer(self, request: WireRequest) -> Answer:
        async with self._taken(request) as (service, asked):
            return await service.submit(*asked, background=request.background).answer()

    async def answer_stream(self, request: WireRequest) -> AsyncGenerator[str | Answer, None]:
        """The answer's text so far as it is decoded (``Ticket.partial_texts``), then the answer itself.

        The text is read (detokenised) and sent at most every quarter of ``answers.stream_edit_seconds``,
        the least time between the bot's edits: read at every word, 16 followed answers took 7% longer
        on a 2-core machine. The answer goes as soon as it is ready. A caller that stops listening (a
        cancel, a lost bot) ends this generator, which withdraws the request.
        """
        every = self.settings.answers.stream_edit_seconds / 4
        async with self._taken(request) as (service, asked):
            ticket = service.submit(*asked, background=request.background)
            answered = asyncio.ensure_future(ticket.answer())
            answered.add_done_callback(_retrieved)  # a failure is raised by ``partial_texts`` first
            try:
                async for text in ticket.partial_texts():
                    yield text
                    await asyncio.wait([answered], timeout=every)  # the next read is the latest by then
                yield await answered
            finally:
                answered.cancel()  # its end withdraws the request (``Ticket.answer``)

    def status(self) -> dict:
        """Which actor this is, its models and what its caches hold: for the admin status, metrics, benchmarks."""
        import ray

        return {
            "actor": ray.get_runtime_context().get_actor_name(),
            "ongoing": self.ongoing,
            "models": [self.catalog.default, *self.chosen],
            "caches": self.service.cache_status()[0],
        }

    def check_health(self) -> None:
        """Serve restarts a replica whose model service has stopped."""
        if self.service.closed:
            raise RuntimeError("the model service of this replica has stopped")

    def __del__(self) -> None:
        self.service.close()
