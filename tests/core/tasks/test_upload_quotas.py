"""Task uploads (add-example, import) have quotas of their own, as members' requests do: one server
reads one at a time and some per period, a user waits between them, and a refusal says when to try
again, fetches nothing and changes nothing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

import core.tasks.library
from core.config import QuotaSettings
from core.errors import BadImage, UnknownTask
from core.quotas import TASK_UPLOADS, RequestQuotas, TooManyRequests
from core.storage.task_store import TaskStore
from core.tasks.archive import write_archive
from core.tasks.library import TaskLibrary
from tests.helpers.uploads import photo_upload, uploaded

HOME, AWAY = 1, 2
MOD, OTHER_MOD = 10, 11
NOW = datetime(2026, 11, 25, tzinfo=UTC)
BUSY = "This server already has 1 task upload being read; try again in a minute."


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def open_library(tmp_path, llama_engine, builtin_tasks):
    """A library with these quotas, its clock the test's; a task ``pets`` in both servers."""
    stores = []

    async def open_with(clock: Clock, **quotas: float) -> TaskLibrary:
        settings = llama_engine.settings.model_copy(update={"quotas": QuotaSettings(**quotas)})
        store = await TaskStore.open(tmp_path / f"tasks-{len(stores)}.db")
        stores.append(store)
        library = TaskLibrary(store, builtin_tasks, llama_engine.rules, settings)
        library.uploads = RequestQuotas(settings.quotas.task_uploads, clock, TASK_UPLOADS)
        for guild in (HOME, AWAY):
            await library.create(guild, "pets", "", "<image>Pet:", author_id=MOD)
        return library

    yield open_with
    for store in stores:
        await store.close()


def never_fetched(fetched: list[str]):
    async def read() -> bytes:
        fetched.append("fetched")
        raise AssertionError("a refused upload must not be fetched")

    return read


async def texts(library: TaskLibrary, guild: int) -> list[str]:
    return [example.text for example in (await library.store.get_task(guild, "pets")).examples]


def test_task_uploads_have_their_own_limits_and_the_members_cooldown_unless_given_one():
    defaults = QuotaSettings().task_uploads
    assert (defaults.guild_in_flight, defaults.guild_per_period, defaults.period_seconds) == (1, 30, 3600)
    assert defaults.user_cooldown_seconds == QuotaSettings().user_cooldown_seconds == 10
    own = QuotaSettings(user_cooldown_seconds=0, task_upload_cooldown_seconds=5, period_seconds=60).task_uploads
    assert (own.user_cooldown_seconds, own.period_seconds) == (5, 60)


async def test_a_server_reads_one_task_upload_at_a_time_and_other_servers_are_not_held_back(open_library, monkeypatch):
    library = await open_library(Clock(), user_cooldown_seconds=0)
    reading, release = asyncio.Event(), asyncio.Event()
    stored_image = core.tasks.library.stored_image

    async def held_first(data, settings):
        if not reading.is_set():
            reading.set()
            await release.wait()
        return await stored_image(data, settings)

    monkeypatch.setattr(core.tasks.library, "stored_image", held_first)
    first = asyncio.ensure_future(library.add_example(HOME, "pets", photo_upload("chelsea"), "<image>Pet:one", MOD))
    await reading.wait()
    fetched: list[str] = []
    with pytest.raises(TooManyRequests, match=f"^{BUSY}$"):
        await library.add_example(HOME, "pets", never_fetched(fetched), "<image>Pet:two", OTHER_MOD)
    archive = uploaded(write_archive(await library.export(None, "caption"), NOW))
    with pytest.raises(TooManyRequests, match=f"^{BUSY}$"):
        await library.import_task(HOME, archive, OTHER_MOD, name="captions")
    assert fetched == []
    assert await library.add_example(AWAY, "pets", photo_upload("coffee"), "<image>Pet:away", OTHER_MOD) == 1
    release.set()
    assert await first == 1
    assert await texts(library, HOME) == ["<image>Pet:one"]
    assert [task.name for task in await library.list_tasks(HOME) if not task.builtin] == ["pets"]
    assert await library.add_example(HOME, "pets", photo_upload("coffee"), "<image>Pet:two", OTHER_MOD) == 2


async def test_a_server_has_a_number_of_task_uploads_per_period_which_refused_ones_do_not_use(open_library):
    clock = Clock()
    library = await open_library(clock, user_cooldown_seconds=0, task_uploads_per_period=2)
    with pytest.raises(UnknownTask):
        await library.add_example(HOME, "nothing", photo_upload("chelsea"), "<image>Pet:x", MOD)
    await library.add_example(HOME, "pets", photo_upload("chelsea"), "<image>Pet:one", MOD)
    clock.now += 60
    await library.import_task(HOME, uploaded(write_archive(await library.export(None, "vqa"), NOW)), MOD, "mine")
    fetched: list[str] = []
    with pytest.raises(TooManyRequests, match=r"^This server has used its 2 task uploads for now; more in 59 min\.$"):
        await library.add_example(HOME, "pets", never_fetched(fetched), "<image>Pet:two", OTHER_MOD)
    assert fetched == [] and await texts(library, HOME) == ["<image>Pet:one"]
    await library.add_example(AWAY, "pets", photo_upload("chelsea"), "<image>Pet:away", MOD)  # another server's own
    clock.now += 3540
    await library.add_example(HOME, "pets", photo_upload("coffee"), "<image>Pet:two", OTHER_MOD)


async def test_a_user_waits_between_task_uploads_unless_refused_before_any_file_was_read(open_library):
    clock = Clock()
    library = await open_library(clock, user_cooldown_seconds=0, task_upload_cooldown_seconds=30)
    await library.add_example(HOME, "pets", photo_upload("chelsea"), "<image>Pet:one", MOD)
    clock.now += 10
    fetched: list[str] = []
    with pytest.raises(TooManyRequests, match=r"^You are uploading to tasks too fast; you can upload again in 20 s\.$"):
        await library.add_example(AWAY, "pets", never_fetched(fetched), "<image>Pet:two", MOD)  # in any server
    assert fetched == []
    await library.add_example(HOME, "pets", photo_upload("coffee"), "<image>Pet:two", OTHER_MOD)

    clock.now += 30
    with pytest.raises(BadImage, match=r"^This file is not an image I can read"):
        await library.add_example(HOME, "pets", uploaded(b"these are notes"), "<image>Pet:x", MOD)
    whole = (await library.store.get_task(HOME, "pets")).examples[0].image
    with pytest.raises(BadImage, match=r"^The image file is damaged or incomplete"):  # read: costs the wait
        await library.add_example(HOME, "pets", uploaded(whole[: len(whole) // 2]), "<image>Pet:x", MOD)
    with pytest.raises(TooManyRequests, match="too fast"):
        await library.add_example(HOME, "pets", photo_upload("rocket"), "<image>Pet:three", MOD)
    assert await texts(library, HOME) == ["<image>Pet:one", "<image>Pet:two"]
