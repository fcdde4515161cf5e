"""Owner tools, cog reloads that keep the model and the database, and clean shutdown."""

from __future__ import annotations

import asyncio
import importlib.util

import discord
import pytest

import cogs.utils.bot
from cogs.utils.bot import FlamingoBot
from cogs.utils.buttons import ActionButton, CancelEvaluationButton, ForgetExamplesButton
from core.config import ConfigError, DiscordSettings, StorageSettings
from core.model.decode.graphed_steps import StaticSteps
from tests.fake_discord.server import FakeDiscord
from tests.helpers.settings import tiny_settings
from tests.helpers.world import photo


async def test_admin_commands_exist_only_in_the_admin_guild(world):
    admin_names = {command["name"] for command in world.discord.guild_commands[world.admin_guild.id]}
    global_names = {command["name"] for command in world.discord.global_commands}
    assert admin_names == {"admin"}
    assert {"comprehend", "tasks", "manage-tasks"} <= global_names
    assert "admin" not in global_names
    manage = next(c for c in world.discord.global_commands if c["name"] == "manage-tasks")
    assert int(manage["default_member_permissions"]) == 1 << 5
    assert manage["contexts"] == [0]


async def test_sync_updates_every_command_or_only_one_servers_own(world):
    owner = world.admin_guild.members[world.discord.owner.id]

    async def sync(**options) -> str:
        return (await world.reply("admin sync", member=owner, guild=world.admin_guild, **options))[0].content

    world.discord.global_commands = []
    everywhere = await sync()
    assert everywhere == f"Synced {len(world.discord.global_commands) + 1} commands everywhere."
    assert {"comprehend", "tasks"} <= {command["name"] for command in world.discord.global_commands}
    assert await sync(guild_id=str(world.admin_guild.id)) == f"Synced 1 command for server {world.admin_guild.id}."
    assert await sync(guild_id="Bot HQ", raw=True) == "“Bot HQ” is not a server's id."
    assert await sync(guild_id="12345", raw=True) == "The bot is not in server 12345."


async def test_an_admin_guild_the_bot_is_not_in_is_refused_before_the_model_loads(model_dirs, tmp_path, monkeypatch):
    fake = FakeDiscord()
    api = await fake.start()
    loaded = []
    monkeypatch.setattr(cogs.utils.bot, "start_model_service", loaded.append)
    settings = tiny_settings(model_dirs["llama"]).model_copy(
        update={
            "discord": DiscordSettings(api_base_url=api, admin_guild_id=12345),
            "storage": StorageSettings(database=tmp_path / "tasks.db"),
        }
    )
    bot = FlamingoBot(settings)
    try:
        with pytest.raises(ConfigError, match=r"^discord\.admin_guild_id = 12345: the bot is not in that server;"):
            await bot.login(fake.token)
        assert loaded == []
    finally:
        await bot.close()
        await fake.stop()


async def test_status_is_for_the_owner_only(world):
    owner = world.admin_guild.members[world.discord.owner.id]
    status = (await world.reply("admin status", member=owner, guild=world.admin_guild))[0]
    assert status.ephemeral
    assert status.embeds, status.content
    fields = {field["name"]: field["value"] for field in status.embeds[0]["fields"]}
    assert fields["Model"].endswith("llama")
    assert fields["Precision"] == "fp32"
    assert fields["Device"] == "cpu"
    assert fields["Queue"] == "0 waiting"
    assert fields["Version"] == "0.1.0"
    assert "GiB" in fields["Memory"]
    assert fields["Prefix cache"].endswith(" misses") and " tasks, " in fields["Prefix cache"]
    assert " images, " in fields["Image cache"]
    assert fields["Decode graphs"] == "off"  # a CPU steps eagerly

    stranger = world.discord.add_member(world.admin_guild, "stranger", permissions=1 << 3)
    refused = (await world.reply("admin status", member=stranger, guild=world.admin_guild))[0]
    assert refused.ephemeral
    assert refused.content == "Only the bot's owner can use this command."


