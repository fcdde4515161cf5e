"""Example authors travel through the task file: an export names who added each example, and an
import keeps them, so that an author's /forget-me reaches the copies imported elsewhere too."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from core.storage.task_store import TaskStore
from core.tasks.archive import ArchivedExample, BadArchive, TaskArchive, read_archive, write_archive
from core.tasks.library import TaskLibrary
from tests.core.tasks.test_archive import LIMITS, archive_with, jpeg, manifest
from tests.helpers.uploads import photo_upload, uploaded, without_upload_quotas

HOME, AWAY = 1, 2
# Discord ids are above 2**53, where a JSON reader working in doubles would round them.
ALICE, BOB, IMPORTER = 2**60 + 1, 175928847299117063, 5
NOW = datetime(2026, 11, 25, tzinfo=UTC)


def task_json(data: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return json.loads(zf.read("task.json"))


def test_an_archive_names_each_examples_author_as_a_string_and_reads_them_back():
    examples = (ArchivedExample(jpeg(1), "one", ALICE), ArchivedExample(jpeg(2), "two"))
    task = TaskArchive("cats", "", "<image>Output:", examples)
    data = write_archive(task, NOW)
    written = task_json(data)
    assert written["version"] == 1  # older bots read it still: they ignore what they do not know
    assert [example.get("author_id") for example in written["examples"]] == [str(ALICE), None]
    assert read_archive(data, LIMITS) == task


def test_a_file_from_before_authors_were_exported_reads_without_them():
    assert "author_id" not in manifest(2)["examples"][0]
    task = read_archive(archive_with(manifest(2)), LIMITS)
    assert [example.author_id for example in task.examples] == [None, None]


@pytest.mark.parametrize("author", ["", "abc", "-1", "0", "1.5", " 7", str(2**63), "١٢", "9" * 5000, 7, None, [7]])
def test_an_author_that_is_not_a_discord_id_is_refused(author):
    fields = manifest(2)
    fields["examples"][1]["author_id"] = author
    with pytest.raises(BadArchive) as refused:
        read_archive(archive_with(fields), LIMITS)
    assert str(refused.value) == "“author_id” of example 2 in the task file is not a Discord user id."


@pytest.fixture
async def library(tmp_path, llama_engine, builtin_tasks):
    store = await TaskStore.open(tmp_path / "tasks.db")
    try:
        library = TaskLibrary(store, builtin_tasks, llama_engine.rules, without_upload_quotas(llama_engine.settings))
        await library.create(HOME, "pets", "Pets", "<image>Pet:", author_id=ALICE)
        await library.add_example(HOME, "pets", photo_upload("chelsea"), "<image>Pet:a cat", ALICE)
        await library.add_example(HOME, "pets", photo_upload("coffee"), "<image>Pet:no pet", BOB)
        yield library
    finally:
        await store.close()


async def test_an_imported_task_keeps_who_added_each_example_and_forgetting_them_reaches_it(library):
    exported = await library.export(HOME, "pets")
    assert [example.author_id for example in exported.examples] == [ALICE, BOB]
    await library.import_task(AWAY, uploaded(write_archive(exported, NOW)), IMPORTER)
    imported = await library.store.get_task(AWAY, "pets")
    assert [example.added_by for example in imported.examples] == [ALICE, BOB]
    assert imported.created_by == IMPORTER  # the task itself is the importer's

    assert await library.store.delete_user_examples(BOB) == 2  # at home and in the imported copy
    assert [e.text for e in (await library.store.get_task(AWAY, "pets")).examples] == ["<image>Pet:a cat"]


async def test_examples_the_file_names_no_author_for_are_the_importers(library):
    exported = await library.export(HOME, "pets")
    anonymous = replace(exported, examples=(replace(exported.examples[0], author_id=None), exported.examples[1]))
    await library.import_task(AWAY, uploaded(write_archive(anonymous, NOW)), IMPORTER)
    assert [e.added_by for e in (await library.store.get_task(AWAY, "pets")).examples] == [IMPORTER, BOB]

    builtin = await library.export(None, "caption")  # a built-in's examples are nobody's
    assert {example.author_id for example in builtin.examples} == {None}
    await library.import_task(AWAY, uploaded(write_archive(builtin, NOW)), IMPORTER, name="captions")
    assert {e.added_by for e in (await library.store.get_task(AWAY, "captions")).examples} == {IMPORTER}
