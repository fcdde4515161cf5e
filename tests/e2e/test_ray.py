"""The bot with service.backend = "ray": the same answers, from replicas on a local Ray head."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from cogs.utils.answering import WRITING
from tests.fake_discord.payloads import MANAGE_GUILD
from tests.fake_discord.server import Message
from tests.helpers.e2e import E2E, Scene, buttons, click, new_bot
from tests.helpers.ray import RAY_LOOPBACK

pytestmark = [E2E, pytest.mark.ray]


async def test_the_bot_answers_through_ray_replicas_as_it_does_locally(scene, stand_in, model_dirs, ray_head, tmp_path):
    ask = {"image": scene.photo("coffee"), "prompt": "<image>Output:", "max_new_tokens": 6}
    local = (await scene.ask("comprehend", **ask))[0].embeds[0]["description"]

    bot = new_bot(stand_in, model_dirs, tmp_path)
    bot.env |= RAY_LOOPBACK | {
        "FLAMINGO_SERVICE__BACKEND": "ray",
        "FLAMINGO_RAY__ADDRESS": ray_head,
        "FLAMINGO_RAY__APP_NAME": "flamingo-e2e",
        "FLAMINGO_RAY__REPLICAS": "2",
        "FLAMINGO_RAY__NUM_CPUS": "0.5",
        "FLAMINGO_MODEL__CHOICES": json.dumps([str(model_dirs["gptneox"])]),
        "FLAMINGO_RAY__EXTRA_MODEL_MEMORY_GIB": "1",
        "FLAMINGO_ANSWERS__STREAM_EDIT_SECONDS": "0.1",
        "FLAMINGO_ANSWERS__STREAM_AFTER_SECONDS": "0.05",
    }
    await bot.start()
    try:
        guild = await stand_in.join("Scaled")
        moderator = stand_in.add_member(guild, "moderator", permissions=MANAGE_GUILD | (1 << 31))
        here = Scene(stand_in, guild, stand_in.add_member(guild, "reader"), moderator)
        answers = [(await here.ask("comprehend", **ask))[0] for _ in range(3)]
        assert [a.embeds[0]["description"] for a in answers] == [local] * 3
        owner = stand_in.admin_guild.members[stand_in.owner.id]
        status = (await here.ask("admin status", owner, stand_in.admin_guild))[0]
        fields = {f["name"]: f["value"] for f in status.embeds[0]["fields"]}
        assert fields["Backend"] == f"ray: 2 replica(s) of flamingo-e2e at {ray_head}"
        assert fields["Server models"] == "1 offered besides the default, up to 1 loaded per replica"
        metrics = (await bot.scrape())[1]
        assert "flamingo_replicas 2.0" in metrics.splitlines()
        assert 'flamingo_requests_total{outcome="answered"} 3.0' in metrics.splitlines()

        # A server chooses another model: its replicas load it, and its answers say so.
        chosen = (await here.ask("settings model", here.moderator, model="gptneox"))[0]
        assert chosen.content.startswith("This server's answers now come from gptneox (6 MiB).")
        answered = (await here.ask("comprehend", **ask))[0]
        other = answered.embeds[0]
        assert other["footer"]["text"].startswith("model: gptneox · task: caption · ")
        assert other["description"] != local
        assert (await scene.ask("comprehend", **ask))[0].embeds[0]["description"] == local  # other servers: unchanged
        await here.ask("settings model", here.moderator)
        # Back on the default, a re-roll of that answer still comes from the model that gave it.
        rerolled = (await (await click(here, answered, "Re-roll")).answered())[0].embeds[0]
        assert rerolled["footer"]["text"].startswith("model: gptneox · ")
        assert (await here.ask("comprehend", **ask))[0].embeds[0]["description"] == local

        # A long answer is shown as its replica writes it, then posted whole.
        long = {"image": here.photo("rocket"), "max_new_tokens": 256, "min_new_tokens": 256}
        streamed = (await here.ask("comprehend", **long, repetition_penalty=2.0, no_repeat_ngram_size=1))[0]
        final = streamed.embeds[0]["description"]
        texts = [edit.embeds[0]["description"] for edit in streamed.edits if edit.content == WRITING]
        assert len(texts) >= 2 and all(final.startswith(text) for text in texts)
        assert streamed.content == "" and list(buttons(streamed)) == ["Re-roll", "Prompt", "Delete", "Report"]

        # A replica killed under load: every interaction is still answered, once.
        # The second driver connects first (seconds), so that the kill lands while the answers are long in coming.
        connected, sent = threading.Event(), threading.Event()
        killer = asyncio.create_task(asyncio.to_thread(_kill_a_busy_replica, ray_head, "flamingo-e2e", connected, sent))
        assert await asyncio.to_thread(connected.wait, 60), "the second driver did not connect"
        records = [await here.send("comprehend", **long) for _ in range(6)]
        sent.set()
        await killer
        for record in records:
            await record.wait_for(lambda record=record: _answered(record.original), 120)
            assert record.followups == [] and not record.original.ephemeral
        assert "a replica was lost during a request; retrying it once elsewhere" in bot.log()
    finally:
        status = await bot.stop()
        assert status == 0, bot.log()[-4000:]


def _answered(message: Message | None) -> bool:
    """Posted as the answer, not only shown as it was written."""
    return bool(message and message.embeds and message.content != WRITING)


def _kill_a_busy_replica(address: str, app_name: str, connected: threading.Event, sent: threading.Event) -> None:
    """As a second driver: once the requests are sent, wait until a replica is answering, then kill it
    (Serve starts another)."""
    import ray
    from ray import serve

    ray.init(address=address, namespace="flamingo-bot", logging_level="ERROR")
    try:
        connected.set()
        assert sent.wait(60), "the requests were not sent"
        handle = serve.get_app_handle(app_name)
        deadline = time.monotonic() + 60
        while not (busy := [r for r in handle.broadcast("status").results() if r["ongoing"]]):
            assert time.monotonic() < deadline, "no replica took the requests"
            time.sleep(0.05)
        ray.kill(ray.get_actor(busy[0]["actor"], namespace="serve"), no_restart=False)
    finally:
        ray.shutdown()
