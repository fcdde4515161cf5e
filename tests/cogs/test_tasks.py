"""/tasks and /manage-tasks as people meet them: what they see, what they may change, and what is refused."""

from __future__ import annotations

from core.config import ImageSettings
from core.generation import GenerationParams
from core.images import load_image
from core.prompts import Example, Task
from tests.fake_discord.payloads import MANAGE_GUILD
from tests.helpers.task_commands import add, create, example_texts, listed, pets_with, shown, unknown
from tests.helpers.world import photo, picture_size, private, small_image

# The photos keep their size when stored (short side at most 448), so a thumbnail's size tells which photo it is.
PHOTO_SIZES = {"chelsea": (451, 300), "coffee": (600, 400), "rocket": (640, 427)}
NEEDS_MANAGE_SERVER = "You need the Manage Server permission in this server to do that."
READ_ONLY = "is a built-in task and cannot be changed; copy it to make your own."
CAPTION_TEXTS = [
    "<image>Output:An astronaut in an orange spacesuit smiling in front of an American flag and a model of the "
    "space shuttle.",
    "<image>Output:A red cup of espresso with a spoon on a saucer on a wooden table.",
    "<image>Output:A close up of a tabby cat with green eyes.",
    "<image>Output:A rocket standing on its launch pad between lightning towers at dusk.",
]


async def footer_task(world, **options) -> str:
    """The footer of the public /comprehend answer."""
    messages = await world.reply("comprehend", image=photo(world, "rocket"), max_new_tokens=2, **options)
    assert len(messages) == 1 and not messages[0].ephemeral
    return messages[0].embeds[0]["footer"]["text"]


# Creating, browsing, showing


async def test_a_moderator_builds_a_task_with_photos_and_readers_browse_it(world):
    texts = await pets_with(world, "chelsea", "coffee")

    lines = await listed(world)
    assert len(lines) == 3
    assert lines[0].startswith("**caption** (built-in, 4 examples): A short description of the image")
    assert lines[0].endswith(" · *default*")
    assert lines[1].startswith("**vqa** (built-in, 4 examples): ")
    assert lines[2] == "**pets** (this server, 2 examples): Names the pet"

    header, examples, files = await shown(world, "pets")
    assert header["title"] == "pets"
    assert header["description"] == "Names the pet"
    assert header["fields"] == [{"name": "Prompt template", "value": "`<image>Pet:`", "inline": False}]
    assert header["footer"]["text"] == "this server's · 2 examples"
    assert len(examples) == 2
    for position, (embed, text) in enumerate(zip(examples, texts, strict=True), 1):
        assert embed["author"]["name"] == f"Example {position}"
        assert embed["description"] == f"`{text}`"
        assert embed["thumbnail"]["url"] == f"attachment://example-{position}.jpg"
    assert sorted(files) == ["example-1.jpg", "example-2.jpg"]
    assert picture_size(files["example-1.jpg"]) == PHOTO_SIZES["chelsea"]
    assert picture_size(files["example-2.jpg"]) == PHOTO_SIZES["coffee"]


async def test_task_names_are_found_whatever_their_case(world):
    await pets_with(world, "chelsea")
    header, examples, _ = await shown(world, "PETS")
    assert header["title"] == "pets" and len(examples) == 1
    assert header["footer"]["text"] == "this server's · 1 example"
    header, _, _ = await shown(world, "Caption")
    assert header["title"] == "caption"


async def test_task_names_are_found_with_stray_spaces_like_built_in_ones(world):
    """Names are stripped when created and when a built-in is looked up, so a server task's lookup should strip too."""
    await pets_with(world, "chelsea")
    header, _, _ = await shown(world, " caption ")
    assert header["title"] == "caption"
    header, examples, _ = await shown(world, " pets ")
    assert header["title"] == "pets" and len(examples) == 1
    assert (await footer_task(world, task=" pets ")).startswith("task: pets · ")
    assert await private(world, "manage-tasks delete", world.moderator, task=" pets ") == "Deleted **pets**."


async def test_a_new_task_without_examples_shows_only_its_header(world):
    await create(world, name="empty", template="<image>Say:")
    header, examples, files = await shown(world, "empty")
    assert header["footer"]["text"] == "this server's · 0 examples"
    assert header["fields"][0]["value"] == "`<image>Say:`"
    assert examples == [] and files == {}
    assert "**empty** (this server, 0 examples): " in await listed(world)


