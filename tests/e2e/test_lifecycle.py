"""Restarts, signals and kills, each with a bot process of its own."""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3

import pytest

from tests.fake_discord.payloads import MANAGE_GUILD
from tests.helpers.e2e import E2E, Scene, new_bot

pytestmark = E2E


async def _scene(stand_in, name: str) -> Scene:
    guild = await stand_in.join(name)
    return Scene(
        stand_in,
        guild,
        stand_in.add_member(guild, "reader"),
        stand_in.add_member(guild, "moderator", permissions=MANAGE_GUILD | (1 << 31)),
    )


@pytest.mark.re_roll
async def test_tasks_and_answer_buttons_survive_a_restart_and_sigterm_stops_cleanly(stand_in, model_dirs, tmp_path):
    bot = new_bot(stand_in, model_dirs, tmp_path)
    await bot.start()
    scene = await _scene(stand_in, "Keepers")
    await scene.ask("manage-tasks create", scene.moderator, name="kept", template="<image>Kept:", description="stays")
    await scene.ask(
        "manage-tasks add-example", scene.moderator, task="kept", image=scene.photo(), text="<image>Kept:a cat"
    )
    await scene.ask("manage-tasks edit-example", scene.moderator, task="kept", position=1, text="<image>Kept:the cat")
    await scene.ask("manage-tasks create", scene.moderator, name="dropped", template="<image>Gone:")
    await scene.ask("manage-tasks delete", scene.moderator, task="dropped")
    before = (await scene.ask("comprehend", image=scene.photo("coffee"), task="kept", max_new_tokens=3))[0]
    assert await bot.stop(signal.SIGTERM) == 0

    await bot.start()
    listing = (await scene.ask("tasks list"))[0].embeds[0]["description"]
    assert "**kept** (this server, 1 example): stays" in listing
    assert "dropped" not in listing
    shown = await scene.ask("tasks show", task="kept")
    assert shown[0].embeds[1]["description"] == "`<image>Kept:the cat`"
    answer = (await scene.ask("comprehend", image=scene.photo("rocket"), task="kept", max_new_tokens=3))[0]
    assert answer.embeds[0]["footer"]["text"].startswith("task: kept")
    # The buttons of an answer given before the restart still work (dynamic items over stored requests).
    reroll = next(b["custom_id"] for row in before.components for b in row["components"] if b["label"] == "Re-roll")
    click = stand_in.component_payload(before, reroll, scene.reader, scene.guild)
    rerolled = (await (await stand_in.send_interaction(click)).answered())[0]
    assert rerolled.embeds[0]["author"]["name"] == "Reader re-rolled"
    assert rerolled.embeds[0]["footer"]["text"].startswith("task: kept")
    assert await bot.stop(signal.SIGINT) == 0
    assert bot.log().count("Closed: answers delivered, the database closed") == 2


async def test_systemd_is_told_what_the_bot_does_and_when_it_answers(stand_in, model_dirs, tmp_path):
    """``Type=notify``: READY=1 only once Discord is connected (after the model loaded), what it is
    doing for ``systemctl status`` meanwhile, and STOPPING=1 as a SIGTERM stops it."""
    told: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        manager.setblocking(False)
        loop = asyncio.get_running_loop()

        async def listen() -> None:
            while True:
                told.append((await loop.sock_recv(manager, 4096)).decode())

        listening = asyncio.create_task(listen())
        bot = new_bot(stand_in, model_dirs, tmp_path)
        bot.env["NOTIFY_SOCKET"] = str(tmp_path / "notify")
        await bot.start()
        async with asyncio.timeout(30):
            while not any("READY=1" in message for message in told):
                await asyncio.sleep(0.05)
        assert told[:2] == ["STATUS=Loading the model", "STATUS=Connecting to Discord"]
        assert told[2].startswith("READY=1\nSTATUS=Answering in ")
        assert await bot.stop(signal.SIGTERM) == 0
        async with asyncio.timeout(10):
            while not any(message.startswith("STOPPING=1") for message in told):
                await asyncio.sleep(0.05)
        listening.cancel()
    assert told[-1] == "STOPPING=1\nSTATUS=Stopping: finishing the answers under way"


