"""A task's evaluation from the bot: one per server, charged to its quota, in the model's background, cancellable."""

from __future__ import annotations

import asyncio
import dataclasses
import types
from collections.abc import Callable

import pytest

from core.asking import Asking
from core.config import QuotaSettings, Settings
from core.errors import BadParameter, GenerationFailed, NotAllowedHere, RequestCancelled, RequestExpired
from core.evaluation.jobs import EvaluationJob, EvaluationRunning, TaskEvaluations
from core.evaluation.leave_one_out import CannotEvaluate
from core.model.engine import Answer
from core.moderation import WordListFilter
from core.prompts import Task
from core.quotas import RequestQuotas, TooManyRequests
from core.serving.metrics import Metrics
from core.serving.model_choice import ModelCatalog
from core.tasks.library import TaskLibrary

GUILD, OTHER_GUILD, MODERATOR = 5, 6, 9
MODELS = ModelCatalog(default="tiny", choices=("tiny",), weight_bytes={}, budget_bytes=0, on_replicas=False)


class _Ticket:
    """A request the test answers, or fails, when it likes."""

    def __init__(self, prompt: str, asked: dict) -> None:
        self.prompt, self.asked = prompt, asked
        self.future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.withdrawn = False

    def cancel(self) -> None:
        self.withdrawn = True

    async def answer(self) -> Answer:
        return await self.future

    def answer_with(self, text: str) -> None:
        self.future.set_result(Answer(text, (1,), self.prompt, 1, True, 0.01))


class _Line:
    """A model service whose answers the test gives, with the rules' token count stood in."""

    rules = types.SimpleNamespace(count_tokens=lambda text: len(text.split()))

    def __init__(self) -> None:
        self.tickets: list[_Ticket] = []
        self.room: list[int] = []  # each request's new tokens

    def rules_for(self, model: str | None) -> object:
        """Another model's tokenizer (here: "wide", which reads each character as a token) counts otherwise."""
        return self.rules if model is None else types.SimpleNamespace(count_tokens=len)

    def submit(self, images, prompt, task, params, deadline=None, model=None, party=None, background=False):
        self.tickets.append(_Ticket(prompt, {"model": model, "party": party, "background": background}))
        self.room.append(params.max_new_tokens)
        return self.tickets[-1]

    async def asked(self, count: int) -> _Ticket:
        """The ``count``-th request, once it is submitted."""
        async with asyncio.timeout(10):
            while len(self.tickets) < count:
                await asyncio.sleep(0)
        return self.tickets[count - 1]


class _Front:
    def __init__(self) -> None:
        self.deadline = None
        self.shown: list[tuple[int, int]] = []  # (answered, total) when the job was let in
        self.job: EvaluationJob | None = None

    async def started(self, job: EvaluationJob) -> None:
        self.shown.append((job.answered, job.total))
        self.job = job


@pytest.fixture
def tasks(builtin_tasks) -> dict[str, Task]:
    vqa = builtin_tasks["vqa"]
    return builtin_tasks | {
        "single": dataclasses.replace(vqa, name="single", examples=vqa.examples[:1]),
        "pets": dataclasses.replace(vqa, name="pets", prompt_template="<image>Pet:"),  # no example holds "Pet:"
    }


@pytest.fixture
def make_evaluations(store, tasks) -> Callable[..., TaskEvaluations]:
    def make(
        service: object, per_period: int = 100, rules: object = None, models: ModelCatalog = MODELS
    ) -> TaskEvaluations:
        settings = Settings(quotas=QuotaSettings(user_cooldown_seconds=0, guild_per_period=per_period))
        library = TaskLibrary(store, tasks, rules=rules or service.rules, settings=settings)
        quotas = RequestQuotas(settings.quotas)
        return TaskEvaluations(Asking(settings, store, library, quotas, models, service, Metrics(), WordListFilter([])))

    return make


