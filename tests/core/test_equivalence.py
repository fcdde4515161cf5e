"""Our engine against upstream open_flamingo generate, on the same weights, in fp32.

This is the guard for every speed-up: greedy and beam outputs must be token-identical.
"""

from __future__ import annotations

import pytest

from core.engine import FlamingoEngine
from core.generation import GenerationParams
from core.prompts import END_OF_CHUNK, Example, Task
from tests.make_tiny_model import FAMILIES
from tests.reference import Reference

CAPTIONS = {
    "astronaut": "<image>Output:An astronaut in an orange suit.",
    "coffee": "<image>Output:A cup of coffee on a saucer.",
    "chelsea": "<image>Output:A tabby cat.",
}


@pytest.fixture(scope="module")
def references(model_dirs) -> dict[str, Reference]:
    return {family: Reference(model_dirs[family]) for family in FAMILIES}


def _task(photos, names: list[str]) -> Task:
    examples = tuple(Example(photos[name], CAPTIONS[name]) for name in names)
    return Task("test", "", "<image>Output:", examples)


CASES = [
    pytest.param([], "<image>Output:", id="0-shot"),
    pytest.param(["astronaut"], "<image>Output:", id="1-shot"),
    pytest.param(["astronaut", "coffee", "chelsea"], "<image>Output:", id="3-shot"),
    pytest.param(["astronaut", "coffee"], "Here is a photo. <image>Output:", id="text-before-image"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize(("example_names", "prompt"), CASES)
def test_engine_matches_upstream_generate(
    engines: dict[str, FlamingoEngine], references, photos, family, num_beams, example_names, prompt
):
    engine, reference = engines[family], references[family]
    task = _task(photos, example_names)
    query = photos["rocket"]
    params = GenerationParams(max_new_tokens=12, num_beams=num_beams)

    ours = engine.run(engine.prepare([query], prompt, task, params))

    full_prompt = "".join(CAPTIONS[name] + END_OF_CHUNK for name in example_names) + prompt
    expected = reference.generate(
        [photos[name] for name in example_names] + [query], full_prompt, max_new_tokens=12, num_beams=num_beams
    )
    assert ours.prompt == full_prompt
    assert ours.token_ids == expected
    assert ours.token_ids, "a run that generates nothing proves little"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_different_image_changes_the_answer(engines: dict[str, FlamingoEngine], photos, family):
    engine = engines[family]
    task = _task(photos, ["astronaut"])
    params = GenerationParams(max_new_tokens=12)
    answers = {
        name: engine.run(engine.prepare([photos[name]], "<image>Output:", task, params)).token_ids
        for name in ("rocket", "chelsea", "camera")
    }
    assert len(set(answers.values())) == 3, answers
