"""Two moderators changing one task at once: a change checked against what it read is refused if the
task changed meanwhile, so the task's limits (examples, the model's context) always hold."""

from __future__ import annotations

import asyncio
import threading

import pytest

import core.tasks
from core.errors import TaskChanged
from core.store import TaskStore
from core.tasks import TaskLibrary
from tests.conftest import IMAGES

GUILD = 7


@pytest.fixture
async def library(tmp_path, llama_engine, builtin_tasks):
    store = await TaskStore.open(tmp_path / "tasks.db")
    library = TaskLibrary(store, builtin_tasks, llama_engine.rules, llama_engine.settings)
    await library.create(GUILD, "pets", "", "<image>Pet:", author_id=1)
    for text in ("<image>Pet:one", "<image>Pet:two", "<image>Pet:three"):
        await library.add_example(GUILD, "pets", (IMAGES / "chelsea.jpg").read_bytes(), text, 1)
    yield library
    await store.close()


async def test_of_two_examples_added_at_once_the_second_is_refused_not_saved_unchecked(library, monkeypatch):
    both_read = threading.Barrier(2, timeout=10)
    load_image = core.tasks.load_image

    def after_both_read(*args, **kwargs):  # each add has read the task and checked it before this
        both_read.wait()
        return load_image(*args, **kwargs)

    monkeypatch.setattr(core.tasks, "load_image", after_both_read)
    image = (IMAGES / "coffee.jpg").read_bytes()
    outcomes = await asyncio.gather(
        library.add_example(GUILD, "pets", image, "<image>Pet:four", 2),
        library.add_example(GUILD, "pets", image, "<image>Pet:five", 3),
        return_exceptions=True,
    )
    assert sorted(map(type, outcomes), key=str) == sorted([int, TaskChanged], key=str)
    refused = next(o for o in outcomes if isinstance(o, TaskChanged))
    assert str(refused) == "Task “pets” was changed by someone else a moment ago; look at it again and retry."
    assert len((await library.store.get_task(GUILD, "pets")).examples) == 4


async def test_an_edit_by_position_is_refused_after_the_examples_moved(library):
    stale = await library.store.get_task(GUILD, "pets")
    await library.remove_example(GUILD, "pets", 1)  # "two" is now at position 1, "three" at 2
    for change in (
        library.store.edit_example(GUILD, "pets", 2, "<image>Pet:TWO", revision=stale.revision),
        library.store.remove_example(GUILD, "pets", 2, revision=stale.revision),
        library.store.move_example(GUILD, "pets", 2, 1, revision=stale.revision),
        library.store.update_task(GUILD, "pets", prompt_template="<image>Animal:", revision=stale.revision),
    ):
        with pytest.raises(TaskChanged):
            await change
    after = await library.store.get_task(GUILD, "pets")
    assert [e.text for e in after.examples] == ["<image>Pet:two", "<image>Pet:three"]
    assert after.prompt_template == "<image>Pet:"
