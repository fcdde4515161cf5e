"""Two moderators changing one task at once: a change checked against what it read is refused if the
task changed meanwhile, so the task's limits (examples, the model's context) always hold."""

from __future__ import annotations

import asyncio

import pytest

import core.tasks.library
from core.errors import LimitReached, TaskChanged
from core.prompts import assemble_prompt
from core.storage.task_store import TaskStore
from core.tasks.library import TaskLibrary
from tests.helpers.uploads import photo_upload, without_upload_quotas

GUILD = 7


@pytest.fixture
async def library(tmp_path, llama_engine, builtin_tasks):
    store = await TaskStore.open(tmp_path / "tasks.db")
    library = TaskLibrary(store, builtin_tasks, llama_engine.rules, without_upload_quotas(llama_engine.settings))
    await library.create(GUILD, "pets", "", "<image>Pet:", author_id=1)
    for text in ("<image>Pet:one", "<image>Pet:two", "<image>Pet:three"):
        await library.add_example(GUILD, "pets", photo_upload("chelsea"), text, 1)
    yield library
    await store.close()


def both_read_first(monkeypatch) -> None:
    """Two adds at once each read the task and check it before either decodes its image and writes."""
    both_read = asyncio.Barrier(2)
    stored_image = core.tasks.library.stored_image

    async def after_both_read(*args, **kwargs):
        await both_read.wait()
        return await stored_image(*args, **kwargs)

    monkeypatch.setattr(core.tasks.library, "stored_image", after_both_read)


async def test_examples_added_at_once_are_applied_one_after_another_each_checked(library, monkeypatch):
    both_read_first(monkeypatch)
    image = photo_upload("coffee")
    added = await asyncio.gather(
        library.add_example(GUILD, "pets", image, "<image>Pet:four", 2),
        library.add_example(GUILD, "pets", image, "<image>Pet:five", 3),
    )
    assert sorted(added) == [4, 5]
    texts = [e.text for e in (await library.store.get_task(GUILD, "pets")).examples]
    assert sorted(texts[3:]) == ["<image>Pet:five", "<image>Pet:four"]


async def test_of_two_examples_added_at_once_the_one_that_no_longer_fits_is_refused(library, monkeypatch):
    """Each fits the model's context alone, not both: checked on the same read, both were saved."""
    stored = await library.store.get_task(GUILD, "pets")
    four = [e.text for e in stored.examples] + ["<image>Pet:four"]
    tokens = library.rules.count_tokens(assemble_prompt(four, stored.prompt_template))
    monkeypatch.setattr(library.rules, "context_length", tokens + library.settings.generation.max_new_tokens_default)
    both_read_first(monkeypatch)
    image = photo_upload("coffee")
    outcomes = await asyncio.gather(
        library.add_example(GUILD, "pets", image, "<image>Pet:four", 2),
        library.add_example(GUILD, "pets", image, "<image>Pet:four", 3),
        return_exceptions=True,
    )
    assert sorted(map(type, outcomes), key=str) == sorted([int, LimitReached], key=str)
    refused = next(o for o in outcomes if isinstance(o, LimitReached))
    assert str(refused).startswith("Task “pets” would need")
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


def both_write_at_once(monkeypatch, library, method: str) -> None:
    """The first two calls of the store's ``method`` wait for each other: both read the same revision."""
    both_read = asyncio.Barrier(2)
    original = getattr(library.store, method)
    calls = 0

    async def after_both_read(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls <= 2:
            await both_read.wait()
        return await original(*args, **kwargs)

    monkeypatch.setattr(library.store, method, after_both_read)


async def test_examples_edited_at_once_are_both_applied(library, monkeypatch):
    both_write_at_once(monkeypatch, library, "edit_example")
    await asyncio.gather(
        library.edit_example(GUILD, "pets", 1, "<image>Pet:ONE"),
        library.edit_example(GUILD, "pets", 3, "<image>Pet:THREE"),
    )
    texts = [e.text for e in (await library.store.get_task(GUILD, "pets")).examples]
    assert texts == ["<image>Pet:ONE", "<image>Pet:two", "<image>Pet:THREE"]


async def test_examples_removed_and_moved_at_once_apply_one_after_another(library, monkeypatch):
    both_write_at_once(monkeypatch, library, "remove_example")
    await asyncio.gather(library.remove_example(GUILD, "pets", 1), library.remove_example(GUILD, "pets", 1))
    assert [e.text for e in (await library.store.get_task(GUILD, "pets")).examples] == ["<image>Pet:three"]

    await library.add_example(GUILD, "pets", photo_upload("coffee"), "<image>Pet:four", 1)
    both_write_at_once(monkeypatch, library, "move_example")
    await asyncio.gather(library.move_example(GUILD, "pets", 2, 1), library.move_example(GUILD, "pets", 2, 1))
    assert [e.text for e in (await library.store.get_task(GUILD, "pets")).examples] == [
        "<image>Pet:three",
        "<image>Pet:four",
    ]
