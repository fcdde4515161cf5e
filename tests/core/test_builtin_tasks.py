"""Built-in tasks ship real photos and texts that fit the prompt format of every model family."""

from __future__ import annotations

from core.builtin_tasks import DEFAULT_TASK
from core.prompts import IMAGE_TOKEN
from tests.make_tiny_model import FAMILIES


def test_caption_and_vqa_ship_with_examples(builtin_tasks):
    assert {"caption", "vqa"} <= set(builtin_tasks)
    assert DEFAULT_TASK == "caption"
    assert builtin_tasks["caption"].prompt_template == "<image>Output:"
    assert builtin_tasks["vqa"].prompt_template.endswith("Short answer:")
    for task in builtin_tasks.values():
        assert len(task.examples) >= 4
        for example in task.examples:
            assert example.text.count(IMAGE_TOKEN) == 1
            assert example.image.mode == "RGB"
            assert min(example.image.size) >= 224


def test_builtin_texts_pass_each_tokenizer_checks(engines, builtin_tasks):
    for family in FAMILIES:
        engine = engines[family]
        for task in builtin_tasks.values():
            assert engine.rules.check_text(task.prompt_template, 1) == task.prompt_template
            for example in task.examples:
                assert engine.rules.check_text(example.text, 1, what="example") == example.text
