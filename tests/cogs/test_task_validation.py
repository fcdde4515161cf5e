"""What /manage-tasks refuses, and how it says so: names, templates, example texts and images,
sizes, and what would not fit the model's context."""

from __future__ import annotations

import io

from PIL import Image

import core.tasks.library
from core.prompts import assemble_prompt
from tests.helpers.task_commands import (
    MARKER_HINT,
    NAME_RULE,
    NOT_AN_IMAGE,
    add,
    create,
    example_texts,
    listed,
    pets_with,
    shown,
    too_long,
    unknown,
)
from tests.helpers.world import photo, picture_size, private, small_image


async def test_bad_task_names_are_refused(world):
    for name in ("Bad Name!", "", "a" * 40, "a" * 33, "-leading", "Pets", "café"):
        message = await private(
            world, "manage-tasks create", world.moderator, name=name, template="<image>X:", raw=True
        )
        assert message == f"“{name}” is not a valid task name; use {NAME_RULE}.", name
    assert len(await listed(world)) == 2
    await create(world, name="a" * 32)
    await create(world, name="0_ok-name")


async def test_duplicate_names_are_refused_in_every_spelling(world):
    await pets_with(world, "chelsea")
    exists = "This server already has a task called “pets”; choose another name."
    for name in ("pets", "  pets  "):
        message = await private(world, "manage-tasks create", world.moderator, name=name, template="<image>Again:")
        assert message == exists
    await create(world, name="dogs")
    assert await private(world, "manage-tasks rename", world.moderator, task="dogs", new_name="pets") == exists
    assert await private(world, "manage-tasks copy", world.moderator, task="caption", new_name="pets") == exists
    # Names are lowercase, so a capitalised duplicate is refused by the name rule.
    message = await private(world, "manage-tasks create", world.moderator, name="PETS", template="<image>Again:")
    assert message == f"“PETS” is not a valid task name; use {NAME_RULE}."
    header, examples, _ = await shown(world, "pets")
    assert header["fields"][0]["value"] == "`<image>Pet:`" and len(examples) == 1


def needs_one_marker(markers: int) -> str:
    return (
        f"The prompt template needs exactly one `<image>`, where the picture is read (it has {markers}), "
        "e.g. `<image>Pet:`."
    )


async def test_templates_need_exactly_one_image_marker(world):
    message = await private(world, "manage-tasks create", world.moderator, name="pets", template="What pet is this?")
    assert message == needs_one_marker(0)
    message = await private(world, "manage-tasks create", world.moderator, name="pets", template="<image><image>Pet:")
    assert message == needs_one_marker(2)
    assert len(await listed(world)) == 2

    await create(world)
    message = await private(world, "manage-tasks edit", world.moderator, task="pets", template="Pet:")
    assert message == needs_one_marker(0)
    message = await private(world, "manage-tasks edit", world.moderator, task="pets")
    assert message == "Give a new description or template; nothing changed."
    header, _, _ = await shown(world, "pets")
    assert header["fields"][0]["value"] == "`<image>Pet:`"


async def test_example_texts_must_fit_the_prompt_format(world):
    texts = await pets_with(world, "chelsea")
    mod = world.moderator
    refusals = {
        "<image>Pet:A cat.<image>": f"The example text has 2 <image> markers but 1 image was given; {MARKER_HINT}",
        "Pet:A cat.": f"The example text has 0 <image> markers but 1 image was given; {MARKER_HINT}",
        "<image>Pet:A cat.<|endofchunk|>": "The example text contains the reserved token `<|endofchunk|>`; remove it.",
        "<image>" + "x" * 394: "The example text is 401 characters long; the limit is 400.",
    }
    for text, expected in refusals.items():
        upload = photo(world, "coffee")
        message = await private(world, "manage-tasks add-example", mod, task="pets", image=upload, text=text, raw=True)
        assert message == expected, text
        message = await private(
            world, "manage-tasks edit-example", world.moderator, task="pets", position=1, text=text, raw=True
        )
        assert message == expected, text
    assert await example_texts(world, "pets") == texts