async def test_built_in_tasks_show_their_photos_as_read_only(world):
    header, examples, files = await shown(world, "caption")
    assert header["footer"]["text"] == "built-in, read-only · 4 examples"
    assert header["fields"][0]["value"] == "`<image>Output:`"
    assert [e["description"] for e in examples] == [f"`{t}`" for t in CAPTION_TEXTS]
    assert [e["thumbnail"]["url"] for e in examples] == [f"attachment://example-{i}.jpg" for i in range(1, 5)]
    assert sorted(files) == [f"example-{i}.jpg" for i in range(1, 5)]
    assert all(data.startswith(b"\xff\xd8") for data in files.values())
    assert picture_size(files["example-1.jpg"]) == (448, 448)  # the 512 by 512 astronaut, shrunk for storage


# Changing examples


async def test_examples_are_edited_moved_and_removed_in_order(world):
    first, _, third = await pets_with(world, "chelsea", "coffee", "rocket")

    edited = "<image>Pet:No pet here, only coffee."
    message = await private(world, "manage-tasks edit-example", world.moderator, task="pets", position=2, text=edited)
    assert message == "Changed example 2 of **pets**."
    assert await example_texts(world, "pets") == [first, edited, third]

    message = await private(world, "manage-tasks move-example", world.moderator, task="pets", position=3, to=1)
    assert message == "Moved example 3 of **pets** to position 1."
    assert await example_texts(world, "pets") == [third, first, edited]
    _, _, files = await shown(world, "pets")
    assert [picture_size(files[f"example-{i}.jpg"]) for i in (1, 2, 3)] == [
        PHOTO_SIZES["rocket"],
        PHOTO_SIZES["chelsea"],
        PHOTO_SIZES["coffee"],
    ]

    message = await private(world, "manage-tasks move-example", world.moderator, task="pets", position=1, to=3)
    assert message == "Moved example 1 of **pets** to position 3."
    assert await example_texts(world, "pets") == [first, edited, third]
    message = await private(world, "manage-tasks move-example", world.moderator, task="pets", position=2, to=2)
    assert message == "Example 2 is already at position 2; nothing changed."

    message = await private(world, "manage-tasks remove-example", world.moderator, task="pets", position=1)
    assert message == "Removed example 1 from **pets**."
    header, examples, files = await shown(world, "pets")
    assert [e["description"] for e in examples] == [f"`{edited}`", f"`{third}`"]
    assert [e["author"]["name"] for e in examples] == ["Example 1", "Example 2"]
    assert header["footer"]["text"] == "this server's · 2 examples"
    assert sorted(files) == ["example-1.jpg", "example-2.jpg"]
    assert picture_size(files["example-1.jpg"]) == PHOTO_SIZES["coffee"]
    assert picture_size(files["example-2.jpg"]) == PHOTO_SIZES["rocket"]
    assert "**pets** (this server, 2 examples): Names the pet" in await listed(world)


async def test_edit_changes_the_description_and_the_template(world):
    await pets_with(world, "chelsea")
    message = await private(world, "manage-tasks edit", world.moderator, task="pets", description="Who is this?")
    assert message == "Updated **pets**."
    header, _, _ = await shown(world, "pets")
    assert header["description"] == "Who is this?"
    assert header["fields"][0]["value"] == "`<image>Pet:`"

    message = await private(world, "manage-tasks edit", world.moderator, task="pets", template="<image>Animal:")
    assert message == "Updated **pets**."
    header, examples, _ = await shown(world, "pets")
    assert header["description"] == "Who is this?"
    assert header["fields"][0]["value"] == "`<image>Animal:`"
    assert len(examples) == 1
    assert "**pets** (this server, 1 example): Who is this?" in await listed(world)


async def test_rename_moves_the_task_to_its_new_name(world):
    texts = await pets_with(world, "chelsea", "coffee")
    message = await private(world, "manage-tasks rename", world.moderator, task="pets", new_name="animals")
    assert message == "Renamed **pets** to **animals**."
    assert await private(world, "tasks show", task="pets") == unknown("pets")
    assert await example_texts(world, "animals") == texts
    lines = await listed(world)
    assert "**animals** (this server, 2 examples): Names the pet" in lines
    assert not any("**pets**" in line for line in lines)
    await create(world, name="pets", template="<image>New:")  # the old name is free again


