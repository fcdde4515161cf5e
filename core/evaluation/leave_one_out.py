"""Leave-one-out evaluation of a task: each example answered with the others as its context.

A task's examples are its only labelled data, so each in turn is held out: the model reads the
other examples, then the held-out image with the part of its text before the answer, and what it
writes is scored against the example's own answer. The way to answer is a parameter, so that the
command line can use a model of its own and the bot its model service (as low-priority work);
cancelling the awaiting task stops the evaluation, and the request under way with it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from PIL import Image

from core.errors import FlamingoError
from core.evaluation.scoring import exact_match, token_f1
from core.generation import GenerationParams, Limits
from core.prompts import IMAGE_TOKEN, Example, Task
from core.wording import plural

if TYPE_CHECKING:  # the engine imports torch, which refusals should not wait for
    from core.model.engine import Answer

Answerer = Callable[[Sequence[Image.Image], str, Task, GenerationParams], Awaitable["Answer"]]
# Tokens allowed beyond the expected answer's own: see ``answer_budget``.
_MARGIN = 8


class CannotEvaluate(FlamingoError):
    """A task that cannot be evaluated leave-one-out; the message says why."""


class CannotSplit(FlamingoError):
    """An example whose answer cannot be told apart from its prompt; the message says why."""


@dataclass(frozen=True)
class Split:
    prompt: str  # the example's text up to its answer, with its ``<image>``
    expected: str


@dataclass(frozen=True)
class Case:
    """One example held out: its position (from 1), the example (a stored task's image is decoded only
    when it is answered), its split, and the task without it."""

    position: int
    example: Example
    split: Split
    task: Task


@dataclass(frozen=True)
class Unsplit:
    """An example left out of the scores because its answer cannot be found."""

    position: int
    text: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """What an evaluation will answer, known before any model is asked."""

    task: Task
    cases: tuple[Case, ...]
    unsplit: tuple[Unsplit, ...]


@dataclass(frozen=True)
class ExampleScore:
    """One held-out example's expected and given answers, and how they compare."""

    position: int
    expected: str
    answered: str
    exact_match: float
    f1: float


@dataclass(frozen=True)
class Evaluation:
    """The scores, each the mean over the scored examples, and the seconds the answers took."""

    task: str
    examples: tuple[ExampleScore, ...]
    unsplit: tuple[Unsplit, ...]
    seconds: float

    @property
    def exact_match(self) -> float:
        return sum(score.exact_match for score in self.examples) / len(self.examples)

    @property
    def f1(self) -> float:
        return sum(score.f1 for score in self.examples) / len(self.examples)


def _endings(template: str) -> list[str]:
    """The template and each of its endings that begins a word, longest first."""
    starts = [0, *(space.end() for space in re.finditer(r"\s+", template))]
    return [template[start:] for start in starts if template[start:]]


def split_example(text: str, template: str) -> Split:
    """Where the answer begins: after the longest ending of the template (whole words) that the text
    holds after its ``<image>``, so that an example beginning with the template is scored on the rest,
    and one that asks its own question ("<image>Question:Is it day? Short answer:no" for the template
    "<image>Question:What is in the picture? Short answer:") on what follows the words it shares with
    the template's end. Raises ``CannotSplit`` rather than guess."""
    for ending in _endings(template.strip()):
        found = text.rfind(ending)
        end = found + len(ending)
        if found < 0 or IMAGE_TOKEN not in text[:end]:
            continue
        prompt, expected = text[:end], text[end:].strip()
        if not expected:
            raise CannotSplit(f"nothing follows “{ending}”, the end of the template")
        return Split(prompt, expected)
    raise CannotSplit(f"no ending of the template “{template}” follows its {IMAGE_TOKEN}")


def plan(task: Task) -> Plan:
    """Each example held out in turn, each with its own cache key derived from the task's, so that
    evaluating the same task again reuses the prefixes computed before. Raises ``CannotEvaluate``
    for a task with fewer than two examples or none that can be split."""
    if len(task.examples) < 2:
        raise CannotEvaluate(
            f"Task “{task.name}” has {plural(len(task.examples), 'example')}; leaving one out needs at least 2."
        )
    cases: list[Case] = []
    unsplit: list[Unsplit] = []
    for position, example in enumerate(task.examples, start=1):
        try:
            split = split_example(example.text, task.prompt_template)
        except CannotSplit as reason:
            unsplit.append(Unsplit(position, example.text, str(reason)))
            continue
        others = task.examples[: position - 1] + task.examples[position:]
        key = None if task.key is None else f"{task.key}/without/{position}"
        cases.append(Case(position, example, split, replace(task, examples=others, key=key)))
    if not cases:
        raise CannotEvaluate(f"No example of task “{task.name}” can be split into a prompt and an answer.")
    return Plan(task, tuple(cases), tuple(unsplit))


def answer_budget(expected: str, count_tokens: Callable[[str], int], limits: Limits) -> int:
    """The new tokens allowed for an answer: the expected answer's count and a margin, at most the
    longest allowed. A right answer then has room to be written whole, even tokenised differently
    and followed by its end of chunk; one that rambles past that could not match anyway, and is cut
    short to save time (its F1 reads only what it said first)."""
    longest = int(limits.ranges["max_new_tokens"].high)
    return min(count_tokens(expected) + _MARGIN, longest)


async def evaluate(
    planned: Plan,
    answer: Answerer,
    count_tokens: Callable[[str], int],
    limits: Limits,
    progress: Callable[[ExampleScore], None] | None = None,
) -> Evaluation:
    """Answer each held-out example greedily and score it; ``progress`` hears of each score as it
    comes. Greedy: the model's likeliest answer is the one to judge it by, and it is the same every
    time, so that two models (or two runs) compare fairly. One after another: an evaluation in the
    bot's background holds one place in the model's line at a time, not a batch's worth."""
    started = time.perf_counter()
    scores = []
    for case in planned.cases:
        params = GenerationParams(max_new_tokens=answer_budget(case.split.expected, count_tokens, limits))
        answered = (await answer([case.example.image], case.split.prompt, case.task, params)).text
        expected = case.split.expected
        score = ExampleScore(
            case.position, expected, answered, exact_match(answered, expected), token_f1(answered, expected)
        )
        scores.append(score)
        if progress is not None:
            progress(score)
    return Evaluation(planned.task.name, tuple(scores), planned.unsplit, time.perf_counter() - started)