def started(evaluations: TaskEvaluations, front: _Front, task: str = "vqa", guild: int = GUILD, job_id: int = 1):
    return asyncio.ensure_future(evaluations.evaluate(job_id, guild, MODERATOR, task, None, front))


async def test_each_example_is_answered_by_the_model_in_the_background_of_the_server(
    make_evaluations, make_service, llama_engine
) -> None:
    service = make_service(llama_engine)
    submitted: list[dict] = []
    submit = service.submit

    def recording(*args, **kwargs):
        submitted.append(kwargs)
        return submit(*args, **kwargs)

    service.submit = recording
    evaluations = make_evaluations(service)
    front = _Front()
    result = await evaluations.evaluate(1, GUILD, MODERATOR, "vqa", "tiny", front)
    assert front.shown == [(0, 4)]  # shown before any example was asked
    assert result.stopped is None and not result.cancelled and (result.model, result.total) == ("tiny", 4)
    assert [score.position for score in result.evaluation.examples] == [1, 2, 3, 4]
    assert [score.expected for score in result.evaluation.examples] == ["camera", "spoon", "cat", "no"]
    assert submitted == [{"background": True}] * 4
    assert evaluations.asking.quotas.left(GUILD, MODERATOR).used == 4
    assert evaluations.running(GUILD) is None


async def test_a_server_runs_one_evaluation_at_a_time(make_evaluations) -> None:
    line = _Line()
    evaluations = make_evaluations(line)
    first = started(evaluations, _Front())
    ticket = await line.asked(1)
    assert ticket.asked == {"model": None, "party": GUILD, "background": True}
    with pytest.raises(
        EvaluationRunning, match=rf"^<@{MODERATOR}> is already evaluating task “vqa” on this server"
    ) as running:
        await evaluations.evaluate(2, GUILD, 10, "caption", None, _Front())
    assert running.value.job_id == 1  # the one under way, for a front end to offer its cancel
    other = started(evaluations, _Front(), guild=OTHER_GUILD, job_id=3)  # another server's is its own
    await line.asked(2)
    for count in range(1, 9):
        (await line.asked(count)).answer_with("yes")
    assert (await first).stopped is None and (await other).stopped is None
    assert evaluations.running(GUILD) is None  # free again


async def test_the_examples_are_charged_to_the_servers_quota_and_a_refusal_costs_nothing(make_evaluations) -> None:
    line = _Line()
    evaluations = make_evaluations(line, per_period=6)
    running = started(evaluations, _Front())
    for count in range(1, 5):
        (await line.asked(count)).answer_with("no")
    await running
    assert evaluations.asking.quotas.left(GUILD, MODERATOR).used == 4
    with pytest.raises(TooManyRequests, match=r"^That needs 4 requests, and this server has used 4 of its 6 for now"):
        await evaluations.evaluate(2, GUILD, MODERATOR, "vqa", None, _Front())
    assert evaluations.asking.quotas.left(GUILD, MODERATOR).used == 4 and len(line.tickets) == 4
    quotas = evaluations.asking.quotas
    with quotas.admit(GUILD, 11), quotas.admit(GUILD, 12):  # members' two are left
        pass


async def test_each_answers_room_is_counted_by_the_model_that_answers(make_evaluations) -> None:
    """The expected answer's tokens and a margin of 8: another model's in its own tokenizer, or a
    right answer it tokenises longer would be cut short and scored wrong."""
    models = ModelCatalog("tiny", ("tiny", "wide"), {"wide": 1}, budget_bytes=2, on_replicas=True)
    for model, room in ((None, [9, 9, 9, 9]), ("wide", [14, 13, 11, 10])):  # camera, spoon, cat, no
        line = _Line()
        running = asyncio.ensure_future(
            make_evaluations(line, models=models).evaluate(1, GUILD, MODERATOR, "vqa", model, _Front())
        )
        for count in range(1, 5):
            (await line.asked(count)).answer_with("no")
        await running
        assert line.room == room
        assert {ticket.asked["model"] for ticket in line.tickets} == {model}