async def test_delete_removes_the_task_and_its_examples(world):
    await pets_with(world, "chelsea")
    assert await private(world, "manage-tasks delete", world.moderator, task="pets") == "Deleted **pets**."
    assert await private(world, "tasks show", task="pets") == unknown("pets")
    assert len(await listed(world)) == 2
    await create(world)
    _, examples, _ = await shown(world, "pets")
    assert examples == []


async def test_the_default_task_is_used_by_comprehend_and_follows_renames(world):
    await pets_with(world, "chelsea")
    assert (await footer_task(world)).startswith("task: caption · ")

    message = await private(world, "manage-tasks set-default", world.moderator, task="pets")
    assert message == "The default task is now **pets**."
    lines = await listed(world)
    assert not lines[0].endswith("*default*")
    assert lines[2] == "**pets** (this server, 1 example): Names the pet · *default*"
    assert (await footer_task(world)).startswith("task: pets · ")
    assert (await footer_task(world, task="vqa")).startswith("task: vqa · ")

    await private(world, "manage-tasks rename", world.moderator, task="pets", new_name="animals")
    assert (await footer_task(world)).startswith("task: animals · ")

    message = await private(world, "manage-tasks delete", world.moderator, task="animals")
    assert message == "Deleted **animals**; the default task is now **caption**."
    assert (await footer_task(world)).startswith("task: caption · ")

    await private(world, "manage-tasks set-default", world.moderator, task="vqa")
    assert (await footer_task(world)).startswith("task: vqa · ")
    message = await private(world, "manage-tasks set-default", world.moderator)
    assert message == "The default task is now **caption**."
    assert (await footer_task(world)).startswith("task: caption · ")


async def test_copying_a_built_in_task_gives_an_editable_task_with_its_examples(world):
    message = await private(world, "manage-tasks copy", world.moderator, task="caption", new_name="my-captions")
    assert message == "Copied **caption** to **my-captions**."
    header, examples, files = await shown(world, "my-captions")
    assert header["footer"]["text"] == "this server's · 4 examples"
    assert header["fields"][0]["value"] == "`<image>Output:`"
    assert header["description"].startswith("A short description of the image")
    assert [e["description"] for e in examples] == [f"`{t}`" for t in CAPTION_TEXTS]
    assert sorted(files) == [f"example-{i}.jpg" for i in range(1, 5)]
    assert all(data.startswith(b"\xff\xd8") for data in files.values())

    await add(world, "my-captions", photo(world, "chelsea"), "<image>Output:A cat.", 5)
    assert any(line.startswith("**my-captions** (this server, 5 examples): ") for line in await listed(world))
    _, examples, _ = await shown(world, "caption")
    assert len(examples) == 4


async def test_copying_a_server_task_makes_an_independent_copy(world):
    texts = await pets_with(world, "chelsea", "coffee")
    message = await private(world, "manage-tasks copy", world.moderator, task="pets", new_name="pets-v2")
    assert message == "Copied **pets** to **pets-v2**."
    header, _, files = await shown(world, "pets-v2")
    assert header["description"] == "Names the pet"
    assert header["fields"][0]["value"] == "`<image>Pet:`"
    assert await example_texts(world, "pets-v2") == texts
    _, _, original_files = await shown(world, "pets")
    assert files == original_files

    await private(world, "manage-tasks remove-example", world.moderator, task="pets-v2", position=1)
    assert await example_texts(world, "pets") == texts
    assert await example_texts(world, "pets-v2") == texts[1:]


# Permissions


async def test_readers_cannot_change_tasks_and_nothing_changes(world):
    await pets_with(world, "chelsea")
    before = await listed(world)
    upload = photo(world, "coffee")
    attempts = [
        ("manage-tasks create", {"name": "mine", "template": "<image>Mine:"}),
        ("manage-tasks delete", {"task": "pets"}),
        ("manage-tasks add-example", {"task": "pets", "image": upload, "text": "<image>Pet:Coffee."}),
        ("manage-tasks edit-example", {"task": "pets", "position": 1, "text": "<image>Pet:Changed."}),
        ("manage-tasks remove-example", {"task": "pets", "position": 1}),
        ("manage-tasks move-example", {"task": "pets", "position": 1, "to": 1}),
        ("manage-tasks edit", {"task": "pets", "description": "Hijacked"}),
        ("manage-tasks rename", {"task": "pets", "new_name": "stolen"}),
        ("manage-tasks copy", {"task": "caption", "new_name": "mine"}),
        ("manage-tasks set-default", {"task": "pets"}),
    ]
    for command, options in attempts:
        assert await private(world, command, world.member, **options) == NEEDS_MANAGE_SERVER, command

    assert await listed(world) == before
    assert await listed(world, world.member) == before
    header, examples, _ = await shown(world, "pets", world.member)
    assert header["description"] == "Names the pet"
    assert [e["description"] for e in examples] == ["`<image>Pet:Picture 1 is chelsea.`"]
    assert ("GET", f"/cdn/attachments/{upload.id}/coffee.jpg") not in world.discord.requests
    assert (await footer_task(world)).startswith("task: caption · ")


