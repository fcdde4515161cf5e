"""While the database refuses writes (here SQLite's read-only refusal on the bot's own connection):
answers are posted unstored with the buttons that still work, changes are refused in private, and
/admin status and /health say storage is degraded, until a write succeeds."""

from __future__ import annotations

from dataclasses import replace

import discord

from cogs.utils.answering import UNSTORED_NOTE
from tests.helpers.e2e import buttons
from tests.helpers.world import photo, private

CANNOT_SAVE = "The bot cannot save changes right now, so nothing was changed; try again later."


async def click(world, message, label: str):
    payload = world.discord.component_payload(message, buttons(message)[label], world.member, world.guild)
    world.bot._connection.parse_interaction_create(payload)
    return world.discord.record(payload)


def storage_status(fields: list[dict]) -> str:
    return next(field["value"] for field in fields if field["name"] == "Storage")


async def test_unstored_answers_keep_delete_and_report_and_changes_are_refused_until_writes_work(world):
    mods = await world.discord.add_channel(world.guild, "mods")
    await world.bot.store.change_guild_settings(world.guild.id, lambda rules: replace(rules, report_channel=mods.id))
    owner = world.admin_guild.members[world.discord.owner.id]
    await world.bot.store._db.execute("PRAGMA query_only = ON")

    answers = [(await world.reply("comprehend", image=photo(world), max_new_tokens=2))[0] for _ in range(2)]
    for answer in answers:
        assert list(buttons(answer)) == ["Delete", "Report"]
        assert answer.embeds[0]["footer"]["text"].endswith(f" s\n{UNSTORED_NOTE}")
    assert await private(world, "settings answers", world.moderator, visibility="private") == CANNOT_SAVE
    created = await private(world, "manage-tasks create", world.moderator, name="pets", template="<image>Pet:")
    assert created == CANNOT_SAVE
    status = (await world.reply("admin status", member=owner, guild=world.admin_guild))[0]
    assert storage_status(status.embeds[0]["fields"]).startswith(
        "degraded: the database refuses writes (SQLITE_READONLY: attempt to write a readonly database)"
    )
    assert world.bot._healthy().degraded == ("storage",)

    thanks = await (await click(world, answers[0], "Report")).answered()
    assert [(m.content, m.ephemeral) for m in thanks] == [("Thank you; the moderators have been told.", True)]
    again = await (await click(world, answers[0], "Report")).answered()
    assert again[0].content == "You have already reported this answer; the moderators have it."
    other = await (await click(world, answers[1], "Report")).answered()  # another unstored answer: its own
    assert other[0].content == "Thank you; the moderators have been told."
    assert len(world.discord.channel_messages[mods.id]) == 2
    deleting = await click(world, answers[0], "Delete")
    await deleting.wait_for(lambda: answers[0].deleted, timeout=30)

    await world.bot.store._db.execute("PRAGMA query_only = OFF")
    answer = (await world.reply("comprehend", image=photo(world), max_new_tokens=2))[0]
    assert list(buttons(answer)) == ["Re-roll", "Prompt", "Delete", "Report"]
    assert UNSTORED_NOTE not in answer.embeds[0]["footer"]["text"]
    assert world.bot._healthy().degraded == ()
    status = (await world.reply("admin status", member=owner, guild=world.admin_guild))[0]
    assert storage_status(status.embeds[0]["fields"]) == "ok (4 writes refused since start)"
    assert not (await world.bot.store.guild_settings(world.guild.id)).ephemeral_answers


async def test_events_the_database_refuses_to_record_log_no_traceback_and_the_bot_still_gets_ready(world, caplog):
    """A server's join or leave goes unrecorded (the store has logged why); connecting still starts the purge."""
    bot = world.bot
    await bot.store._db.execute("PRAGMA query_only = ON")
    await bot._run_event(bot.on_guild_remove, "on_guild_remove", discord.Object(world.guild.id))
    assert bot.store.writes.refused == 1
    await bot.on_ready()
    assert bot.store.writes.refused >= 2 and bot._purging is not None
    assert [r.getMessage() for r in caplog.records if r.exc_info is not None] == []
