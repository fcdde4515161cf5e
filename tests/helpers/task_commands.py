"""/tasks and /manage-tasks as the cogs' tests drive them: what refusals say, and the steps that build a task."""

from __future__ import annotations

from tests.helpers.world import photo, private

NAME_RULE = "1 to 32 characters: lowercase letters, digits, '-' and '_', starting with a letter or digit"
MARKER_HINT = "put one `<image>` where each image should be read."
NOT_AN_IMAGE = "This file is not an image I can read; send a JPEG, PNG, WebP, GIF, BMP or TIFF file."


def unknown(name: str) -> str:
    return (
        f"There is no task called “{name}” here; the built-in tasks are caption, vqa, "
        "and /tasks list shows this server's."
    )


def too_long(tokens: int, room: int) -> str:
    return (
        f"Task “pets” would need {tokens} tokens before the answer; the model leaves room for {room}. "
        "Shorten the examples or remove one."
    )


async def listed(world, member=None, guild="default") -> list[str]:
    """The lines of the private /tasks list embed."""
    messages = await world.reply("tasks list", member, guild)
    assert len(messages) == 1 and messages[0].ephemeral
    assert not messages[0].content
    [embed] = messages[0].embeds
    assert embed["title"] == "Tasks"
    return embed["description"].split("\n")


async def shown(world, task: str, member=None, guild="default"):
    """The private /tasks show message: (header embed, example embeds, files)."""
    messages = await world.reply("tasks show", member, guild, task=task)
    assert len(messages) == 1 and messages[0].ephemeral
    assert messages[0].embeds, messages[0].content
    header, *examples = messages[0].embeds
    return header, examples, messages[0].files


async def example_texts(world, task: str) -> list[str]:
    _, examples, _ = await shown(world, task)
    assert [e["author"]["name"] for e in examples] == [f"Example {i}" for i in range(1, len(examples) + 1)]
    return [e["description"].removeprefix("`").removesuffix("`") for e in examples]


async def create(world, name: str = "pets", template: str = "<image>Pet:", **options) -> None:
    message = await private(world, "manage-tasks create", world.moderator, name=name, template=template, **options)
    assert message == f"Created task **{name}**. Add examples with `/manage-tasks add-example`."


async def add(world, task: str, image, text: str, position: int) -> None:
    message = await private(world, "manage-tasks add-example", world.moderator, task=task, image=image, text=text)
    assert message == f"Added example {position} to **{task}**."


async def pets_with(world, *names: str) -> list[str]:
    """A server task ``pets`` with one example per named photo; returns the example texts."""
    await create(world, description="Names the pet")
    texts = [f"<image>Pet:Picture {i} is {name}." for i, name in enumerate(names, 1)]
    for position, (name, text) in enumerate(zip(names, texts, strict=True), 1):
        await add(world, "pets", photo(world, name), text, position)
    return texts
