"""Built-in tasks ship real photos and texts that fit the prompt format of every model family."""

from __future__ import annotations

import pytest

from core.errors import ReadOnlyTask
from core.prompts import IMAGE_TOKEN
from core.storage.task_store import TaskStore
from core.tasks.builtin import DEFAULT_TASK
from core.tasks.library import TaskLibrary
from tests.helpers.uploads import photo_upload
from tests.make_tiny_model import FAMILIES

GUILD = 7


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


async def test_a_server_task_named_like_a_later_built_in_stays_the_servers(tmp_path, llama_engine, builtin_tasks):
    """A server made “vqa” before a version shipped a built-in “vqa”: it keeps using and changing its own."""
    store = await TaskStore.open(tmp_path / "tasks.db")
    try:
        older = {"caption": builtin_tasks["caption"]}
        before = TaskLibrary(store, older, llama_engine.rules, llama_engine.settings)
        await before.create(GUILD, "vqa", "Ours", "<image>Ours:", author_id=1)
        await before.add_example(GUILD, "vqa", photo_upload("chelsea"), "<image>Ours:a cat", 1)

        library = TaskLibrary(store, builtin_tasks, llama_engine.rules, llama_engine.settings)
        listed = [(task.name, task.builtin) for task in await library.list_tasks(GUILD)]
        assert listed == [("caption", True), ("vqa", False)]
        assert (await library.resolve(GUILD, "VQA")).prompt_template == "<image>Ours:"
        await library.update(GUILD, "vqa", description=None, template="<image>Ours now:")
        details = await library.details(GUILD, "vqa")
        assert (details.info.builtin, details.prompt_template) == (False, "<image>Ours now:")
        await library.copy(GUILD, "vqa", "vqa-copy", author_id=2)
        assert (await library.resolve(GUILD, "vqa-copy")).examples[0].text == "<image>Ours:a cat"

        # Elsewhere, and once the server's own is gone, the name means the built-in again.
        assert (await library.resolve(GUILD + 1, "vqa")) is builtin_tasks["vqa"]
        await library.delete(GUILD, "vqa")
        assert (await library.resolve(GUILD, "vqa")) is builtin_tasks["vqa"]
        with pytest.raises(ReadOnlyTask):
            await library.delete(GUILD, "vqa")
    finally:
        await store.close()
