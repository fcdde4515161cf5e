"""Task uploads are read in a worker of their own: they take none of members' decoding places nor the
event loop's default threads, and one that reads too long is refused, changing nothing."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest

import core.images
import core.tasks.uploads
from core.errors import BadImage
from core.storage.task_store import TaskStore
from core.tasks.archive import BadArchive, write_archive
from core.tasks.library import TaskLibrary
from tests.helpers.heavy_images import reads_forever
from tests.helpers.uploads import photo_upload, uploaded, without_upload_quotas

HOME, AWAY = 1, 2
NOW = datetime(2026, 11, 25, tzinfo=UTC)
TOO_SLOW = "This image took too long to read; save it again as an ordinary JPEG or PNG."
# Only keeps a failing test from hanging: nothing here is timed.
HANG = 120


@pytest.fixture
async def library(tmp_path, llama_engine, builtin_tasks):
    store = await TaskStore.open(tmp_path / "tasks.db")
    settings = without_upload_quotas(llama_engine.settings)
    settings = settings.model_copy(update={"images": settings.images.model_copy()})  # its own, to change
    try:
        library = TaskLibrary(store, builtin_tasks, llama_engine.rules, settings)
        await library.create(HOME, "pets", "Pets", "<image>Pet:", author_id=1)
        yield library
    finally:
        await store.close()


@contextmanager
def members_decoding_everywhere():
    """Every decoding place of the bot's own process taken, and the loop's one default thread busy,
    as by a flood of members' requests."""
    decoding = core.images._DECODING
    for _ in range(4):
        decoding.acquire()
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(1))
    busy = threading.Event()
    loop.run_in_executor(None, busy.wait)
    try:
        yield
    finally:
        busy.set()
        for _ in range(4):
            decoding.release()


async def test_task_uploads_are_read_while_members_hold_every_decoding_place_and_thread(library):
    with members_decoding_everywhere():
        position = await asyncio.wait_for(
            library.add_example(HOME, "pets", photo_upload("chelsea"), "<image>Pet:a cat", 1), HANG
        )
        archive = uploaded(write_archive(await library.export(HOME, "pets"), NOW))
        imported = await asyncio.wait_for(library.import_task(AWAY, archive, 2), HANG)
    assert (position, imported) == (1, "pets")
    assert len((await library.store.get_task(AWAY, "pets")).examples) == 1


async def test_an_example_read_for_too_long_is_refused_its_worker_replaced_and_nothing_changes(library, monkeypatch):
    with monkeypatch.context() as patched:
        patched.setattr(core.tasks.uploads, "image_for_storage", reads_forever)
        patched.setattr(library.settings.images, "decode_seconds", 0.2)
        with pytest.raises(BadImage) as refused:
            await library.add_example(HOME, "pets", photo_upload("chelsea"), "<image>Pet:a cat", 1)
        assert str(refused.value) == TOO_SLOW
        archive = uploaded(write_archive(await library.export(None, "vqa"), NOW))
        with pytest.raises(BadArchive) as refused_file:
            await library.import_task(HOME, archive, 1, name="mine")
        assert str(refused_file.value) == f"Example 1 of the task file: {TOO_SLOW}"
    assert (await library.store.get_task(HOME, "pets")).examples == ()
    assert not await library.store.has_task(HOME, "mine")
    assert await library.add_example(HOME, "pets", photo_upload("chelsea"), "<image>Pet:a cat", 1) == 1


async def test_a_task_file_read_for_too_long_is_refused(library, monkeypatch):
    monkeypatch.setattr(core.tasks.uploads, "read_archive", reads_forever)
    monkeypatch.setattr(library.settings.images, "decode_seconds", 0.2)
    archive = uploaded(write_archive(await library.export(HOME, "pets"), NOW))
    with pytest.raises(
        BadArchive, match=r"^The task file took too long to read; export the task again from the bot\.$"
    ):
        await library.import_task(AWAY, archive, 2)
    assert [task.name for task in await library.list_tasks(AWAY) if not task.builtin] == []