async def test_managing_tasks_needs_a_server(world):
    message = await private(world, "manage-tasks create", guild=None, name="mine", template="<image>Mine:", raw=True)
    assert message == "This command only works in a server."
    lines = await listed(world, guild=None)
    assert [line.split(" (")[0] for line in lines] == ["**caption**", "**vqa**"]


# Built-in tasks are read-only


async def test_built_in_tasks_cannot_be_changed_only_copied(world):
    attempts = [
        ("manage-tasks add-example", {"image": photo(world), "text": "<image>Output:A cat."}),
        ("manage-tasks edit", {"description": "Mine now"}),
        ("manage-tasks edit-example", {"position": 1, "text": "<image>Output:Changed."}),
        ("manage-tasks remove-example", {"position": 1}),
        ("manage-tasks move-example", {"position": 1, "to": 2}),
    ]
    for command, options in attempts:
        message = await private(world, command, world.moderator, task="caption", **options)
        assert message == f"“caption” {READ_ONLY}", command
    deleted = await private(world, "manage-tasks delete", world.moderator, task="VQA")
    assert deleted == "“VQA” is a built-in task and cannot be deleted: every server has it."
    renamed = await private(world, "manage-tasks rename", world.moderator, task="caption", new_name="captions")
    assert renamed == "“caption” is a built-in task and cannot be renamed; copy it under the name you want."

    _, examples, _ = await shown(world, "caption")
    assert [e["description"] for e in examples] == [f"`{t}`" for t in CAPTION_TEXTS]
    assert len(await listed(world)) == 2


async def test_built_in_names_cannot_be_taken(world):
    refused = "“caption” is the name of a built-in task; choose another."
    message = await private(world, "manage-tasks create", world.moderator, name="caption", template="<image>Mine:")
    assert message == refused
    await create(world)
    message = await private(world, "manage-tasks rename", world.moderator, task="pets", new_name="caption")
    assert message == refused
    message = await private(world, "manage-tasks copy", world.moderator, task="pets", new_name="vqa")
    assert message == "“vqa” is the name of a built-in task; choose another."
    lines = await listed(world)
    assert [line.split(" (")[0] for line in lines] == ["**caption**", "**vqa**", "**pets**"]


# Guilds


async def test_each_server_has_its_own_tasks(world):
    await pets_with(world, "chelsea")
    other = world.discord.add_guild("Other")
    other_mod = world.discord.add_member(other, "other-mod", permissions=MANAGE_GUILD | (1 << 31))

    lines = await listed(world, other_mod, other)
    assert [line.split(" (")[0] for line in lines] == ["**caption**", "**vqa**"]
    assert await private(world, "tasks show", other_mod, other, task="pets") == unknown("pets")
    assert await private(world, "comprehend", other_mod, other, image=photo(world), task="pets") == unknown("pets")
    assert await private(world, "manage-tasks delete", other_mod, other, task="pets") == unknown("pets")
    message = await private(
        world, "manage-tasks add-example", other_mod, other, task="pets", image=photo(world), text="<image>Pet:X."
    )
    assert message == unknown("pets")
    assert await private(world, "manage-tasks copy", other_mod, other, task="pets", new_name="mine") == unknown("pets")
    assert await private(world, "manage-tasks set-default", other_mod, other, task="pets") == unknown("pets")

    message = await private(
        world, "manage-tasks create", other_mod, other, name="pets", template="<image>Theirs:", description="Theirs"
    )
    assert message == "Created task **pets**. Add examples with `/manage-tasks add-example`."
    header, examples, _ = await shown(world, "pets", other_mod, other)
    assert header["description"] == "Theirs" and examples == []
    assert (await listed(world, other_mod, other))[2] == "**pets** (this server, 0 examples): Theirs"

    assert await private(world, "manage-tasks delete", other_mod, other, task="pets") == "Deleted **pets**."
    header, examples, _ = await shown(world, "pets")
    assert header["description"] == "Names the pet"
    assert header["fields"][0]["value"] == "`<image>Pet:`"
    assert len(examples) == 1


