"""A changed task is never answered from the cache of its old version."""

from __future__ import annotations

import pytest

from core.generation import GenerationParams
from core.prompts import Example, Task
from core.storage.task_store import TaskStore
from core.tasks.library import TaskLibrary
from tests.helpers.uploads import photo_upload


@pytest.fixture
async def library(tmp_path, llama_engine, builtin_tasks):
    store = await TaskStore.open(tmp_path / "tasks.db")
    yield TaskLibrary(store, builtin_tasks, llama_engine.rules, llama_engine.settings)
    await store.close()


async def test_after_an_edit_the_answer_comes_from_the_new_examples(library, llama_engine, photos):
    await library.create(7, "pets", "", "<image>Pet:", author_id=1)
    await library.add_example(7, "pets", photo_upload("chelsea"), "<image>Pet:a cat", 42)
    params = GenerationParams(max_new_tokens=8)

    def answer(task: Task) -> tuple[int, ...]:
        return llama_engine.run(llama_engine.prepare([photos["rocket"]], "<image>Pet:", task, params)).token_ids

    before = await library.resolve(7, "pets")
    first = answer(before)
    hits = llama_engine.decoder.prefixes.stats()["hits"]
    assert answer(await library.resolve(7, "pets")) == first
    assert llama_engine.decoder.prefixes.stats()["hits"] == hits + 1  # served from the prefix cache

    await library.edit_example(7, "pets", 1, "<image>Pet:a tabby cat sitting")
    after = await library.resolve(7, "pets")
    assert after.key != before.key
    uncached = Task("pets", "", "<image>Pet:", (Example(after.examples[0].image, "<image>Pet:a tabby cat sitting"),))
    assert answer(after) == answer(uncached)
    assert after.examples[0].text == "<image>Pet:a tabby cat sitting"
