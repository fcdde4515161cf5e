"""/settings: where the bot answers, who may use it, and whether answers are public."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.e2e import E2E, click

pytestmark = E2E


def _fields(message) -> dict[str, str]:
    return {field["name"]: field["value"] for field in message.embeds[0]["fields"]}


@pytest.mark.settings
async def test_answer_channels_limit_where_the_bot_answers(scene):
    general = scene.guild.channels[0]
    bots = await scene.discord.add_channel(scene.guild, "bots")
    added = (await scene.ask("settings channels add", scene.moderator, channel=bots))[0]
    assert added.ephemeral and added.content == f"Added <#{bots.id}>."
    assert _fields(added)["Answers in"] == f"<#{bots.id}>"

    refused = await scene.ask("comprehend", image=scene.photo(), in_channel=general)
    assert [(m.content, m.ephemeral) for m in refused] == [(f"I only answer in <#{bots.id}> on this server.", True)]
    answered = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2, in_channel=bots))[0]
    assert answered.embeds and not answered.ephemeral

    chat = await scene.discord.add_channel(scene.guild, "chat")
    await scene.ask("settings channels add", scene.moderator, channel=chat)
    twice = (await scene.ask("settings channels add", scene.moderator, channel=chat))[0]
    assert twice.ephemeral and twice.content == f"<#{chat.id}> is already on the list; nothing changed."
    removed = (await scene.ask("settings channels remove", scene.moderator, channel=bots))[0]
    assert removed.content == f"Removed <#{bots.id}>." and _fields(removed)["Answers in"] == f"<#{chat.id}>"
    refused = await scene.ask("comprehend", image=scene.photo(), in_channel=bots)
    assert [(m.content, m.ephemeral) for m in refused] == [(f"I only answer in <#{chat.id}> on this server.", True)]
    again = (await scene.ask("settings channels remove", scene.moderator, channel=bots))[0]
    assert again.content == f"<#{bots.id}> is not on the list (I answer only in the listed channels); nothing changed."
    cleared = (await scene.ask("settings channels clear", scene.moderator))[0]
    assert cleared.content == "I answer in every channel now."
    assert _fields(cleared)["Answers in"] == "every channel"
    assert (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2, in_channel=general))[0].embeds

    for command, options in [("settings show", {}), ("settings channels add", {"channel": bots})]:
        denied = await scene.ask(command, **options)
        assert denied[0].content == "You need the Manage Server permission in this server to do that."
    assert _fields((await scene.ask("settings show", scene.moderator))[0])["Answers in"] == "every channel"


@pytest.mark.settings
async def test_a_required_role_and_private_answers(scene):
    artists = await scene.discord.add_role(scene.guild, "artists")
    set_role = (await scene.ask("settings role", scene.moderator, role=artists))[0]
    assert set_role.content == f"Members need <@&{artists.id}> to use the bot."

    refused = await scene.ask("comprehend", image=scene.photo())
    assert [(m.content, m.ephemeral) for m in refused] == [
        (f"You need the <@&{artists.id}> role to use the bot on this server.", True)
    ]
    artist = scene.discord.add_member(scene.guild, "artist")
    artist.roles.append(artists.id)
    answer = (await scene.ask("comprehend", artist, image=scene.photo(), max_new_tokens=2))[0]
    assert answer.embeds
    rerolled = await (await click(scene, answer, "Re-roll")).answered()  # the reader has not the role
    assert [(m.content, m.ephemeral) for m in rerolled] == [
        (f"You need the <@&{artists.id}> role to use the bot on this server.", True)
    ]
    assert (await scene.ask("comprehend", scene.moderator, image=scene.photo(), max_new_tokens=2))[0].embeds

    private = (await scene.ask("settings answers", scene.moderator, visibility="private"))[0]
    assert private.content == "Answers are now seen only by the asker."
    hidden = (await scene.ask("comprehend", artist, image=scene.photo(), max_new_tokens=2))[0]
    assert hidden.ephemeral and hidden.embeds

    shown = _fields((await scene.ask("settings show", scene.moderator))[0])
    assert shown["Answers are"] == "private to the asker"
    assert shown["Required role"] == f"<@&{artists.id}>"  # it exists: no warning
    assert shown["Default task"] == "**caption** (`/manage-tasks set-default`)"

    await scene.ask("settings role", scene.moderator)
    await scene.ask("settings answers", scene.moderator, visibility="public")
    assert not (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2))[0].ephemeral


@pytest.mark.settings
async def test_deleted_roles_and_channels_keep_restricting_and_the_refusals_say_why(scene):
    """Deleting #bots must not open every channel, nor deleting the required role let everyone in;
    a deleted report channel is simply no longer set."""
    artists = await scene.discord.add_role(scene.guild, "artists")
    bots = await scene.discord.add_channel(scene.guild, "bots")
    chat = await scene.discord.add_channel(scene.guild, "chat")
    mods = await scene.discord.add_channel(scene.guild, "mods")
    await scene.ask("settings role", scene.moderator, role=artists)
    for channel in (bots, chat):
        await scene.ask("settings channels add", scene.moderator, channel=channel)
    await scene.ask("settings reports", scene.moderator, channel=mods)
    for channel in (mods, chat, bots):
        await scene.discord.remove_channel(scene.guild, channel)
    await scene.discord.remove_role(scene.guild, artists)

    settled = {
        "Answers in": (
            f"<#{bots.id}> (deleted)\n⚠️ Nobody can use the bot until you add a channel or run "
            "`/settings channels clear`."
        ),
        "Reports go to": "not set",
        "Required role": (
            f"<@&{artists.id}> (deleted)\n⚠️ Only members with Manage Server can use the bot until you choose another."
        ),
    }
    for _ in range(50):  # the bot handles the deletions as they arrive, beside the commands
        shown = _fields((await scene.ask("settings show", scene.moderator))[0])
        if all(shown[name] == value for name, value in settled.items()):
            break
        await asyncio.sleep(0.1)
    assert {name: shown[name] for name in settled} == settled
    refused = (await scene.ask("comprehend", image=scene.photo()))[0]
    assert refused.content == (
        "The channels this server lets me answer in were deleted; a moderator can add others with "
        "/settings channels add, or let me answer everywhere with /settings channels clear."
    )
    await scene.ask("settings channels clear", scene.moderator)
    refused = (await scene.ask("comprehend", image=scene.photo()))[0]
    assert refused.content == (
        "The role this server requires was deleted; a moderator can choose another with /settings role."
    )


@pytest.mark.settings
async def test_in_process_the_model_cannot_be_switched_and_the_reason_is_given(scene):
    payload = scene.discord.autocomplete_payload("settings model", scene.moderator, scene.guild, "model", model="")
    record = await scene.discord.send_interaction(payload)
    await record.wait_for(lambda: record.choices is not None, timeout=30)
    offered = [choice["name"] for choice in record.choices]
    assert offered[0] == "llama (the default, always loaded)"
    assert "OpenFlamingo-9B-vitl-mpt7b (cannot run here)" in offered

    refused = (await scene.ask("settings model", scene.moderator, model="OpenFlamingo-9B-vitl-mpt7b"))[0]
    assert refused.ephemeral and refused.content == (
        "This bot runs one model in its own process (llama), so it cannot switch. "
        "Servers can choose other models only when the bot runs its models on a Ray cluster."
    )
    unknown = (await scene.ask("settings model", scene.moderator, model="gpt-4"))[0]
    assert unknown.content.startswith("There is no model called “gpt-4” here; choose one of: llama.")
    kept = (await scene.ask("settings model", scene.moderator))[0]
    assert kept.content == "This server's answers now come from llama (the default, always loaded)."
    assert _fields(kept)["Model"] == "llama (the default, always loaded)"


@pytest.mark.settings
async def test_the_role_and_channels_cover_the_task_library_too(scene):
    """A member kept from asking is kept from listing, showing, exporting and completing the server's tasks."""
    await scene.ask("manage-tasks create", scene.moderator, name="ours", template="<image>Ours:")
    artists = await scene.discord.add_role(scene.guild, "artists")
    await scene.ask("settings role", scene.moderator, role=artists)
    needs_role = f"You need the <@&{artists.id}> role to use the bot on this server."
    for command, options in [("tasks list", {}), ("tasks show", {"task": "ours"}), ("tasks export", {"task": "ours"})]:
        refused = await scene.ask(command, **options)
        assert [(m.content, m.ephemeral) for m in refused] == [(needs_role, True)]
    typed = scene.discord.autocomplete_payload("tasks show", scene.reader, scene.guild, "task", task="")
    record = await scene.discord.send_interaction(typed)
    await record.wait_for(lambda: record.choices is not None, timeout=30)
    assert record.choices == []
    artist = scene.discord.add_member(scene.guild, "artist")
    artist.roles.append(artists.id)
    assert "**ours**" in (await scene.ask("tasks list", artist))[0].embeds[0]["description"]
    await scene.ask("settings role", scene.moderator)

    bots = await scene.discord.add_channel(scene.guild, "bots")
    await scene.ask("settings channels add", scene.moderator, channel=bots)
    refused = await scene.ask("tasks list", in_channel=scene.guild.channels[0])
    assert [(m.content, m.ephemeral) for m in refused] == [(f"I only answer in <#{bots.id}> on this server.", True)]
    assert "**ours**" in (await scene.ask("tasks list", in_channel=bots))[0].embeds[0]["description"]