async def test_a_default_task_in_one_server_does_not_change_another(world):
    await pets_with(world, "chelsea")
    await private(world, "manage-tasks set-default", world.moderator, task="pets")
    other = world.discord.add_guild("Other")
    reader = world.discord.add_member(other, "other-reader")
    messages = await world.reply("comprehend", reader, other, image=photo(world, "rocket"), max_new_tokens=2)
    assert messages[0].embeds[0]["footer"]["text"].startswith("task: caption · ")


# Caps


async def test_a_task_holds_at_most_eight_examples(world):
    await create(world, name="colours", template="<image>Colour:")
    for position in range(1, 9):
        await add(world, "colours", small_image(world, position * 20), f"<image>Colour:Shade {position}.", position)
    message = await private(
        world, "manage-tasks add-example", world.moderator, task="colours", image=small_image(world), text="<image>C:9."
    )
    assert message == "Task “colours” already has 8 examples, the most a task may have."
    assert "**colours** (this server, 8 examples): " in await listed(world)
    header, examples, files = await shown(world, "colours")
    assert header["footer"]["text"] == "this server's · 8 examples"
    assert len(examples) == 8 and len(files) == 8
    assert all(picture_size(data) == (12, 8) for data in files.values())


async def test_changes_made_at_the_same_moment_still_respect_the_caps(world, monkeypatch):
    monkeypatch.setattr(world.bot.settings.quotas, "task_uploads_in_flight", 2)  # one at a time by default
    await create(world, name="colours", template="<image>Colour:")
    for position in range(1, 8):
        await add(world, "colours", small_image(world, position * 20), f"<image>Colour:Shade {position}.", position)
    records = [
        world.invoke(
            "manage-tasks add-example", world.moderator, task="colours", image=small_image(world), text="<image>C:8."
        )
        for _ in range(2)
    ]
    answers = sorted([(await record.answered())[0].content for record in records])
    assert answers == [
        "Added example 8 to **colours**.",
        "Task “colours” already has 8 examples, the most a task may have.",
    ]

    records = [
        world.invoke("manage-tasks create", world.moderator, name="twins", template="<image>T:") for _ in range(2)
    ]
    answers = sorted([(await record.answered())[0].content for record in records])
    assert answers == [
        "Created task **twins**. Add examples with `/manage-tasks add-example`.",
        "This server already has a task called “twins”; choose another name.",
    ]


# The answer


async def test_comprehend_with_a_server_task_reads_its_stored_examples(world, llama_engine, photos):
    texts = await pets_with(world, "chelsea", "coffee")
    messages = await world.reply("comprehend", image=photo(world, "rocket"), task="pets", max_new_tokens=6)
    assert len(messages) == 1 and not messages[0].ephemeral
    embed = messages[0].embeds[0]
    assert embed["footer"]["text"].startswith("task: pets · ")
    assert embed["fields"][0]["value"] == "<image>Pet:"

    _, _, files = await shown(world, "pets")
    stored = [load_image(files[f"example-{i}.jpg"], ImageSettings()) for i in (1, 2)]
    examples = tuple(Example(image, text) for image, text in zip(stored, texts, strict=True))
    task = Task("pets", "Names the pet", "<image>Pet:", examples)
    request = llama_engine.prepare([photos["rocket"]], "<image>Pet:", task, GenerationParams(max_new_tokens=6))
    assert request.prompt == f"{texts[0]}<|endofchunk|>{texts[1]}<|endofchunk|><image>Pet:"
    expected = llama_engine.run(request)
    assert embed["description"] == (expected.text or "*(the model gave an empty answer)*")
    # The comparison means something: without the examples this model answers differently.
    bare = Task("pets", "", "<image>Pet:")
    params = GenerationParams(max_new_tokens=6)
    without = llama_engine.run(llama_engine.prepare([photos["rocket"]], "<image>Pet:", bare, params))
    assert without.text != expected.text
