"""What the bot keeps about people, and how they make it forget."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta

import pytest

from core.asking import WITHHELD
from tests.fake_discord.payloads import MANAGE_GUILD
from tests.helpers.e2e import E2E, Scene, buttons, click, new_bot

pytestmark = E2E


@pytest.mark.privacy
async def test_forget_me_deletes_requests_at_once_and_examples_after_confirmation(scene):
    await scene.ask("manage-tasks create", scene.moderator, name="pets", template="<image>Pet:")
    for photo in ("chelsea", "coffee"):
        await scene.ask(
            "manage-tasks add-example", scene.moderator, task="pets", image=scene.photo(photo), text="<image>Pet:x"
        )
    answer = (await scene.ask("comprehend", scene.moderator, image=scene.photo(), max_new_tokens=2))[0]
    kept = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2))[0]

    asked = (await scene.ask("forget-me", scene.moderator))[0]
    assert asked.ephemeral
    assert asked.content == (
        "Deleted the pictures and prompts of your recent request. Answers already posted stay in their channels: "
        "delete yours with 🗑️ Delete, or ask a server's moderators. You also added 2 examples to "
        "servers' tasks; deleting them changes those tasks for everyone. Delete them?"
    )
    gone = await (await click(scene, answer, "Re-roll", scene.moderator)).answered()
    assert gone[0].content.startswith("This answer's request is no longer stored")
    assert (await (await click(scene, kept, "Prompt")).answered())[0].embeds  # other people's stay

    refused = await (await click(scene, asked, "Delete my examples", scene.reader)).answered()
    assert refused[0].content == "Only the person who asked to be forgotten can confirm it."
    confirm = await click(scene, asked, "Delete my examples", scene.moderator)
    await confirm.wait_for(lambda: asked.content == "Deleted 2 examples.", timeout=30)
    assert buttons(asked) == {}
    listing = (await scene.ask("tasks list"))[0].embeds[0]["description"]
    assert "**pets** (this server, 0 examples)" in listing
    again = (await scene.ask("forget-me", scene.moderator))[0]
    assert again.content == ("No pictures or prompts of yours were stored. Nothing else is stored about you.")


@pytest.mark.privacy
async def test_an_answer_stays_its_askers_to_delete_after_they_are_forgotten(scene):
    answer = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=2))[0]
    await scene.ask("forget-me")
    stranger = scene.discord.add_member(scene.guild, "stranger")
    refused = await (await click(scene, answer, "Delete", stranger)).answered()
    assert refused[0].content.startswith("Only the person who asked") and not answer.deleted
    deleted = await click(scene, answer, "Delete")  # Discord still says who asked
    await deleted.wait_for(lambda: answer.deleted, timeout=30)


@pytest.mark.privacy
async def test_a_re_roll_of_someones_answer_stays_theirs_to_delete_and_forget(scene):
    """Someone else's re-roll holds the asker's picture and prompt: theirs to delete, and /forget-me takes it."""
    bob = scene.discord.add_member(scene.guild, "bob")
    mine = (await scene.ask("comprehend", image=scene.photo(), prompt="<image>My note:", max_new_tokens=2))[0]
    bobs = (await (await click(scene, mine, "Re-roll", bob)).answered())[0]
    again = (await (await click(scene, bobs, "Re-roll", bob)).answered())[0]  # a re-roll of the re-roll
    deleted = await click(scene, bobs, "Delete")
    await deleted.wait_for(lambda: bobs.deleted, timeout=30)

    forgot = (await scene.ask("forget-me"))[0]
    assert forgot.content.startswith(
        "Deleted the pictures and prompts of your 2 recent requests."
    )  # hers, and the re-roll of the re-roll
    gone = (await (await click(scene, again, "Prompt", bob)).answered())[0]
    assert gone.content.startswith("This answer's request is no longer stored")


@pytest.mark.privacy
async def test_report_posts_the_answer_to_the_moderators_channel(scene):
    answer = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=3))[0]
    nowhere = await (await click(scene, answer, "Report")).answered()
    assert nowhere[0].ephemeral and nowhere[0].content == (
        "This server has no report channel; a moderator can set one with /settings reports."
    )
    mods = await scene.discord.add_channel(scene.guild, "mods")
    scene.discord.limits.inject("POST", f"/channels/{mods.id}/messages", status=403)
    refused = (await scene.ask("settings reports", scene.moderator, channel=mods))[0]
    assert refused.ephemeral and refused.content.startswith(f"I cannot post in <#{mods.id}>; let me view it")
    set_channel = (await scene.ask("settings reports", scene.moderator, channel=mods))[0]
    assert set_channel.content == f"Reports go to <#{mods.id}>."
    [notice] = await scene.discord.wait_for_channel_messages(mods)
    assert notice.content == "Answers that members report will be posted here."

    thanks = await (await click(scene, answer, "Report")).answered()
    assert [(m.content, m.ephemeral) for m in thanks] == [("Thank you; the moderators have been told.", True)]
    again = await (await click(scene, answer, "Report")).answered()
    assert [(m.content, m.ephemeral) for m in again] == [
        ("You have already reported this answer; the moderators have it.", True)
    ]
    _, report = await scene.discord.wait_for_channel_messages(mods, count=2)
    assert len(scene.discord.channel_messages[mods.id]) == 2
    embed = report.embeds[0]
    assert embed["title"] == "Answer reported"
    assert embed["description"] == answer.embeds[0]["description"]
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Reported by"] == f"<@{scene.reader.id}>" and fields["Asked by"] == f"<@{scene.reader.id}>"
    assert (fields["Task"], fields["Prompt"]) == ("caption", "`<image>Output:`")
    jump = f"https://discord.com/channels/{scene.guild.id}/{answer.channel_id}/{answer.id}"
    assert fields["Where"] == f"[Jump to the answer]({jump})"
    assert embed["thumbnail"]["url"] == "attachment://reported.jpg"
    assert report.files["reported.jpg"] == answer.files["image.jpg"]  # the picture the answer is about
    assert report.silent  # the report mentions the reporter without pinging anyone

    second = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=3))[0]
    scene.discord.limits.inject("POST", f"/channels/{mods.id}/messages", status=403)
    failed = await (await click(scene, second, "Report")).answered()
    assert [(m.content, m.ephemeral) for m in failed] == [
        ("I could not post in this server's report channel; ask a moderator to check /settings reports.", True)
    ]
    retried = await (await click(scene, second, "Report")).answered()  # not posted, so not yet reported
    assert [(m.content, m.ephemeral) for m in retried] == [("Thank you; the moderators have been told.", True)]
    await scene.discord.wait_for_channel_messages(mods, count=3)

    await scene.ask("forget-me")  # the reader's requests go; a report on their answer still reaches the moderators
    late = await (await click(scene, second, "Report", scene.moderator)).answered()
    assert late[0].content == "Thank you; the moderators have been told."
    *_, bare = await scene.discord.wait_for_channel_messages(mods, count=4)
    assert not bare.files and "Asked by" not in {f["name"] for f in bare.embeds[0]["fields"]}
    await scene.ask("settings answers", scene.moderator, visibility="private")
    hidden = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=3))[0]
    await (await click(scene, hidden, "Report")).answered()
    *_, private_report = await scene.discord.wait_for_channel_messages(mods, count=5)
    where = {f["name"]: f["value"] for f in private_report.embeds[0]["fields"]}["Where"]
    assert where.endswith(") (seen only by the asker)")  # moderators cannot open it

    off = (await scene.ask("settings reports", scene.moderator))[0]
    assert off.ephemeral and off.content == "Reports are off; members who press Report are told this server takes none."
    nowhere = await (await click(scene, second, "Report", scene.moderator)).answered()
    assert nowhere[0].content == "This server has no report channel; a moderator can set one with /settings reports."


@pytest.mark.privacy
async def test_the_word_filter_and_a_departed_servers_data(scene, stand_in, model_dirs, tmp_path):
    # The tiny model answers this photo deterministically; block one of the words it says.
    said = (await scene.ask("comprehend", image=scene.photo("rocket"), max_new_tokens=8))[0].embeds[0]["description"]
    words = said.split()
    bot = new_bot(stand_in, model_dirs, tmp_path)
    bot.env |= {
        "FLAMINGO_PRIVACY__BLOCKED_WORDS": json.dumps([words[0].upper()]),
        "FLAMINGO_PRIVACY__DEPARTED_GUILD_RETENTION_DAYS": "0",
        "FLAMINGO_PRIVACY__PURGE_INTERVAL_MINUTES": "0.01",
    }
    await bot.start()
    try:
        guild = await stand_in.join("Filtered")
        reader = stand_in.add_member(guild, "reader")
        moderator = stand_in.add_member(guild, "moderator", permissions=scene.moderator.permissions)
        here = Scene(stand_in, guild, reader, moderator)
        nsfw = await stand_in.add_channel(guild, "after-dark", nsfw=True)
        ask = {"image": here.photo("rocket"), "max_new_tokens": 8}
        withheld = (await here.ask("comprehend", **ask))[0]
        assert withheld.embeds[0]["description"] == WITHHELD
        assert (await here.ask("comprehend", in_channel=nsfw, **ask))[0].embeds[0]["description"] == said

        await here.ask("manage-tasks create", moderator, name="ours", template="<image>Ours:")
        await stand_in.remove_bot(guild)
        async with asyncio.timeout(30):
            while _rows(tmp_path / "tasks.db", guild.id):
                await asyncio.sleep(0.1)
        await stand_in.add_bot(guild)
        listing = (await here.ask("tasks list"))[0].embeds[0]["description"]
        assert "ours" not in listing
    finally:
        await bot.stop()


@pytest.mark.privacy
async def test_a_server_that_removed_the_bot_while_it_was_away_is_purged(stand_in, model_dirs, tmp_path):
    """Discord sends no leave for what happened while the bot was disconnected."""
    bot = new_bot(stand_in, model_dirs, tmp_path)
    bot.env |= {
        "FLAMINGO_PRIVACY__DEPARTED_GUILD_RETENTION_DAYS": "0",
        "FLAMINGO_PRIVACY__PURGE_INTERVAL_MINUTES": "0.01",
    }
    await bot.start()
    try:
        away, stays = await stand_in.join("Away"), await stand_in.join("Stays")
        for guild in (away, stays):
            moderator = stand_in.add_member(guild, "moderator", permissions=MANAGE_GUILD)
            here = Scene(stand_in, guild, moderator, moderator)
            await here.ask("manage-tasks create", moderator, name="ours", template="<image>Ours:")
        await bot.stop()
        await stand_in.remove_bot(away)
        await bot.start()
        async with asyncio.timeout(30):
            while _rows(tmp_path / "tasks.db", away.id):
                await asyncio.sleep(0.1)
        assert _rows(tmp_path / "tasks.db", stays.id) == 1
    finally:
        await bot.stop()


@pytest.mark.privacy
async def test_a_server_that_re_added_the_bot_while_it_was_away_keeps_its_tasks(stand_in, model_dirs, tmp_path):
    """Kicked, the bot stopped, 31 days, re-added, the bot started: the server is back before any purge."""
    bot = new_bot(stand_in, model_dirs, tmp_path)
    bot.env |= {"FLAMINGO_PRIVACY__PURGE_INTERVAL_MINUTES": "0.01"}
    await bot.start()
    try:
        guild = await stand_in.join("Returns")
        moderator = stand_in.add_member(guild, "moderator", permissions=MANAGE_GUILD)
        here = Scene(stand_in, guild, moderator, moderator)
        await here.ask("manage-tasks create", moderator, name="ours", template="<image>Ours:")
        await stand_in.remove_bot(guild)
        async with asyncio.timeout(30):
            while not _departed(tmp_path / "tasks.db", guild.id):
                await asyncio.sleep(0.1)
        await bot.stop()
        with closing(sqlite3.connect(tmp_path / "tasks.db")) as db, db:
            db.execute(
                "UPDATE departed_guilds SET left_at = ?", ((datetime.now(UTC) - timedelta(days=31)).isoformat(),)
            )
        await stand_in.add_bot(guild)
        await bot.start()
        async with asyncio.timeout(30):
            while _departed(tmp_path / "tasks.db", guild.id):  # reconciled: present again
                await asyncio.sleep(0.1)
        await asyncio.sleep(2)  # a few purges later
        assert _rows(tmp_path / "tasks.db", guild.id) == 1
    finally:
        await bot.stop()


def _departed(database, guild_id: int) -> bool:
    with closing(sqlite3.connect(database)) as db:
        return db.execute("SELECT 1 FROM departed_guilds WHERE guild_id = ?", (guild_id,)).fetchone() is not None


def _rows(database, guild_id: int) -> int:
    with closing(sqlite3.connect(database)) as db:
        return db.execute("SELECT count(*) FROM tasks WHERE guild_id = ?", (guild_id,)).fetchone()[0]
