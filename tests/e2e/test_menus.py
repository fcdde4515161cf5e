"""Autocomplete of task names and the message menu's Describe image, through the real bot process."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_discord.payloads import user_payload
from tests.fake_discord.server import Message
from tests.helpers.e2e import E2E, click

pytestmark = E2E


async def _choices(scene, command: str, typed: str, **options) -> list[str]:
    payload = scene.discord.autocomplete_payload(command, scene.reader, scene.guild, "task", task=typed, **options)
    record = await scene.discord.send_interaction(payload)
    await record.wait_for(lambda: record.choices is not None, timeout=30)
    return [choice["name"] for choice in record.choices]


@pytest.mark.autocomplete
async def test_task_names_are_completed_as_the_user_types(scene):
    await scene.ask("manage-tasks create", scene.moderator, name="cats", template="<image>Cat:")
    await scene.ask("manage-tasks create", scene.moderator, name="scary", template="<image>Boo:")
    assert await _choices(scene, "comprehend", "ca") == ["caption", "cats", "scary"]
    assert await _choices(scene, "tasks show", "") == ["caption", "cats", "scary", "vqa"]
    assert await _choices(scene, "manage-tasks delete", "VQ") == ["vqa"]


@pytest.mark.autocomplete
async def test_at_most_twenty_five_choices_are_offered(scene):
    await asyncio.gather(
        *(
            scene.ask("manage-tasks create", scene.moderator, name=f"task-{i:02d}", template="<image>X:")
            for i in range(30)
        )
    )
    choices = await _choices(scene, "comprehend", "task-")
    assert choices == [f"task-{i:02d}" for i in range(25)]


def _message_with(scene, attachments) -> dict:
    message = scene.discord.message_json(Message(987654321, content="look at this"))
    message["attachments"] = [attachment.payload() for attachment in attachments]
    return message


@pytest.mark.context_menu
async def test_describing_someones_picture_leaves_it_theirs_to_delete_and_forget(scene):
    poster = scene.discord.add_member(scene.guild, "poster")
    message = _message_with(scene, [scene.photo("coffee")])
    message["author"] = user_payload(poster.id, poster.name)
    payload = scene.discord.context_menu_payload("Describe image", scene.reader, scene.guild, message)
    described = (await (await scene.discord.send_interaction(payload)).answered())[0]
    forgot = (await scene.ask("forget-me", poster))[0]
    assert forgot.content.startswith("Deleted the pictures and prompts of your recent request.")
    gone = (await (await click(scene, described, "Prompt")).answered())[0]
    assert gone.content.startswith("This answer's request is no longer stored")


@pytest.mark.context_menu
async def test_describe_image_answers_about_the_messages_attachment(scene):
    payload = scene.discord.context_menu_payload(
        "Describe image", scene.reader, scene.guild, _message_with(scene, [scene.photo("coffee")])
    )
    reply = (await (await scene.discord.send_interaction(payload)).answered())[0]
    assert not reply.ephemeral
    assert reply.embeds[0]["footer"]["text"].startswith("task: caption · ")
    assert reply.files["image.jpg"].startswith(b"\xff\xd8")


@pytest.mark.context_menu
async def test_describe_image_on_a_message_without_images_says_so_privately(scene):
    text_file = scene.discord.upload("notes.txt", b"hello", "text/plain")
    payload = scene.discord.context_menu_payload(
        "Describe image", scene.reader, scene.guild, _message_with(scene, [text_file])
    )
    seen = await (await scene.discord.send_interaction(payload)).answered()
    assert [(m.content, m.ephemeral) for m in seen] == [
        ("That message has no attached image; I only read attached images, not links.", True)
    ]


@pytest.mark.multi_image
async def test_several_images_are_read_in_order(scene):
    images = {"image": scene.photo("chelsea"), "image2": scene.photo("coffee"), "image3": scene.photo("rocket")}
    reply = (
        await scene.ask("comprehend", prompt="<image>A cat. <image>A cup. <image>Output:", max_new_tokens=3, **images)
    )[0]
    assert not reply.ephemeral
    assert sorted(reply.files) == ["image-2.jpg", "image-3.jpg", "image.jpg"]
    assert reply.embeds[0]["image"]["url"] == "attachment://image.jpg"


@pytest.mark.multi_image
async def test_image_and_marker_counts_must_match(scene):
    two = {"image": scene.photo("chelsea"), "image2": scene.photo("coffee")}
    no_prompt = await scene.ask("comprehend", **two)
    assert [(m.content, m.ephemeral) for m in no_prompt] == [
        ("With 2 images, write a prompt with one `<image>` for each, in order, e.g. `<image><image>Output:`.", True)
    ]
    mismatch = await scene.ask("comprehend", prompt="<image>Output:", **two)
    assert mismatch[0].ephemeral
    assert mismatch[0].content.startswith("The prompt has 1 <image> marker but 2 images were given")


@pytest.mark.help
async def test_help_explains_the_bot_and_shows_this_servers_default(scene):
    await scene.ask("manage-tasks create", scene.moderator, name="birds", template="<image>Bird:")
    await scene.ask("manage-tasks set-default", scene.moderator, task="birds")
    reply = (await scene.ask("help"))[0]
    assert reply.ephemeral
    fields = {field["name"]: field["value"] for field in reply.embeds[0]["fields"]}
    assert "`/comprehend image:<your picture>`" in fields["Ask"]
    assert fields["This server"] == "Default task: **birds** · 3 tasks"
    assert "About" not in fields


@pytest.mark.context_menu
async def test_describing_the_bots_answer_leaves_the_picture_its_askers_to_forget(scene):
    """The bot posted the picture, but it is the asker's: their /forget-me takes the description too."""
    asked = (await scene.ask("comprehend", image=scene.photo("coffee"), max_new_tokens=2))[0]
    bob = scene.discord.add_member(scene.guild, "bob")
    message = scene.discord.message_json(asked)
    message["attachments"] = [scene.photo("coffee").payload()]  # the answer's picture, as Discord serves it
    payload = scene.discord.context_menu_payload("Describe image", bob, scene.guild, message)
    described = (await (await scene.discord.send_interaction(payload)).answered())[0]
    assert described.embeds
    forgot = (await scene.ask("forget-me"))[0]
    assert forgot.content.startswith("Deleted the pictures and prompts of your 2 recent requests.")
    gone = (await (await click(scene, described, "Prompt", bob)).answered())[0]
    assert gone.content.startswith("This answer's request is no longer stored")
