"""The model on Ray Serve replicas: the calls of the in-process service, answered by a cluster.

The bot joins an existing Ray cluster as a driver, since Serve routes requests in the caller, and
deploys the Flamingo application there (a redeploy with the same settings changes nothing). Its
replicas (``core/serving/ray/replica.py``) run the same engine and service as a single process does, so
answers are the same token for token; requests reach them as bytes with content hashes
(``core/serving/ray/wire.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

from PIL import Image

from core.config import PROJECT_ROOT, RaySettings, Settings
from core.errors import (
    BadParameter,
    ClusterUnavailable,
    FlamingoError,
    GenerationFailed,
    ModelLoadError,
    RequestCancelled,
    RequestExpired,
    ServiceClosed,
)
from core.generation import GenerationParams, decode_steps, generation_kwargs
from core.model.engine import Answer, PromptRules
from core.model.loading import load_text_side
from core.prompts import Task
from core.serving.fair_line import FairLine, Party
from core.serving.line_times import RecentTimes
from core.serving.local import BACKGROUND_QUEUE
from core.serving.model_choice import ModelCatalog
from core.serving.protocol import LineStatus, ServiceStatus
from core.serving.ray.replica import FlamingoReplica, deployment_options
from core.serving.ray.wire import WireEncoder, WireRequest

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

log = logging.getLogger(__name__)

# How long closing waits for answers in flight, as the local service waits for its batch.
CLOSE_WAIT_SECONDS = 60.0


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


class SentRequest(Protocol):
    """A request on its way to a replica: Serve's ``DeploymentResponse``, as used here."""

    def cancel(self) -> object: ...

    def __await__(self) -> Generator[Any, None, Answer]: ...


class StreamedRequest(Protocol):
    """A request whose answer a replica streams: Serve's ``DeploymentResponseGenerator``, as used
    here. Its items are the answer's text so far, then the answer (``FlamingoReplica.answer_stream``)."""

    def cancel(self) -> object: ...

    def __aiter__(self) -> AsyncIterator[str | Answer]: ...


class RemoteTicket:
    """A request for a replica: it waits in the bot's fair line while the replicas are full."""

    def __init__(
        self,
        service: RayInferenceService,
        encode: Callable[[], WireRequest],
        deadline: float | None,
        model: str | None,
        party: Party,
        cost: int,
        streams: bool,
        background: bool = False,
    ) -> None:
        self._service = service
        self._encode = encode
        self._model = model
        self.party = party
        self.cost = cost
        self.turn: asyncio.Future[None] | None = None  # while it waits in the line: done when its turn comes
        self.holds_room = False  # one of the places the replicas take at once is its own
        self.background = background  # a job's request, in the background line (``RayInferenceService``)
        self._response: SentRequest | StreamedRequest | None = None
        self._streams = streams  # its text can be followed as it is written (not beam search's)
        self._followed = False  # someone follows its text: the replica is asked to stream it
        self._written = ""  # its text so far, as the replica last sent it
        self._changed = asyncio.Event()
        self._ended = False
        self._error: BaseException | None = None  # what ended the answer, when it failed
        self._cancelled = False
        self._deadline = deadline
        self._queued_at = time.monotonic()

    @property
    def position(self) -> int | None:
        return self._service.line_of(self).position(self)

    def cancel(self) -> None:
        self._cancelled = True
        if self._service.line_of(self).remove(self) and self.turn is not None and not self.turn.done():
            self.turn.set_exception(RequestCancelled("The request was cancelled before it ran."))
        if self._response is not None:
            self._response.cancel()

    async def answer(self) -> Answer:
        """The answer (``_answer``), and its end told to whoever follows its text."""
        try:
            return await self._answer()
        except BaseException as error:
            self._error = error
            raise
        finally:
            self._ended = True
            self._changed.set()

    async def _answer(self) -> Answer:
        """The answer; past the deadline the request is withdrawn, as the local line does with late ones.

        A replica that dies mid-request (a lost GPU machine, an out-of-memory kill) costs one retry,
        which the router sends to a live replica. A lost cluster ends the wait at once.
        """
        self._service.in_flight += 1
        try:
            # Off the event loop: a request's images and its task's examples are PNG-encoded here.
            request = await asyncio.to_thread(self._encode)
            if self._cancelled:
                raise RequestCancelled("The request was cancelled before it ran.")
            if self.turn is not None:
                async with asyncio.timeout(self._remaining()):
                    await self.turn
            if not self._service.reachable:  # lost while encoding or in line: it would wait for its deadline
                raise ClusterUnavailable(_CLUSTER_LOST)
            started = time.monotonic()
            try:
                answer = await self._service.unless_lost(self._sent(request), self._remaining())
            except Exception as error:
                if not _replica_lost(error):
                    raise
                log.warning("a replica was lost during a request; retrying it once elsewhere")
                answer = await self._service.unless_lost(self._sent(request), self._remaining())
            self._service.times.record(self._queued_at, started)
            return answer
        except TimeoutError:
            self.cancel()
            raise RequestExpired("Your request waited too long for the model; please ask again.") from None
        except (asyncio.CancelledError, ClusterUnavailable):
            self.cancel()
            raise
        except FlamingoError:
            raise
        except Exception as error:
            raise _user_error(error) from None
        finally:
            self._service.leave(self)
            self._service.in_flight -= 1

    async def _sent(self, request: WireRequest) -> Answer:
        """Sent to a replica, streamed when its text is followed (from when it is sent: in the bot,
        the follower starts as the request is asked), and its answer received."""
        if not self._followed:
            response = self._response = self._service.send(request, self._model)
            return await response
        stream = self._response = self._service.send_streamed(request, self._model)
        async for item in stream:
            if isinstance(item, Answer):
                return item
            self._written = item
            self._changed.set()
        raise GenerationFailed("The model's server ended its answer without sending it; try again in a moment.")

    async def partial_texts(self) -> AsyncIterator[str]:
        """The answer's text so far as the replica streams it, the latest each time it is read, as
        the local ``Ticket.partial_texts`` gives it (a retry elsewhere writes it anew). Beam search
        yields nothing. One reader at a time."""
        if not self._streams:
            return
        self._followed = True
        shown = ""
        while True:
            ended, text = self._ended, self._written
            if text != shown:
                shown = text
                yield text
            if ended:
                break
            await self._changed.wait()
            self._changed.clear()
        if self._error is not None and not isinstance(self._error, (RequestCancelled, asyncio.CancelledError)):
            raise self._error

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())


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