async def test_an_example_image_that_is_not_an_image_is_refused(world):
    await create(world)
    fake = world.discord.upload("notes.png", b"just some text, not a picture", "image/png")
    message = await private(world, "manage-tasks add-example", world.moderator, task="pets", image=fake, text="<image>")
    assert message == NOT_AN_IMAGE
    _, examples, _ = await shown(world, "pets")
    assert examples == []


async def test_long_descriptions_are_refused(world):
    message = await private(
        world,
        "manage-tasks create",
        world.moderator,
        name="pets",
        template="<image>Pet:",
        description="d" * 201,
        raw=True,
    )
    assert message == "The description is 201 characters long; the limit is 200."
    await create(world, description="d" * 200)
    message = await private(world, "manage-tasks edit", world.moderator, task="pets", description="e" * 201, raw=True)
    assert message == "The description is 201 characters long; the limit is 200."
    header, _, _ = await shown(world, "pets")
    assert header["description"] == "d" * 200


async def test_unknown_tasks_are_refused_everywhere(world):
    mod = world.moderator
    assert await private(world, "tasks show", task="nosuch") == unknown("nosuch")
    assert await private(world, "manage-tasks delete", mod, task="nosuch") == unknown("nosuch")
    assert await private(world, "manage-tasks edit", mod, task="nosuch", description="x") == unknown("nosuch")
    assert await private(world, "manage-tasks rename", mod, task="nosuch", new_name="other") == unknown("nosuch")
    assert await private(world, "manage-tasks copy", mod, task="nosuch", new_name="other") == unknown("nosuch")
    assert await private(world, "manage-tasks set-default", mod, task="nosuch") == unknown("nosuch")
    message = await private(
        world, "manage-tasks add-example", mod, task="nosuch", image=photo(world), text="<image>Pet:A cat."
    )
    assert message == unknown("nosuch")
    message = await private(world, "manage-tasks remove-example", mod, task="nosuch", position=1)
    assert message == unknown("nosuch")
    assert await private(world, "comprehend", image=photo(world), task="nosuch") == unknown("nosuch")
    assert len(await listed(world)) == 2


async def test_example_positions_must_exist(world):
    texts = await pets_with(world, "chelsea", "coffee")
    mod = world.moderator
    for position in (0, 3, 99, -1):
        missing = f"Task “pets” has no example {position}; it has 2."
        message = await private(
            world, "manage-tasks edit-example", mod, task="pets", position=position, text="<image>", raw=True
        )
        assert message == missing
        assert (
            await private(world, "manage-tasks remove-example", mod, task="pets", position=position, raw=True)
            == missing
        )
        assert (
            await private(world, "manage-tasks move-example", mod, task="pets", position=position, to=1, raw=True)
            == missing
        )
        assert (
            await private(world, "manage-tasks move-example", mod, task="pets", position=1, to=position, raw=True)
            == missing
        )
    assert await example_texts(world, "pets") == texts


async def test_templates_and_attachments_have_size_limits(world):
    template = "<image>" + "t" * 394
    message = await private(world, "manage-tasks create", world.moderator, name="pets", template=template, raw=True)
    assert message == "The prompt template is 401 characters long; the limit is 400."
    await create(world)
    big = world.discord.upload("huge.png", b"\0" * (26 * 1024 * 1024), "image/png")
    message = await private(world, "manage-tasks add-example", world.moderator, task="pets", image=big, text="<image>")
    assert message == "The file is 26.0 MiB; the limit is 25.0 MiB."
    assert ("GET", f"/cdn/attachments/{big.id}/huge.png") not in world.discord.requests
    archive = world.discord.upload("big.flamingo-task.zip", b"\0" * (25 * 1024 * 1024 + 1), "application/zip")
    message = await private(world, "manage-tasks import", world.moderator, file=archive)
    assert message == "The task file is 26,214,401 bytes; the limit is 26,214,400 bytes."
    assert ("GET", f"/cdn/attachments/{archive.id}/big.flamingo-task.zip") not in world.discord.requests
    empty = world.discord.upload("empty.png", b"", "image/png")
    message = await private(
        world, "manage-tasks add-example", world.moderator, task="pets", image=empty, text="<image>"
    )
    assert message == "The file is empty."
    _, examples, _ = await shown(world, "pets")
    assert examples == []


