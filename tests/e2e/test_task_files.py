"""Tasks travel between servers as one file, and copies are made under new names."""

from __future__ import annotations

import io
import zipfile

import pytest

from tests.helpers.e2e import E2E

pytestmark = E2E


async def _export(scene, task: str) -> tuple[str, bytes]:
    reply = (await scene.ask("tasks export", task=task))[0]
    assert reply.ephemeral
    [(filename, data)] = reply.files.items()
    return filename, data


async def _pets(scene) -> None:
    await scene.ask("manage-tasks create", scene.moderator, name="pets", template="<image>Pet:", description="Pets")
    for photo, text in [("chelsea", "<image>Pet:a cat"), ("coffee", "<image>Pet:no pet, a cup")]:
        await scene.ask("manage-tasks add-example", scene.moderator, task="pets", image=scene.photo(photo), text=text)


async def _elsewhere(scene):
    other = await scene.discord.join("Elsewhere")
    return other, scene.discord.add_member(other, "mod2", permissions=scene.moderator.permissions)


@pytest.mark.export
async def test_a_task_exports_as_one_zip_with_its_examples(scene):
    await _pets(scene)
    filename, data = await _export(scene, "pets")
    assert filename == "pets.flamingo-task.zip"
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == ["task.json", "examples/1.jpg", "examples/2.jpg"]
    builtin_name, _ = await _export(scene, "caption")
    assert builtin_name == "caption.flamingo-task.zip"
    refused = await scene.ask("tasks export", task="nothing")
    assert refused[0].ephemeral and refused[0].content.startswith("There is no task called “nothing” here")


@pytest.mark.export
async def test_a_task_too_large_to_attach_here_is_refused_saying_by_how_much(scene):
    await _pets(scene)
    scene.discord.attachment_size_limit = 64 * 1024  # the two photos make about 100 KiB
    try:
        [refused] = await scene.ask("tasks export", task="pets")
    finally:
        scene.discord.attachment_size_limit = 10 * 1024 * 1024  # the stand-in serves the next tests too
    assert refused.ephemeral and not refused.files
    assert refused.content.startswith("Task “pets” makes a ")
    assert refused.content.endswith(
        " KiB file; Discord lets me attach at most 64 KiB here. Remove an example or two and try again."
    )
    assert (await _export(scene, "pets"))[0] == "pets.flamingo-task.zip"


@pytest.mark.import_task
async def test_an_exported_task_imports_into_another_server_and_answers_there(scene):
    await _pets(scene)
    _, data = await _export(scene, "pets")
    other, moderator = await _elsewhere(scene)
    upload = scene.discord.upload("pets.flamingo-task.zip", data, "application/zip")
    done = await scene.ask("manage-tasks import", moderator, other, file=upload)
    assert [(m.content, m.ephemeral) for m in done] == [("Imported task **pets**.", True)]
    shown = (await scene.ask("tasks show", moderator, other, task="pets"))[0]
    assert [e["description"] for e in shown.embeds[1:]] == ["`<image>Pet:a cat`", "`<image>Pet:no pet, a cup`"]
    answer = (await scene.ask("comprehend", moderator, other, image=scene.photo("rocket"), task="pets"))[0]
    assert answer.embeds[0]["footer"]["text"].startswith("task: pets · ")
    renamed = await scene.ask("manage-tasks import", moderator, other, file=upload, name="pets-again")
    assert renamed[0].content == "Imported task **pets-again**."
    again = await scene.ask("manage-tasks import", moderator, other, file=upload)
    assert again[0].content == (
        "This server already has a task called “pets”; choose another name with the `name` option."
    )


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.import_task
async def test_bad_task_files_are_refused_clearly_and_change_nothing(scene):
    await _pets(scene)
    _, good = await _export(scene, "pets")
    with zipfile.ZipFile(io.BytesIO(good)) as archive:
        manifest = archive.read("task.json")
    newer = manifest.replace(b'"version": 1', b'"version": 99')
    cases = [
        (b"just some text", "This file is not a ZIP file, or it is damaged"),
        (
            _zip({"task.json": manifest, "../evil.jpg": b"x"}),
            "The task file contains an unexpected entry “../evil.jpg”",
        ),
        (_zip({"task.json": newer}), "This task file was made by a newer version of the bot"),
    ]
    other, moderator = await _elsewhere(scene)
    for data, message in cases:
        upload = scene.discord.upload("task.zip", data, "application/zip")
        seen = await scene.ask("manage-tasks import", moderator, other, file=upload)
        assert len(seen) == 1 and seen[0].ephemeral
        assert seen[0].content.startswith(message), seen[0].content
    reader = scene.discord.add_member(other, "reader2")
    denied = await scene.ask("manage-tasks import", reader, other, file=scene.discord.upload("t.zip", good))
    assert denied[0].content == "You need the Manage Server permission in this server to do that."
    listing = (await scene.ask("tasks list", moderator, other))[0].embeds[0]["description"]
    assert "pets" not in listing


@pytest.mark.copy
async def test_copies_of_builtin_and_saved_tasks_can_be_changed_and_used(scene):
    copied = await scene.ask("manage-tasks copy", scene.moderator, task="caption", new_name="my-caption")
    assert copied[0].content == "Copied **caption** to **my-caption**."
    await scene.ask("manage-tasks edit", scene.moderator, task="my-caption", description="Ours now")
    listing = (await scene.ask("tasks list"))[0].embeds[0]["description"]
    assert "**my-caption** (this server, " in listing and "Ours now" in listing
    again = await scene.ask("manage-tasks copy", scene.moderator, task="my-caption", new_name="second")
    assert again[0].content == "Copied **my-caption** to **second**."
    answer = (await scene.ask("comprehend", image=scene.photo(), task="second", max_new_tokens=3))[0]
    assert answer.embeds[0]["footer"]["text"].startswith("task: second · ")
    clash = await scene.ask("manage-tasks copy", scene.moderator, task="caption", new_name="second")
    assert clash[0].ephemeral and clash[0].content == (
        "This server already has a task called “second”; choose another name."
    )
    builtin = await scene.ask("manage-tasks copy", scene.moderator, task="vqa", new_name="caption")
    assert builtin[0].content == "“caption” is the name of a built-in task; choose another."