def _settle(lost: asyncio.Future[None]) -> None:
    if not lost.done():
        lost.set_result(None)


def _retrieve(task: asyncio.Future[Answer]) -> None:
    if not task.cancelled():
        task.exception()


_CLUSTER_LOST = (
    "The bot cannot reach its model servers right now. It reconnects by itself as soon as they are back; "
    "please ask again in a few minutes."
)


def _join(config: RaySettings) -> None:
    import ray

    # Replicas import this project's code: workers must have the same checkout, at ray.project_path.
    runtime_env = {"env_vars": {"PYTHONPATH": config.project_path or str(PROJECT_ROOT), **_NO_USAGE_STATS}}
    try:
        ray.init(
            address=config.address, namespace=config.namespace, runtime_env=runtime_env, logging_level=logging.WARNING
        )
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"cannot reach the Ray cluster at {config.address}: {error}") from None


def _deploy(settings: Settings) -> DeploymentHandle[FlamingoReplica]:
    """Deploy the application (unchanged settings redeploy nothing) and return its handle."""
    from ray import serve

    config = settings.ray
    serve.start(proxy_location="Disabled")
    options = deployment_options(config)
    if config.routing == "task_affinity":
        from ray.serve.config import RequestRouterConfig

        from core.serving.ray.routing import TaskAffinityRouter

        options["request_router_config"] = RequestRouterConfig(
            request_router_class=TaskAffinityRouter,  # type: ignore[arg-type]  # upstream's **kwargs: dict[str, Any]
            request_router_kwargs={"max_imbalance": config.max_imbalance},
        )
    deployment = serve.deployment(name="FlamingoReplica")(FlamingoReplica).options(**options)
    settings_json = settings.model_dump_json(exclude={"discord_token"})
    return serve.run(deployment.bind(settings_json), name=config.app_name, route_prefix=None)


