"""/manage-tasks add-example and import as a server's managers meet their quotas and time bound:
what they are told, and that a refused upload is neither downloaded nor changes anything."""

from __future__ import annotations

import asyncio

from tests.fake_discord.payloads import MANAGE_GUILD
from tests.helpers.heavy_images import slow_header_jpeg
from tests.helpers.task_commands import add, create, example_texts
from tests.helpers.world import photo, private

TOO_SLOW = "This image took too long to read; save it again as an ordinary JPEG or PNG."


def download_path(attachment) -> tuple[str, str]:
    return ("GET", f"/cdn/attachments/{attachment.id}/{attachment.filename}")


async def test_a_second_upload_while_one_is_read_is_refused_saying_when_to_try_again(world, monkeypatch):
    monkeypatch.setattr(world.bot.settings.images, "download_seconds", 1.0)
    await create(world)
    stalled = photo(world)
    world.discord.cdn_delays[stalled.id] = 3600  # the first upload is still downloading throughout
    first = world.invoke("manage-tasks add-example", world.moderator, task="pets", image=stalled, text="<image>P:1")
    while download_path(stalled) not in world.discord.requests:
        await asyncio.sleep(0.01)

    second = photo(world, "coffee")
    message = await private(
        world, "manage-tasks add-example", world.moderator, task="pets", image=second, text="<image>"
    )
    assert message == "This server already has 1 task upload being read; try again in a minute."
    task_file = world.discord.upload("pets.flamingo-task.zip", b"PK", "application/zip")
    assert await private(world, "manage-tasks import", world.moderator, file=task_file) == message
    assert download_path(second) not in world.discord.requests
    assert download_path(task_file) not in world.discord.requests

    [refused] = await first.answered()
    assert refused.content == "Downloading “chelsea.jpg” from Discord took over 1 s; send it again."
    assert await example_texts(world, "pets") == []
    await add(world, "pets", photo(world, "coffee"), "<image>Pet:2", 1)  # the place is free again


async def test_a_manager_uploading_again_too_soon_is_told_how_long_to_wait(world, monkeypatch):
    monkeypatch.setattr(world.bot.settings.quotas, "user_cooldown_seconds", 30)  # task uploads' too, unless set
    await create(world)
    await add(world, "pets", photo(world), "<image>Pet:1", 1)
    again = photo(world, "coffee")
    message = await private(
        world, "manage-tasks add-example", world.moderator, task="pets", image=again, text="<image>"
    )
    assert message == "You are uploading to tasks too fast; you can upload again in 30 s."
    assert download_path(again) not in world.discord.requests
    assert await example_texts(world, "pets") == ["<image>Pet:1"]


async def test_an_image_whose_header_takes_too_long_to_read_is_refused_with_what_to_do(world, monkeypatch):
    """25 MiB of fill bytes that Pillow reads one at a time (seconds on any machine), against a bound
    of a fifth of a second."""
    monkeypatch.setattr(world.bot.settings.images, "decode_seconds", 0.2)
    await create(world)
    slow = world.discord.upload("slow.jpg", slow_header_jpeg(), "image/jpeg")
    message = await private(world, "manage-tasks add-example", world.moderator, task="pets", image=slow, text="<image>")
    assert message == TOO_SLOW
    assert await example_texts(world, "pets") == []


async def test_an_exported_task_imported_elsewhere_keeps_who_added_its_examples(world):
    await create(world)
    await add(world, "pets", photo(world), "<image>Pet:a cat", 1)
    [exported] = await world.reply("tasks export", world.member, task="pets")
    [(filename, data)] = exported.files.items()
    other = world.discord.add_guild("Other")
    importer = world.discord.add_member(other, "importer", permissions=MANAGE_GUILD | (1 << 31))
    task_file = world.discord.upload(filename, data, "application/zip")
    assert await private(world, "manage-tasks import", importer, other, file=task_file) == "Imported task **pets**."
    imported = await world.bot.store.get_task(other.id, "pets")
    assert [example.added_by for example in imported.examples] == [world.moderator.id]
    assert imported.created_by == importer.id
