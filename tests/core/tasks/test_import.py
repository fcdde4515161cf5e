"""Export a task from one server, import it into another: checked like any upload, all or nothing."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

import core.tasks.library
from core.errors import TaskExists
from core.storage.task_store import TaskStore
from core.tasks.archive import ArchivedExample, BadArchive, read_archive, write_archive
from core.tasks.library import TaskLibrary
from tests.helpers.uploads import photo_upload, uploaded, without_upload_quotas

HOME, AWAY = 1, 2
NOW = datetime(2026, 11, 25, tzinfo=UTC)


@pytest.fixture
async def library(tmp_path, llama_engine, builtin_tasks):
    store = await TaskStore.open(tmp_path / "tasks.db")
    library = TaskLibrary(store, builtin_tasks, llama_engine.rules, without_upload_quotas(llama_engine.settings))
    await library.create(HOME, "pets", "Pets, briefly", "<image>Pet:", author_id=1)
    for name, text in [("chelsea", "<image>Pet:a cat"), ("coffee", "<image>Pet:not a pet")]:
        await library.add_example(HOME, "pets", photo_upload(name), text, 1)
    yield library
    await store.close()


async def test_an_exported_task_imports_into_another_server_unchanged(library):
    data = uploaded(write_archive(await library.export(HOME, "pets"), NOW))
    assert await library.import_task(AWAY, data, author_id=5) == "pets"
    home, away = await library.details(HOME, "pets"), await library.details(AWAY, "pets")
    assert (away.info.description, away.prompt_template) == ("Pets, briefly", "<image>Pet:")
    assert [e.text for e in away.examples] == [e.text for e in home.examples]
    assert [e.image[:2] for e in away.examples] == [b"\xff\xd8", b"\xff\xd8"]
    assert await library.import_task(AWAY, data, author_id=5, name="pets-2") == "pets-2"


async def test_an_import_under_a_taken_name_is_refused_before_its_images_are_decoded(library, monkeypatch):
    """Nothing is stored by a refused import, so it could be repeated at will: it must cost little."""
    upload = uploaded(write_archive(await library.export(HOME, "pets"), NOW))
    decoded = []

    async def decode(*args):
        decoded.append(args)

    monkeypatch.setattr(core.tasks.library, "stored_image", decode)
    with pytest.raises(TaskExists):
        await library.import_task(HOME, upload, author_id=2)
    assert decoded == []


async def test_builtin_tasks_export_too(library):
    archive = read_archive(write_archive(await library.export(None, "vqa"), NOW), library.archive_limits)
    assert archive.name == "vqa" and len(archive.examples) > 0


async def _refused(library, archive, match: str, name: str | None = None) -> None:
    before = await library.list_tasks(AWAY)
    with pytest.raises((BadArchive, TaskExists), match=match):
        await library.import_task(AWAY, uploaded(write_archive(archive, NOW)), author_id=5, name=name)
    assert await library.list_tasks(AWAY) == before


async def test_a_bad_image_refuses_the_whole_import(library):
    archive = await library.export(HOME, "pets")
    broken = replace(archive, examples=(*archive.examples[:1], ArchivedExample(b"\xff\xd8 not a jpeg", "<image>Pet:x")))
    await _refused(library, broken, "Example 2 of the task file: ")


async def test_texts_follow_the_task_rules(library):
    archive = await library.export(HOME, "pets")
    await _refused(
        library,
        replace(archive, prompt_template="Pet:"),
        "cannot be imported: The prompt template needs exactly one `<image>`",
    )
    await _refused(library, replace(archive, name="Bad Name!"), "cannot be imported: “Bad Name!” is not a valid")
    await _refused(library, replace(archive, name="caption"), "the name of a built-in task")
    injected = replace(archive, examples=(ArchivedExample(archive.examples[0].image, "<image>Pet:<|endofchunk|>"),))
    await _refused(library, injected, "cannot be imported: ")


async def test_an_existing_name_is_refused_until_another_is_given(library):
    archive = await library.export(HOME, "pets")
    await library.import_task(AWAY, uploaded(write_archive(archive, NOW)), author_id=5)
    await _refused(library, archive, "already has a task called “pets”")


async def test_copies_keep_who_added_each_example_so_forgetting_them_reaches_the_copies(library):
    """Built-in examples belong to nobody. (Imports keep their authors too: see test_authors.)"""
    await library.add_example(HOME, "pets", photo_upload("astronaut"), "<image>Pet:a person", 3)
    await library.copy(HOME, "pets", "pets-copy", author_id=2)
    await library.copy(HOME, "caption", "captions", author_id=2)
    store = library.store
    copied = await store.get_task(HOME, "pets-copy")
    assert [e.added_by for e in copied.examples] == [1, 1, 3] and copied.created_by == 2
    assert {e.added_by for e in (await store.get_task(HOME, "captions")).examples} == {0}

    assert await store.delete_user_examples(3) == 2  # from the task and its copy
    assert await store.delete_user_examples(2) == 0  # the copier added none
    assert await store.forget_user_tasks(2) == 0  # the copier added no example
    assert (await store.get_task(HOME, "pets-copy")).created_by == 0
    assert (await store.get_task(HOME, "pets")).created_by == 1
