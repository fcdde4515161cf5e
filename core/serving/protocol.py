"""What the bot asks of a model service, wherever the model runs: in this process or on Ray replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from core.generation import GenerationParams
from core.model.engine import Answer, EngineStatus, PromptRules
from core.prompts import Task
from core.serving.fair_line import Party
from core.serving.line_times import TypicalTimes


@dataclass(frozen=True)
class ServiceStatus:
    """The model service as the owner's status shows it, whichever backend serves it."""

    model: str
    waiting: int  # queued in this process; on a cluster, in flight
    reachable: bool
    engine: EngineStatus | None = None  # in this process
    cluster: str | None = None  # on Ray: how many replicas of which application, where


@dataclass(frozen=True)
class LineStatus:
    """The model's line as ``/queue`` shows it to members, whichever backend serves it: members' requests
    only, as background ones (task evaluations) run beside them and never hold them back."""

    waiting: int  # in the bot's line for the model
    running: int  # taken from it: being answered
    typical: TypicalTimes | None  # of the recent answers; None when none came lately


class QueuedRequest(Protocol):
    """What a caller holds for a queued request, wherever the model runs."""

    @property
    def position(self) -> int | None: ...

    def cancel(self) -> None: ...

    async def answer(self) -> Answer: ...

    def partial_texts(self) -> AsyncIterator[str]:
        """The answer's text so far while it is decoded, up to its last complete word, the latest
        each time it is read (a prefix of the answer's text). It ends when the answer is ready or
        the request is cancelled, or at once where the backend cannot stream; it raises any other
        error ``answer`` raises."""
        ...


class ModelService(Protocol):
    """The model as the bot uses it: in this process (``InferenceService``) or on Ray replicas."""

    @property
    def rules(self) -> PromptRules: ...

    def rules_for(self, model: str | None) -> PromptRules:
        """The rules of the model that answers (None: the default): another model counts tokens with
        its own tokenizer. Raises ``BadParameter`` for a model the service cannot run."""
        ...

    @property
    def waiting(self) -> int: ...

    @property
    def reachable(self) -> bool:
        """False while the model cannot be reached (a lost cluster); requests are refused meanwhile."""
        ...

    def estimated_wait(self, position: int) -> float: ...

    def cache_status(self) -> list[dict[str, dict[str, int]]]: ...

    def status(self) -> ServiceStatus:
        """What ``/admin status`` shows of the model."""
        ...

    def line_status(self) -> LineStatus:
        """What ``/queue`` shows of the line: its length and how long answers take lately."""
        ...

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
    ) -> QueuedRequest:
        """Queue a request, or refuse it at once (busy, closed, a model not offered). ``party``: the
        server asking (None: direct messages, one group), whose fair share of the line it takes.
        ``background``: a job's greedy request (a task's evaluation), queued apart from members' line
        (fair between parties, bounded on its own, not in ``waiting`` or ``line_status``) and run only
        where it holds no member's request back by more than a decode step or its own prefill."""
        ...

    async def answer(
        self, images: Sequence[Image.Image], prompt: str, task: Task, params: GenerationParams
    ) -> Answer: ...

    def close(self) -> None: ...