@pytest.mark.parametrize(
    ("task", "model", "refusal", "match"),
    [
        ("single", None, CannotEvaluate, "has 1 example; leaving one out needs at least 2"),
        ("pets", None, CannotEvaluate, "No example of task “pets” can be split"),
        ("vqa", "huge", BadParameter, "There is no model called “huge” here"),
    ],
)
async def test_a_task_or_model_that_cannot_be_evaluated_is_refused_for_nothing(
    make_evaluations, task, model, refusal, match
) -> None:
    line = _Line()
    evaluations = make_evaluations(line)
    with pytest.raises(refusal, match=match):
        await evaluations.evaluate(1, GUILD, MODERATOR, task, model, _Front())
    assert evaluations.asking.quotas.left(GUILD, MODERATOR).used == 0 and not line.tickets
    assert evaluations.running(GUILD) is None


async def test_a_cancel_withdraws_the_request_under_way_and_scores_what_was_answered(make_evaluations) -> None:
    line = _Line()
    evaluations = make_evaluations(line)
    front = _Front()
    running = started(evaluations, front, job_id=77)
    (await line.asked(1)).answer_with("camera")
    (await line.asked(2)).answer_with("a fork")
    third = await line.asked(3)
    assert front.job is not None and front.job.answered == 2  # what the progress shows
    with pytest.raises(NotAllowedHere, match=r"^Only the member who started this evaluation, or one with Manage"):
        evaluations.cancel(GUILD, 77, 12, manages_server=False)
    with pytest.raises(RequestCancelled, match=r"^That evaluation is no longer running"):
        evaluations.cancel(GUILD, 76, MODERATOR, manages_server=False)  # an older message's button
    evaluations.cancel(GUILD, 77, 12, manages_server=True)
    result = await running
    assert third.withdrawn and len(line.tickets) == 3
    assert result.cancelled and result.stopped == "Cancelled by <@12>."
    assert [(s.position, s.exact_match) for s in result.evaluation.examples] == [(1, 1.0), (2, 0.0)]
    assert result.total == 4 and result.evaluation.exact_match == 0.5
    assert evaluations.asking.quotas.left(GUILD, MODERATOR).used == 2  # the examples not answered are given back
    assert evaluations.running(GUILD) is None


async def test_a_cancel_while_the_evaluation_is_shown_stops_it_before_any_request(make_evaluations) -> None:
    line = _Line()
    evaluations = make_evaluations(line)

    class Cancelling(_Front):
        async def started(self, job: EvaluationJob) -> None:
            evaluations.cancel(job.guild_id, job.id, job.user_id, manages_server=False)

    result = await evaluations.evaluate(1, GUILD, MODERATOR, "vqa", None, Cancelling())
    assert result.cancelled and not result.evaluation.examples and not line.tickets
    assert evaluations.asking.quotas.left(GUILD, MODERATOR).used == 0


@pytest.mark.parametrize(
    ("error", "stopped"),
    [
        (GenerationFailed("The model failed while answering."), "The model failed while answering."),
        (RequestExpired("Your request waited too long in the queue; please ask again."), "Its time ran out, with"),
    ],
)
async def test_a_failing_or_late_model_ends_the_evaluation_with_what_it_answered(make_evaluations, error, stopped):
    line = _Line()
    evaluations = make_evaluations(line)
    running = started(evaluations, _Front())
    (await line.asked(1)).answer_with("camera")
    (await line.asked(2)).future.set_exception(error)
    result = await running
    assert not result.cancelled and result.stopped is not None and result.stopped.startswith(stopped)
    assert len(result.evaluation.examples) == 1 and len(line.tickets) == 2
    assert evaluations.asking.quotas.left(GUILD, MODERATOR).used == 1