async def test_a_signal_while_the_model_loads_stops_the_bot_at_once(stand_in, model_dirs, tmp_path):
    """Loading can take minutes and cannot be interrupted; nothing is being answered yet."""
    bot = new_bot(stand_in, model_dirs, tmp_path)
    asked = stand_in.gateway_bot_asked
    await bot.launch()
    async with asyncio.timeout(60):
        while stand_in.gateway_bot_asked == asked:  # set-up has begun: the model loads next
            await asyncio.sleep(0.01)
    sessions = len(stand_in.gateway.sessions)
    assert await bot.stop(signal.SIGTERM) == 0
    assert "stopping at once: still starting up" in bot.log()
    assert "Traceback" not in bot.log() and len(stand_in.gateway.sessions) == sessions


@pytest.mark.parametrize("broken", ["database", "metrics port"])
async def test_a_bad_database_path_or_a_busy_metrics_port_is_one_line_before_the_model_loads(
    stand_in, model_dirs, tmp_path, broken
):
    bot = new_bot(stand_in, model_dirs, tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if broken == "database":
            bot.env["FLAMINGO_STORAGE__DATABASE"] = str(tmp_path)  # a folder
            expected = f"error: cannot open the database at {tmp_path}: unable to open database file\n"
        else:
            bot.env |= {"FLAMINGO_METRICS__ENABLED": "true", "FLAMINGO_METRICS__PORT": str(taken.getsockname()[1])}
            expected = f"error: cannot serve metrics on 127.0.0.1:{taken.getsockname()[1]}: Address already in use\n"
        await bot.launch()
        assert await asyncio.wait_for(bot.process.wait(), 60) == 2
    assert bot.log().endswith(expected)
    assert "Loading vision encoder" not in bot.log() and "Traceback" not in bot.log()


async def test_sigkill_during_task_writes_keeps_the_last_committed_state(stand_in, model_dirs, tmp_path):
    bot = new_bot(stand_in, model_dirs, tmp_path)
    await bot.start()
    scene = await _scene(stand_in, "Crashers")
    await scene.ask("manage-tasks create", scene.moderator, name="busy", template="<image>Busy:")
    writes = [
        await scene.send(
            "manage-tasks add-example",
            scene.moderator,
            task="busy",
            image=scene.photo(),
            text=f"<image>Busy:number {i}",
        )
        for i in range(8)
    ]

    def confirmed_writes() -> list:
        return [w for w in writes if w.original and w.original.content.startswith("Added example")]

    async with asyncio.timeout(60):
        while len(confirmed_writes()) < 3:
            await asyncio.sleep(0.005)
    await bot.stop(signal.SIGKILL)
    confirmed = confirmed_writes()

    with sqlite3.connect(tmp_path / "tasks.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT COUNT(*) FROM examples WHERE task_id NOT IN (SELECT id FROM tasks)").fetchone() == (
            0,
        )
        assert db.execute("SELECT COUNT(*) FROM examples WHERE length(image) = 0").fetchone() == (0,)

    await bot.start()
    shown = await scene.ask("tasks show", task="busy")
    stored = [embed["description"] for embed in shown[0].embeds[1:]]
    sent = {f"`<image>Busy:number {i}`" for i in range(8)}
    confirmed_texts = {f"`<image>Busy:number {writes.index(w)}`" for w in confirmed}
    assert confirmed_texts <= set(stored) <= sent
    assert len(set(stored)) == len(stored)
    assert sorted(shown[0].files) == sorted(f"example-{n}.jpg" for n in range(1, len(stored) + 1))
    assert await bot.stop() == 0


async def test_a_token_discord_refuses_ends_in_one_error_line_and_claims_nothing_was_closed(
    stand_in, model_dirs, tmp_path
):
    bot = new_bot(stand_in, model_dirs, tmp_path)
    bot.env["DISCORD_TOKEN"] = "not-the-bot-token"
    await bot.launch()
    assert await bot.stop(signal.SIGCONT) == 2  # SIGCONT: nothing to stop, only waited for
    log = bot.log()
    assert log.rstrip().endswith("error: Discord refused the bot token; check DISCORD_TOKEN")
    assert "answers delivered" not in log and "database closed" not in log
    assert "Closed: nothing had been started" in log