class RayInferenceService:
    """Same calls as ``core.serving.local.InferenceService``; the model runs on the cluster's replicas.

    A watcher probes the cluster's address. When it stops answering, waiting requests end at once
    and new ones are refused, each with one clear line; when it answers again, the bot joins the
    cluster anew and redeploys. Ray's driver would otherwise exit a minute into the outage.
    """

    def __init__(
        self, settings: Settings, rules: dict[str | None, PromptRules], handle: DeploymentHandle[FlamingoReplica]
    ) -> None:
        self.settings = settings
        self.rules = rules[None]
        self._rules = rules
        self._handle = handle
        self._wire = WireEncoder()
        self.in_flight = 0  # encoding, in line, or at a replica
        # Serve's own queue is first come, first served and unbounded: the bot sends no more than the
        # replicas take at once, and keeps the rest in a line fair between servers.
        self.line: FairLine[RemoteTicket] = FairLine(settings.service.max_queue)
        # Background requests (task evaluations): one at a time on the cluster, in the place each
        # replica keeps for one (``deployment_options``), sent only while no member's request waits.
        self.background_line: FairLine[RemoteTicket] = FairLine(BACKGROUND_QUEUE)
        self._background_sent = False
        ray = settings.ray
        self._room = ray.max_ongoing_requests * (ray.max_replicas or ray.replicas)
        self._sent = 0
        self.times = RecentTimes()
        self._closed = False
        self.reachable = True
        self._losses: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self._losses_lock = threading.Lock()  # the watcher thread reads what callers' loops change
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="ray-cluster-watch", daemon=True)
        self._watcher.start()

    @classmethod
    def connect(cls, settings: Settings) -> RayInferenceService:
        """Join the cluster, deploy (or find) the application, and load the tokenizers for local checks."""
        _no_usage_stats()
        # Keep the driver alive through an outage of the cluster, so that it can rejoin afterwards.
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(10**9))
        _check_reachable(settings.ray.address)
        rules: dict[str | None, PromptRules] = {None: PromptRules(*load_text_side(settings.model), settings)}
        for model in ModelCatalog.from_settings(settings).offered()[1:]:
            chosen = settings.model.chosen(model)
            rules[model] = PromptRules(*load_text_side(chosen), settings)
        _join(settings.ray)
        return cls(settings, rules, _deploy(settings))

    @property
    def waiting(self) -> int:
        return self.in_flight

    def replica_status(self) -> list[dict]:
        """Every replica's ``FlamingoReplica.status`` (blocking: call it from a thread)."""
        if not self.reachable:
            return []
        return self._handle.broadcast("status").results()

    def cache_status(self) -> list[dict[str, dict[str, int]]]:
        return [replica["caches"] for replica in self.replica_status()]

    def status(self) -> ServiceStatus:
        ray = self.settings.ray
        cluster = f"{ray.replicas} replica(s) of {ray.app_name} at {ray.address}"
        return ServiceStatus(self.settings.model.shown_name, self.waiting, self.reachable, cluster=cluster)

    def rules_for(self, model: str | None) -> PromptRules:
        """The rules of the model that answers (None: the default), from its own tokenizer."""
        rules = self._rules.get(model)
        if rules is None:
            raise BadParameter("This bot does not offer that model; a server admin can choose another in /settings.")
        return rules

    def estimated_wait(self, position: int) -> float:
        """Seconds until a request at ``position`` in the bot's line is sent: a place at the replicas
        frees as an answer ends, so about one typical answer per ``room`` requests ahead (0 before any)."""
        typical = self.times.typical()
        return 0.0 if typical is None else math.ceil(position / self._room) * typical.answering

    def line_status(self) -> LineStatus:
        """This bot process's line; the replicas' own queues (other processes' requests) are not seen."""
        return LineStatus(len(self.line), self._sent, self.times.typical())

    def submit(
        self,
        images: Sequence[Image.Image],
        prompt: str,
        task: Task,
        params: GenerationParams,
        deadline: float | None = None,
        model: str | None = None,
        party: Party = None,
        background: bool = False,
    ) -> RemoteTicket:
        """Checked here, queued fairly between servers (``party``) on the replica it reaches;
        ``background`` as ``InferenceService.submit`` has it, run there as such."""
        if self._closed:
            raise ServiceClosed("The bot is shutting down; try again in a moment.")
        if not self.reachable:
            raise ClusterUnavailable(_CLUSTER_LOST)
        rules = self.rules_for(model)
        if background and (params.num_beams > 1 or params.do_sample):
            raise BadParameter("A background request is greedy: it may be stopped and run again from its start.")
        rules.check_text(prompt, len(images))
        line = self.background_line if background else self.line
        line.check_room(party)
        cost = decode_steps(generation_kwargs(params, self.settings.generation), len(images))
        encode = functools.partial(self._wire.request, list(images), prompt, task, params, background)
        ticket = RemoteTicket(self, encode, deadline, model, party, cost, params.num_beams == 1, background)
        # Its place is taken now, in the order requests arrive; its images are encoded while it waits.
        if background:
            line.add(ticket, party, cost)
            ticket.turn = asyncio.get_running_loop().create_future()
            self._send_background()
        elif self._sent < self._room and not self.line:
            self._sent += 1
            ticket.holds_room = True
        else:
            self.line.add(ticket, party, cost)
            ticket.turn = asyncio.get_running_loop().create_future()
        return ticket

    def line_of(self, ticket: RemoteTicket) -> FairLine[RemoteTicket]:
        return self.background_line if ticket.background else self.line

    def leave(self, ticket: RemoteTicket) -> None:
        """The ticket is answered or given up: out of the line, or its place at a replica to the next in line."""
        if self.line_of(ticket).remove(ticket) or not ticket.holds_room:
            return
        ticket.holds_room = False
        if ticket.background:
            self._background_sent = False
        else:
            self._sent -= 1
            while self._sent < self._room and self.line:
                [turn] = self.line.take(1)
                self._start(turn)
                self._sent += 1
        self._send_background()

    def _send_background(self) -> None:
        """The next background request goes to the cluster while no member's request waits and none runs."""
        if self.background_line and not self.line and not self._background_sent:
            [turn] = self.background_line.take(1)
            self._start(turn)
            self._background_sent = True

    @staticmethod
    def _start(ticket: RemoteTicket) -> None:
        assert ticket.turn is not None
        ticket.holds_room = True
        if not ticket.turn.done():
            ticket.turn.set_result(None)

    def _handle_for(self, model: str | None) -> DeploymentHandle[FlamingoReplica]:
        """Serve's multiplexing prefers a replica that holds ``model`` (None: the default)."""
        return self._handle if model is None else self._handle.options(multiplexed_model_id=model)

    def send(self, request: WireRequest, model: str | None = None) -> SentRequest:
        return self._handle_for(model).answer.remote(request)

    def send_streamed(self, request: WireRequest, model: str | None = None) -> StreamedRequest:
        """As ``send``, to a replica that streams the answer's text as it is written."""
        streamed = self._handle_for(model).options(stream=True).answer_stream.remote(request)
        return cast(StreamedRequest, streamed)  # Serve types the remote call's result for either option

    async def unless_lost(self, response: Awaitable[Answer], timeout: float | None) -> Answer:
        """Await a replica's answer, ending at once with ``ClusterUnavailable`` if the cluster goes."""
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()
        entry = (loop, lost)
        with self._losses_lock:
            self._losses.add(entry)
        if not self.reachable:  # lost before it was registered: no watcher will say so again
            lost.set_result(None)
        answer = asyncio.ensure_future(response)
        either: set[asyncio.Future[Any]] = {answer, lost}
        try:
            done, _ = await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            with self._losses_lock:
                self._losses.discard(entry)
            lost.cancel()
        if answer in done:
            return answer.result()
        answer.cancel()
        answer.add_done_callback(_retrieve)  # Serve ends a cancelled wait with its own error, expected here
        if lost in done:
            raise ClusterUnavailable(_CLUSTER_LOST)
        raise TimeoutError

    async def answer(self, images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams) -> Answer:
        return await self.submit(images, prompt, task, params).answer()

    def _watch(self) -> None:
        period = self.settings.ray.probe_seconds
        while not self._stop.wait(period):
            try:
                _check_reachable(self.settings.ray.address, timeout=period)
            except ModelLoadError as error:
                if self.reachable:
                    self._lose(str(error))
                continue
            if not self.reachable:
                self._rejoin()

    def _lose(self, why: str) -> None:
        log.error("%s; requests are refused until it is back", why)
        self.reachable = False
        with self._losses_lock:
            waiting = list(self._losses)
        for loop, lost in waiting:
            loop.call_soon_threadsafe(_settle, lost)

    def _rejoin(self) -> None:
        """The cluster answers again (a restarted head is a new cluster): join it and deploy anew."""
        import ray

        log.info("the Ray cluster at %s answers again; rejoining it", self.settings.ray.address)
        try:
            ray.shutdown()
            _join(self.settings.ray)
            self._handle = _deploy(self.settings)
        except Exception:  # the head may still be starting; the next probe tries again
            log.warning("rejoining the Ray cluster failed; trying again", exc_info=True)
            return
        self.reachable = True
        log.info("rejoined the Ray cluster; answering again")

    def close(self) -> None:
        """Refuse new requests, let those in flight be answered (for a while), then leave the cluster;
        the application keeps serving other bot processes (shards) that use it."""
        self._closed = True
        give_up = time.monotonic() + CLOSE_WAIT_SECONDS
        while self.in_flight and self.reachable and time.monotonic() < give_up:
            time.sleep(0.05)
        self._stop.set()
        # A rejoin under way would join the cluster again after the shutdown below (seen under load:
        # the process stayed connected to a cluster it had left).
        self._watcher.join(timeout=CLOSE_WAIT_SECONDS)
        import ray

        ray.shutdown()