async def test_examples_must_leave_room_for_the_answer(world, llama_engine):
    await create(world)
    long = "<image>" + "a1 " * 131
    assert len(long) == 400
    await add(world, "pets", small_image(world), long, 1)
    await add(world, "pets", small_image(world), "<image>Pet:A cat.", 2)
    room = llama_engine.rules.context_length - world.bot.settings.generation.max_new_tokens_default
    tokens = llama_engine.rules.count_tokens(
        assemble_prompt([long.strip(), "<image>Pet:A cat.", long.strip()], "<image>Pet:")
    )
    assert tokens > room
    message = await private(
        world, "manage-tasks add-example", world.moderator, task="pets", image=small_image(world), text=long
    )
    assert message == too_long(tokens, room)
    tokens = llama_engine.rules.count_tokens(assemble_prompt([long.strip(), long.strip()], "<image>Pet:"))
    message = await private(world, "manage-tasks edit-example", world.moderator, task="pets", position=2, text=long)
    assert message == too_long(tokens, room)
    template = "<image>" + "b2 " * 131
    tokens = llama_engine.rules.count_tokens(assemble_prompt([long.strip(), "<image>Pet:A cat."], template.strip()))
    message = await private(world, "manage-tasks edit", world.moderator, task="pets", template=template)
    assert message == too_long(tokens, room)
    assert await example_texts(world, "pets") == [long.strip(), "<image>Pet:A cat."]
    header, _, _ = await shown(world, "pets")
    assert header["fields"][0]["value"] == "`<image>Pet:`"


async def test_descriptions_are_shown_as_written_not_as_markdown(world):
    await create(world, description="*not bold* and _not italic_")
    assert (await listed(world))[2] == r"**pets** (this server, 0 examples): \*not bold\* and \_not italic\_"
    header, _, _ = await shown(world, "pets")
    assert header["description"] == r"\*not bold\* and \_not italic\_"


async def test_backticks_in_templates_and_examples_cannot_break_out_of_their_code_spans(world):
    """Else the rest of the text renders as markdown: a bold notice with a masked link, to every reader."""
    lure = "` **Official notice:** [verify your account](https://evil.example) `"
    await create(world, template=f"<image>Pet:{lure}")
    await add(world, "pets", photo(world), f"<image>Pet:{lure}", 1)
    header, [example], _ = await shown(world, "pets")
    swapped = lure.replace("`", "ˋ")
    assert header["fields"][0]["value"] == f"`<image>Pet:{swapped}`"
    assert example["description"] == f"`<image>Pet:{swapped}`"


async def test_a_very_long_name_is_refused_with_its_reason_within_discords_message_limit(world):
    """Discord accepts option values of 6000 characters; a refusal quoting one was cut before its reason."""
    long_name = "x" * 3000
    shown = "“" + "x" * 99 + "…”"
    assert await private(world, "tasks show", task=long_name) == unknown(shown[1:-1])
    message = await private(
        world, "manage-tasks create", world.moderator, name=long_name, template="<image>Pet:", raw=True
    )
    assert message == f"{shown} is not a valid task name; use {NAME_RULE}."


