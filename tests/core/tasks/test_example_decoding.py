"""A server task's example images are read and decoded once per version of the task, and not at all
while the model holds the task's prefix; any change gives a new version, decoded anew."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

import core.images
from core.generation import GenerationParams
from core.images import encode_for_storage, load_image
from core.model.engine import FlamingoEngine
from core.prompts import Example, Task
from core.storage.task_store import TaskStore
from core.tasks.library import TaskLibrary
from tests.helpers.uploads import photo_upload

GUILD = 7
PARAMS = GenerationParams(max_new_tokens=4)


@pytest.fixture
async def store(tmp_path):
    store = await TaskStore.open(tmp_path / "tasks.db")
    yield store
    await store.close()


@pytest.fixture
def library(store, llama_engine, builtin_tasks) -> TaskLibrary:
    return TaskLibrary(store, builtin_tasks, llama_engine.rules, llama_engine.settings)


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image this process decodes from here on."""
    calls: list[tuple[int, int]] = []
    decode = core.images._decoded

    def counted(image, settings):
        calls.append(image.size)
        return decode(image, settings)

    monkeypatch.setattr(core.images, "_decoded", counted)
    return calls


async def create(store: TaskStore, photos, guild_id: int, name: str, *names: str, text: str | None = None) -> None:
    examples = [(encode_for_storage(photos[n]), text or f"<image>Pet:a photo of {n}", 1) for n in names]
    await store.create_task(
        guild_id, name, "", "<image>Pet:", 1, max_tasks=50, max_image_bytes=2**30, examples=examples
    )


def answer(engine: FlamingoEngine, task: Task, photos) -> tuple[int, ...]:
    return engine.run(engine.prepare([photos["rocket"]], "<image>Pet:", task, PARAMS)).token_ids


def decoded_now(task: Task) -> Task:
    """The same task with its images decoded at once, as no cache of it: what its answers must equal."""
    examples = tuple(Example(example.image, example.text) for example in task.examples)
    return Task(task.name, task.description, task.prompt_template, examples)


async def test_a_cached_prefix_decodes_no_stored_example_image(
    store, library, llama_engine, builtin_tasks, photos, decoded
):
    await create(store, photos, GUILD, "pets", "chelsea", "coffee")
    first = answer(llama_engine, await library.resolve(GUILD, "pets"), photos)
    assert len(decoded) == 2  # the prefix was computed: its examples were decoded

    # Another library (this one's cache dropped the task, say) while the model still holds its prefix.
    again = TaskLibrary(store, builtin_tasks, llama_engine.rules, llama_engine.settings)
    hits = llama_engine.decoder.prefixes.stats()["hits"]
    task = await again.resolve(GUILD, "pets")
    assert answer(llama_engine, task, photos) == first
    assert llama_engine.decoder.prefixes.stats()["hits"] == hits + 1
    assert len(decoded) == 2  # nothing more


async def test_each_version_is_decoded_once_whichever_model_computes_its_prefix(
    library, store, engines, photos, decoded
):
    await create(store, photos, GUILD, "pets", "chelsea", "coffee")
    task = await library.resolve(GUILD, "pets")
    answer(engines["llama"], task, photos)
    answer(engines["mpt"], await library.resolve(GUILD, "pets"), photos)  # a server's chosen model: its own prefix
    assert len(decoded) == 2


Change = Callable[[TaskLibrary, dict], Awaitable[str]]


async def add(library: TaskLibrary, photos: dict) -> str:
    await library.add_example(GUILD, "pets", photo_upload("astronaut"), "<image>Pet:an astronaut", 1)
    return "pets"


async def edit(library: TaskLibrary, photos: dict) -> str:
    await library.edit_example(GUILD, "pets", 1, "<image>Pet:a tabby cat")
    return "pets"


async def remove(library: TaskLibrary, photos: dict) -> str:
    await library.remove_example(GUILD, "pets", 1)
    return "pets"


async def move(library: TaskLibrary, photos: dict) -> str:
    await library.move_example(GUILD, "pets", 2, 1)
    return "pets"