async def test_status_counts_the_decode_graphs_in_use(world, monkeypatch):
    """What a GPU shows: here the same fixed-buffer steps, run without graphs."""
    decoder = world.bot.service.engine.decoder
    monkeypatch.setattr(
        decoder, "static_steps", StaticSteps(decoder.conditioning, max_rows=4, memory_bytes=2**30, graphed=False)
    )
    await world.reply("comprehend", image=photo(world), max_new_tokens=3)
    owner = world.admin_guild.members[world.discord.owner.id]
    status = (await world.reply("admin status", member=owner, guild=world.admin_guild))[0]
    fields = {field["name"]: field["value"] for field in status.embeds[0]["fields"]}
    assert fields["Decode graphs"].startswith("1 kept, ")
    assert fields["Decode graphs"].endswith(" MiB, batches stepped from them: 1")
    assert world.bot.service.cache_status()[0]["graphs"]["entries"] == 1
    decoder.static_steps.failed = True
    status = (await world.reply("admin status", member=owner, guild=world.admin_guild))[0]
    fields = {field["name"]: field["value"] for field in status.embeds[0]["fields"]}
    assert fields["Decode graphs"] == "off: a capture failed (see the log)"


async def test_reload_keeps_the_model_service_and_the_database(world):
    service, store, library = world.bot.service, world.bot.store, world.bot.library
    old_cogs = dict(world.bot.cogs)
    owner = world.admin_guild.members[world.discord.owner.id]
    reply = (await world.reply("admin reload", member=owner, guild=world.admin_guild))[0]
    assert reply.content == (
        "Reloaded cogs.inference, cogs.tasks, cogs.settings, cogs.privacy, cogs.admin, cogs.help, cogs.queue."
    )
    assert world.bot.service is service and world.bot.store is store and world.bot.library is library
    assert all(world.bot.cogs[name] is not cog for name, cog in old_cogs.items())
    menu = world.bot.tree.get_command("Describe image", type=discord.AppCommandType.message)
    assert menu is not None and menu.callback.__self__ is world.bot.cogs["Inference"]
    answer = (await world.reply("comprehend", image=photo(world), max_new_tokens=3))[0]
    assert answer.embeds[0]["footer"]["text"].startswith("task: caption")
    created = await world.reply("manage-tasks create", member=world.moderator, name="after", template="<image>Q:")
    assert created[0].content.startswith("Created task **after**")


async def test_a_cog_that_fails_to_reload_keeps_running_says_why_and_the_others_reload(world, monkeypatch, tmp_path):
    broken = tmp_path / "help.py"
    broken.write_text("async def setup(bot):\n    return (\n")
    find_spec = importlib.util.find_spec

    def broken_help(name, *args):
        if name == "cogs.help":
            return importlib.util.spec_from_file_location("cogs.help", broken)
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", broken_help)
    old_cogs = dict(world.bot.cogs)
    owner = world.admin_guild.members[world.discord.owner.id]
    reply = (await world.reply("admin reload", member=owner, guild=world.admin_guild))[0]
    assert reply.content.startswith(
        "Reloaded cogs.inference, cogs.tasks, cogs.settings, cogs.privacy, cogs.admin, cogs.queue.\n"
        "cogs.help failed, and its previous version still runs: SyntaxError: "
    )
    assert "Help" in world.bot.cogs and world.bot.cogs["Tasks"] is not old_cogs["Tasks"]
    assert (await world.reply("help"))[0].embeds


async def test_every_answer_button_is_one_class_whatever_was_reloaded(world):
    """An answer posted by a request that outlived a reload registered the old class again."""
    registered = lambda: set(world.bot._connection._view_store._dynamic_items.values())  # noqa: E731
    assert registered() == {ActionButton, ForgetExamplesButton, CancelEvaluationButton}
    owner = world.admin_guild.members[world.discord.owner.id]
    await world.reply("admin reload", member=owner, guild=world.admin_guild, cog="cogs.inference")
    answer = (await world.reply("comprehend", image=photo(world), max_new_tokens=2))[0]
    assert answer.components and registered() == {ActionButton, ForgetExamplesButton, CancelEvaluationButton}