async def test_show_sends_previews_of_large_examples_not_the_stored_images(world):
    """Anyone may ask, as often as they like: eight tall examples were 13 MB a time."""
    buffer = io.BytesIO()
    Image.effect_noise((900, 3000), 60).convert("RGB").save(buffer, format="PNG")
    tall = world.discord.upload("tall.png", buffer.getvalue(), "image/png")
    await create(world)
    await add(world, "pets", tall, "<image>Pet:A tall one.", 1)
    stored = (await world.bot.store.get_task(world.guild.id, "pets")).examples[0].image
    _, _, files = await shown(world, "pets")
    assert picture_size(stored) == (448, 1493)
    assert picture_size(files["example-1.jpg"]) == (192, 640)
    assert len(files["example-1.jpg"]) < len(stored) / 4


async def test_a_long_task_list_is_shortened_to_fit_one_embed(world):
    for index in range(20):
        await create(world, name=f"task-{index:02}", template="<image>X:", description=f"{index:02}" + "d" * 198)
    lines = await listed(world)
    assert len("\n".join(lines)) <= 4096
    shown_tasks = [line for line in lines if line.startswith("**")]
    assert lines[-1] == f"… and {22 - len(shown_tasks)} more"
    assert 2 < len(shown_tasks) < 22
    assert shown_tasks[-1].startswith(f"**task-{len(shown_tasks) - 3:02}** (this server, 0 examples): ")


async def test_a_server_holds_at_most_fifty_tasks(world):
    for index in range(50):
        await create(world, name=f"t{index}", template="<image>X:")
    full = "This server already has 50 tasks, the most it may have; delete one first."
    assert await private(world, "manage-tasks create", world.moderator, name="one-more", template="<image>X:") == full
    assert await private(world, "manage-tasks copy", world.moderator, task="caption", new_name="one-more") == full
    await private(world, "manage-tasks delete", world.moderator, task="t0")
    await create(world, name="one-more", template="<image>X:")


async def test_a_servers_task_images_are_bounded_in_bytes_and_list_shows_the_room(world, monkeypatch):
    """Counts alone let a server store 400 strip-shaped photos of 1.5 MiB each."""
    library, store, guild_id = world.bot.library, world.bot.store, world.guild.id
    library.limits = library.limits.model_copy(update={"max_task_images_mb": 0.1})  # 102 KiB
    await pets_with(world, "chelsea", "coffee")  # 32 and 67 KiB once stored
    used = await store.image_bytes(guild_id)
    messages = await world.reply("tasks list")
    assert messages[0].embeds[0]["footer"]["text"] == (
        f"This server's tasks: 1 of 50 · their images: {used / 1024:.0f} KiB of 102 KiB"
    )
    left = round(0.1 * 2**20) - used
    refusal = f"This server's task images may take 102 KiB in all; {left / 1024:.0f} KiB is left, and these need"

    async def add_refused(name: str) -> str:
        return await private(
            world,
            "manage-tasks add-example",
            world.moderator,
            task="pets",
            image=photo(world, name),
            text="<image>P:x.",
        )

    message = await add_refused("rocket")
    assert message.startswith(refusal) and message.endswith(" KiB. Remove some examples or tasks first.")
    message = await private(world, "manage-tasks copy", world.moderator, task="caption", new_name="mine")
    assert message.startswith(refusal)
    assert len(await listed(world)) == 3 and await store.image_bytes(guild_id) == used
    assert await private(world, "manage-tasks remove-example", world.moderator, task="pets", position=2) == (
        "Removed example 2 from **pets**."
    )
    await add(world, "pets", photo(world, "rocket"), "<image>Pet:a rocket.", 2)

    # Full: refused before the upload is decoded, which a server could otherwise repeat for nothing.
    library.limits = library.limits.model_copy(update={"max_task_images_mb": 0.01})
    decoded = []

    async def decode(upload, settings):
        decoded.append(upload)

    monkeypatch.setattr(core.tasks.library, "stored_image", decode)
    message = await add_refused("coffee")
    assert message == (
        "This server's task images already take all of the 10 KiB they may; remove some examples or tasks first."
    )
    assert decoded == []