async def change_template(library: TaskLibrary, photos: dict) -> str:
    await library.update(GUILD, "pets", description=None, template="<image>Animal:")
    return "pets"


async def rename(library: TaskLibrary, photos: dict) -> str:
    return await library.rename(GUILD, "pets", "animals")


async def recreate(library: TaskLibrary, photos: dict) -> str:
    """Made again under the same name: its revision starts over, its creation time does not."""
    await library.delete(GUILD, "pets")
    await create(library.store, photos, GUILD, "pets", "camera", "coffee")
    return "pets"


@pytest.mark.parametrize("change", [add, edit, remove, move, change_template, rename, recreate])
async def test_a_changed_task_is_read_and_decoded_anew(library, store, llama_engine, photos, decoded, change: Change):
    await create(store, photos, GUILD, "pets", "chelsea", "coffee")
    before = await library.resolve(GUILD, "pets")
    answer(llama_engine, before, photos)
    answer(llama_engine, await library.resolve(GUILD, "pets"), photos)
    assert len(decoded) == 2  # once for this version

    name = await change(library, photos)
    decoded.clear()
    after = await library.resolve(GUILD, name)
    first = answer(llama_engine, after, photos)
    assert len(decoded) == len(after.examples)  # the new version's prefix was computed from its own images
    assert answer(llama_engine, await library.resolve(GUILD, name), photos) == first
    assert len(decoded) == len(after.examples)  # once

    stored = await store.get_task(GUILD, name)
    assert after.key != before.key
    assert (after.name, after.prompt_template) == (stored.name, stored.prompt_template)
    assert [e.text for e in after.examples] == [e.text for e in stored.examples]
    images = llama_engine.settings.images
    assert [e.image.tobytes() for e in after.examples] == [
        load_image(e.image, images).tobytes() for e in stored.examples
    ]
    assert first == answer(llama_engine, decoded_now(after), photos)


async def test_a_task_named_like_another_servers_is_its_own(library, store, llama_engine, photos, decoded):
    """The same name and texts, another picture: neither server is answered with the other's."""
    await create(store, photos, GUILD, "pets", "chelsea", text="<image>Pet:a pet")
    await create(store, photos, GUILD + 1, "pets", "coffee", text="<image>Pet:a pet")
    ours = await library.resolve(GUILD, "pets")
    answer(llama_engine, ours, photos)
    misses = llama_engine.decoder.prefixes.stats()["misses"]
    theirs = await library.resolve(GUILD + 1, "pets")
    first = answer(llama_engine, theirs, photos)
    assert llama_engine.decoder.prefixes.stats()["misses"] == misses + 1  # a prefix of its own
    assert theirs.key != ours.key and len(decoded) == 2
    stored = load_image(encode_for_storage(photos["coffee"]), llama_engine.settings.images)
    assert theirs.examples[0].image.tobytes() == stored.tobytes()
    assert first == answer(llama_engine, decoded_now(theirs), photos)


async def test_the_tasks_kept_are_bounded_by_what_their_images_take(
    store, llama_engine, builtin_tasks, photos, monkeypatch
):
    """1 MiB holds a 451×300 or a 600×400 picture decoded, not both: the least recently used is read again."""
    service = llama_engine.settings.service.model_copy(update={"task_image_cache_mb": 1})
    library = TaskLibrary(
        store, builtin_tasks, llama_engine.rules, llama_engine.settings.model_copy(update={"service": service})
    )
    await create(store, photos, GUILD, "cat", "chelsea")
    await create(store, photos, GUILD, "cup", "coffee")
    await create(store, photos, GUILD, "both", "chelsea", "coffee")
    read: list[str] = []
    get_task = store.get_task

    async def reading(guild_id: int, name: str):
        read.append(name)
        return await get_task(guild_id, name)

    monkeypatch.setattr(store, "get_task", reading)
    for name in ("cat", "cat", "cup", "cup", "cat", "both", "both"):
        await library.resolve(GUILD, name)
    assert read == ["cat", "cup", "cat", "both", "both"]