async def test_an_interaction_arriving_during_a_reload_is_held_and_answered(world, monkeypatch):
    reloading = asyncio.Event()

    async def slow_reload(name, **kwargs):
        await world.bot.unload_extension(name)
        reloading.set()
        await asyncio.sleep(0.3)  # the cog's commands are missing from the tree now
        await world.bot.load_extension(name)

    monkeypatch.setattr(world.bot, "reload_extension", slow_reload)
    reload_task = asyncio.create_task(world.bot.reload_cogs(["cogs.tasks"]))
    await reloading.wait()
    listing = world.invoke("tasks list")
    messages = await listing.answered()
    await reload_task
    assert messages[0].embeds[0]["title"] == "Tasks"


async def test_a_button_clicked_during_a_reload_is_answered_by_the_reloaded_cog(world, monkeypatch):
    answer = (await world.reply("comprehend", image=photo(world), max_new_tokens=2))[0]
    prompt_id = next(
        button["custom_id"] for row in answer.components for button in row["components"] if button["label"] == "Prompt"
    )
    reloading = asyncio.Event()

    async def slow_reload(name, **kwargs):
        await world.bot.unload_extension(name)
        reloading.set()
        await asyncio.sleep(0.3)  # no Inference cog now
        await world.bot.load_extension(name)

    monkeypatch.setattr(world.bot, "reload_extension", slow_reload)
    reload_task = asyncio.create_task(world.bot.reload_cogs(["cogs.inference"]))
    await reloading.wait()
    payload = world.discord.component_payload(answer, prompt_id, world.member, world.guild)
    world.bot._connection.parse_interaction_create(payload)
    shown = await world.discord.record(payload).answered()
    await reload_task
    assert shown[0].ephemeral and shown[0].embeds[0]["title"] == "Full prompt"


async def test_shutdown_finishes_the_running_request_and_refuses_queued_ones(world, monkeypatch):
    gate = asyncio.Event()
    engine = world.bot.service.engine
    original_run_many = engine.run_many
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def gated_run_many(requests, stops, deliver, joining=None):
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(timeout=30)
        return original_run_many(requests, stops, deliver)  # nothing joins: the queued one stays queued

    monkeypatch.setattr(engine, "run_many", gated_run_many)
    running = world.invoke("comprehend", image=photo(world), max_new_tokens=2)
    await asyncio.wait_for(started.wait(), 30)
    queued = world.invoke("comprehend", image=photo(world, "rocket"), max_new_tokens=2)
    while world.bot.service.waiting == 0:
        await asyncio.sleep(0.01)
    owner = world.admin_guild.members[world.discord.owner.id]
    notice = (await world.reply("admin shutdown", member=owner, guild=world.admin_guild))[0]
    assert notice.content == (
        "Shutting down: answers under way are finished first (a minute at most), and 1 waiting request is told to "
        "try later."
    )
    gate.set()
    finished = (await running.answered())[0]
    assert finished.embeds and not finished.ephemeral
    refused = await queued.answered()
    assert [m.content for m in refused] == ["The bot is shutting down; your request was not run."]
    assert refused[0].ephemeral
    for _ in range(100):
        if world.bot.is_closed():
            break
        await asyncio.sleep(0.05)
    assert world.bot.is_closed()


async def test_shutdown_lets_any_command_under_way_finish_before_the_database_closes(world, monkeypatch):
    """Only answers were waited for: a task being copied lost its connection and its database."""
    copying, release = asyncio.Event(), asyncio.Event()
    copy = world.bot.library.copy

    async def slow_copy(*args):
        copying.set()
        await release.wait()
        return await copy(*args)

    monkeypatch.setattr(world.bot.library, "copy", slow_copy)
    record = world.invoke("manage-tasks copy", world.moderator, task="caption", new_name="mine")
    await asyncio.wait_for(copying.wait(), 30)
    world.bot.request_shutdown()
    await asyncio.sleep(0.2)
    assert not world.bot.is_closed()
    release.set()
    [done] = await record.answered()
    assert done.content == "Copied **caption** to **mine**."
    await world.bot.finish_closing()
    assert world.bot.is_closed()
