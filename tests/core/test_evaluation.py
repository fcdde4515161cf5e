"""Leave-one-out evaluation: the scores, where an example's answer begins, and runs on the tiny models."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import torch

from core.config import GenerationSettings
from core.evaluation.leave_one_out import (
    CannotEvaluate,
    CannotSplit,
    ExampleScore,
    Split,
    answer_budget,
    evaluate,
    plan,
    split_example,
)
from core.evaluation.scoring import exact_match, normalize_answer, token_f1
from core.generation import GenerationParams, Range
from core.model.engine import Answer, FlamingoEngine
from core.model.loading import load_model
from core.prompts import Example, Task
from tests.helpers.settings import tiny_settings

pytestmark = pytest.mark.evaluate

CAPTION = "<image>Output:"
VQA = "<image>Question:What is in the picture? Short answer:"


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Two dogs.", "2 dogs"),  # number words as digits, the final period gone
        ("The cat, sitting!", "cat sitting"),  # articles gone; a comma before a space vanishes
        ("black-and-white", "black and white"),  # a mark inside a word becomes a space
        ("3.5 metres", "3.5 metres"),  # a period before a digit stays
        ("1,000 people", "1000 people"),  # a thousands comma: every mark of the text vanishes
        ("Dont  KNOW\n", "don't know"),  # lowercase, one space, the contraction's apostrophe back
        ("couldntve", "couldn't've"),
        ("its tail", "its tail"),  # a word, not a contraction
        ("An apple and a pear", "apple and pear"),
        ("none", "0"),
    ],
)
def test_answers_are_normalised_as_the_vqa_evaluation_does(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_ignores_only_what_normalisation_removes():
    assert exact_match("Two cats.", "2 cats") == 1.0
    assert exact_match("two cats", "three cats") == 0.0


@pytest.mark.parametrize(
    ("answered", "expected", "f1"),
    [
        ("A red cup on a table", "red cup of espresso", 0.5),  # 2 of 4 words each way
        ("cat", "A cat.", 1.0),
        ("cat cat dog", "cat", 0.5),  # precision 1/3, recall 1: 2 * (1/3) / (4/3)
        ("dog", "cat", 0.0),
        ("", "cat", 0.0),
        ("the", "a", 1.0),  # both without words
    ],
)
def test_token_f1_counts_shared_normalised_words(answered, expected, f1):
    assert token_f1(answered, expected) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("text", "template", "split"),
    [
        (CAPTION + "A cat.", CAPTION, Split(CAPTION, "A cat.")),
        (
            "<image>Question:What is the man looking through? Short answer:camera",
            VQA,
            Split("<image>Question:What is the man looking through? Short answer:", "camera"),
        ),
        ("<image>Question:Is it dark? answer: no", VQA, Split("<image>Question:Is it dark? answer:", "no")),
    ],
    ids=["begins-with-the-template", "shares-its-end", "shares-its-last-word"],
)
def test_an_answer_begins_after_the_longest_ending_of_the_template(text, template, split):
    assert split_example(text, template) == split


@pytest.mark.parametrize(
    ("text", "template", "reason"),
    [
        ("<image>A cat.", CAPTION, "no ending of the template “<image>Output:” follows its <image>"),
        (CAPTION + "  ", CAPTION, "nothing follows “<image>Output:”, the end of the template"),
        ("Short answer:<image>cat", VQA, "no ending of the template"),
    ],
    ids=["no-ending", "no-answer", "ending-before-the-image"],
)
def test_an_example_that_cannot_be_split_says_why(text, template, reason):
    with pytest.raises(CannotSplit, match=reason):
        split_example(text, template)


def test_each_held_out_example_gets_its_own_cache_key_and_the_others_as_context(photos):
    examples = tuple(Example(photos[name], CAPTION + f"A {name}.") for name in ("chelsea", "coffee", "rocket"))
    unsplittable = Example(photos["camera"], "<image>A camera.")
    task = Task("t", "", CAPTION, (*examples[:2], unsplittable, examples[2]), key="builtin/t")
    planned = plan(task)
    assert [case.position for case in planned.cases] == [1, 2, 4]
    assert [case.task.key for case in planned.cases] == [
        "builtin/t/without/1",
        "builtin/t/without/2",
        "builtin/t/without/4",
    ]
    assert planned.cases[2].task.examples == (*examples[:2], unsplittable)
    assert planned.cases[2].example is examples[2]
    assert planned.cases[2].split == Split(CAPTION, "A rocket.")
    assert [(left.position, left.text) for left in planned.unsplit] == [(3, "<image>A camera.")]
    uncached = plan(Task("t", "", CAPTION, examples))
    assert {case.task.key for case in uncached.cases} == {None}


def test_a_task_needs_two_examples_and_one_that_splits(photos):
    with pytest.raises(CannotEvaluate, match="has 1 example; leaving one out needs at least 2"):
        plan(Task("one", "", CAPTION, (Example(photos["chelsea"], CAPTION + "A cat."),)))
    cannot = tuple(Example(photos[name], "<image>" + name) for name in ("chelsea", "coffee"))
    with pytest.raises(CannotEvaluate, match="No example of task “none” can be split"):
        plan(Task("none", "", CAPTION, cannot))


def test_an_answer_may_run_a_margin_past_the_expected_but_never_past_the_allowed_range():
    words = len  # one token per character, for the sums
    assert answer_budget("a cat", words, GenerationSettings()) == 5 + 8
    narrow = GenerationSettings(max_new_tokens_default=10, ranges={"max_new_tokens": Range(low=1, high=10)})
    assert answer_budget("a cat", words, narrow) == 10


def _scripted(answers: dict[str, str], asked: list[tuple[str, GenerationParams]], gate: asyncio.Event | None = None):
    async def answer(images: Sequence[object], prompt: str, task: Task, params: GenerationParams) -> Answer:
        asked.append((prompt, params))
        if gate is not None and len(asked) > 1:
            await gate.wait()
        text = answers[prompt]
        return Answer(text, (), prompt, 0, finished=True, seconds=0.0)

    return answer


async def test_scores_come_per_example_and_overall_with_progress_after_each(photos):
    texts = ("<image>Question:What animal? Short answer:a cat", "<image>Question:What colour? Short answer:red cup")
    task = Task("vqa", "", VQA, tuple(Example(photos["chelsea"], text) for text in texts))
    answers = {
        "<image>Question:What animal? Short answer:": "Cat.",
        "<image>Question:What colour? Short answer:": "red",
    }
    asked: list[tuple[str, GenerationParams]] = []
    heard: list[ExampleScore] = []
    result = await evaluate(plan(task), _scripted(answers, asked), len, GenerationSettings(), heard.append)
    assert heard == list(result.examples)
    assert [(s.expected, s.answered, s.exact_match, s.f1) for s in result.examples] == [
        ("a cat", "Cat.", 1.0, 1.0),
        ("red cup", "red", 0.0, pytest.approx(2 / 3)),
    ]
    assert result.exact_match == 0.5 and result.f1 == pytest.approx(5 / 6)
    assert result.seconds >= 0 and result.task == "vqa"
    # Greedy, and long enough for the expected answer and a margin.
    assert [params for _, params in asked] == [
        GenerationParams(max_new_tokens=5 + 8),
        GenerationParams(max_new_tokens=7 + 8),
    ]


async def test_cancelling_stops_the_evaluation_at_the_request_under_way(photos):
    task = Task("t", "", CAPTION, tuple(Example(photos["chelsea"], CAPTION + f"A cat {n}.") for n in range(3)))
    asked: list[tuple[str, GenerationParams]] = []
    heard: list[ExampleScore] = []
    running = asyncio.create_task(
        evaluate(
            plan(task), _scripted({CAPTION: "A cat."}, asked, asyncio.Event()), len, GenerationSettings(), heard.append
        )
    )
    while len(asked) < 2:
        await asyncio.sleep(0)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert len(asked) == 2 and len(heard) == 1


@pytest.fixture(scope="module")
def stopping_engine(model_dirs, photos):
    """The tiny llama model made to end its answers, as a trained one does: each stop token's output
    row becomes (just above) that of a token it would write for one of two photos, once the answer
    has begun, so its answers there are short and finished. A random model never ends by itself."""
    settings = tiny_settings(model_dirs["llama"])
    engine = FlamingoEngine(load_model(settings.model), settings)
    loaded = engine.loaded
    rows = loaded.model.lang_encoder.get_output_embeddings().weight
    placeholder = _examples(photos, ["x", "y"])
    written = [_answer_alone(engine, photos, placeholder, held_out, 16).token_ids for held_out in range(2)]
    second = [next(token for token in tokens if token != tokens[0]) for tokens in written]
    with torch.no_grad():
        for stop, token in zip((loaded.model.eoc_token_id, loaded.tokenizer.eos_token_id), second, strict=True):
            rows[stop] = rows[token] * 1.01
    return engine


_PHOTOS = ("astronaut", "rocket")


def _examples(photos, answers: list[str]) -> tuple[Example, ...]:
    return tuple(Example(photos[name], CAPTION + answer) for name, answer in zip(_PHOTOS, answers, strict=True))


def _answer_alone(engine: FlamingoEngine, photos, examples: tuple[Example, ...], held_out: int, tokens: int) -> Answer:
    """The held-out example's answer computed here, apart from the evaluation's own way."""
    others = examples[:held_out] + examples[held_out + 1 :]
    request = engine.prepare(
        [photos[_PHOTOS[held_out]]], CAPTION, Task("t", "", CAPTION, others), GenerationParams(max_new_tokens=tokens)
    )
    return engine.run(request)


async def test_a_task_of_the_models_own_answers_scores_one(stopping_engine, photos, make_service):
    """Examples whose answers the model gives when each is held out: found by answering again with
    the answers found, until they no longer change (the context changes answers)."""
    answers = ["x", "y"]
    for _ in range(4):
        found = [_answer_alone(stopping_engine, photos, _examples(photos, answers), i, 32) for i in range(2)]
        assert all(answer.finished and answer.text for answer in found)
        if [answer.text for answer in found] == answers:
            break
        answers = [answer.text for answer in found]
    else:
        pytest.fail(f"the held-out answers kept changing: {answers}")
    task = Task("own", "", CAPTION, _examples(photos, answers), key="test/own")
    service = make_service(stopping_engine)
    result = await evaluate(plan(task), service.answer, service.rules.count_tokens, stopping_engine.settings.generation)
    assert [(score.expected, score.answered) for score in result.examples] == [(a, a) for a in answers]
    assert (result.exact_match, result.f1) == (1.0, 1.0)


async def test_a_task_the_model_cannot_do_scores_below_one_and_shows_each_answer(
    llama_engine, builtin_tasks, make_service
):
    task = builtin_tasks["caption"]
    service = make_service(llama_engine)
    result = await evaluate(plan(task), service.answer, service.rules.count_tokens, llama_engine.settings.generation)
    assert [score.expected for score in result.examples] == [
        example.text.removeprefix(CAPTION) for example in task.examples
    ]
    first = plan(task).cases[0]
    alone = llama_engine.run(
        llama_engine.prepare(
            [first.example.image],
            first.split.prompt,
            first.task,
            GenerationParams(
                max_new_tokens=answer_budget(
                    first.split.expected, service.rules.count_tokens, llama_engine.settings.generation
                )
            ),
        )
    )
    assert result.examples[0].answered == alone.text
    assert all(score.answered for score in result.examples)
    assert result.exact_match == 0.0 and result.f1 < 1.0
