"""Scenarios against the shared bot process, each in a guild of its own."""

from __future__ import annotations

import asyncio

from tests.helpers.e2e import E2E

pytestmark = E2E


async def test_comprehend_with_the_default_task(scene):
    reply = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=5))[0]
    assert not reply.ephemeral
    embed = reply.embeds[0]
    assert embed["description"]
    assert embed["author"]["name"] == "Reader asked"
    assert embed["footer"]["text"].startswith("task: caption · ")
    assert embed["image"]["url"] == "attachment://image.jpg"
    assert reply.files["image.jpg"].startswith(b"\xff\xd8")


async def test_comprehend_with_a_saved_task(scene):
    created = await scene.ask("manage-tasks create", scene.moderator, name="pets", template="<image>Pet:")
    assert created[0].content.startswith("Created task **pets**")
    added = await scene.ask(
        "manage-tasks add-example", scene.moderator, task="pets", image=scene.photo("chelsea"), text="<image>Pet:a cat"
    )
    assert added[0].content == "Added example 1 to **pets**."
    reply = (await scene.ask("comprehend", image=scene.photo("coffee"), task="pets", max_new_tokens=4))[0]
    assert reply.embeds[0]["footer"]["text"].startswith("task: pets · ")
    assert reply.embeds[0]["fields"][0]["value"] == "<image>Pet:"


async def test_two_guilds_share_names_but_nothing_else(scene, stand_in):
    other = await stand_in.join("Elsewhere")
    other_moderator = stand_in.add_member(other, "mod2", permissions=scene.moderator.permissions)
    await scene.ask("manage-tasks create", scene.moderator, name="shared", template="<image>Here:", description="first")
    await scene.ask(
        "manage-tasks create", other_moderator, other, name="shared", template="<image>There:", description="second"
    )
    await scene.ask("manage-tasks create", other_moderator, other, name="secret", template="<image>Hush:")
    here = (await scene.ask("tasks list"))[0].embeds[0]["description"]
    there = (await scene.ask("tasks list", stand_in.add_member(other, "r2"), other))[0].embeds[0]["description"]
    assert "**shared** (this server, 0 examples): first" in here and "secret" not in here
    assert "**shared** (this server, 0 examples): second" in there
    refused = await scene.ask("comprehend", image=scene.photo(), task="secret")
    assert refused[0].ephemeral and "There is no task called “secret” here" in refused[0].content
    answer = (await scene.ask("comprehend", image=scene.photo(), task="shared", max_new_tokens=3))[0]
    assert answer.embeds[0]["fields"][0]["value"] == "<image>Here:"


async def test_bad_input_gets_private_specific_messages_and_the_bot_keeps_serving(scene):
    cases = [
        (
            {"image": scene.discord.upload("notes.png", b"plain text", "image/png")},
            "This file is not an image I can read; send a JPEG, PNG, WebP, GIF, BMP or TIFF file.",
        ),
        (
            {"image": scene.discord.upload("huge.png", b"\0" * (26 * 1024 * 1024), "image/png")},
            "The file is 26.0 MiB; the limit is 25.0 MiB.",
        ),
        (
            {"image": scene.photo(), "prompt": "What is it?"},
            "The prompt has 0 <image> markers but 1 image was given; "
            "put one `<image>` where each image should be read.",
        ),
        (  # beyond the registered range: only a modified client sends it
            {"image": scene.photo(), "max_new_tokens": 5000, "raw": True},
            "max_new_tokens must be between 1 and 256 (got 5000).",
        ),
        (
            {"image": scene.photo(), "task": "nonexistent"},
            "There is no task called “nonexistent” here; the built-in "
            "tasks are caption, vqa, and /tasks list shows this server's.",
        ),
    ]
    records = [await scene.send("comprehend", **options) for options, _ in cases]
    for record, (_, message) in zip(records, cases, strict=True):
        seen = await record.answered()
        assert [(m.content, m.ephemeral) for m in seen] == [(message, True)]
    reply = (await scene.ask("comprehend", image=scene.photo(), max_new_tokens=3))[0]
    assert reply.embeds and not reply.ephemeral


async def test_permissions_are_enforced(scene, stand_in):
    refused = await scene.ask("manage-tasks create", scene.reader, name="mine", template="<image>X:")
    assert [(m.content, m.ephemeral) for m in refused] == [
        ("You need the Manage Server permission in this server to do that.", True)
    ]
    assert "mine" not in (await scene.ask("tasks list"))[0].embeds[0]["description"]
    admin_guild = stand_in.admin_guild
    stranger = stand_in.add_member(admin_guild, "stranger", permissions=1 << 3)
    denied = await scene.ask("admin status", stranger, admin_guild)
    assert [(m.content, m.ephemeral) for m in denied] == [("Only the bot's owner can use this command.", True)]
    owner = admin_guild.members[stand_in.owner.id]
    status = (await scene.ask("admin status", owner, admin_guild))[0]
    assert {f["name"] for f in status.embeds[0]["fields"]} >= {"Model", "Queue", "Uptime", "Servers"}


async def test_hot_reload_while_requests_are_in_flight_loses_nothing(scene, stand_in, shared_bot):
    owner = stand_in.admin_guild.members[stand_in.owner.id]
    before = [await scene.send("comprehend", image=scene.photo(), max_new_tokens=8) for _ in range(6)]
    reload = await scene.send("admin reload", owner, stand_in.admin_guild)
    after = [await scene.send("comprehend", image=scene.photo("rocket"), max_new_tokens=8) for _ in range(6)]
    assert (await reload.answered())[0].content == (
        "Reloaded cogs.inference, cogs.tasks, cogs.settings, cogs.privacy, cogs.admin, cogs.help, cogs.queue."
    )
    for record in before + after:
        seen = await record.answered()
        assert len(seen) == 1 and seen[0].embeds and not seen[0].ephemeral
    assert shared_bot.log().count("Loading vision encoder") == 1


async def test_fifty_interactions_from_ten_guilds_are_each_answered_once(scene, stand_in):
    guilds = [await stand_in.join(f"Crowd {i}") for i in range(10)]
    members = [stand_in.add_member(guild, f"user{i}") for i, guild in enumerate(guilds)]
    payloads = [
        stand_in.interaction_payload(
            "comprehend", members[i % 10], guilds[i % 10], image=scene.photo(), max_new_tokens=4
        )
        for i in range(50)
    ]
    records = await asyncio.gather(*(stand_in.send_interaction(p) for p in payloads))
    answers = await asyncio.gather(*(record.answered(timeout=180) for record in records))
    for record, seen in zip(records, answers, strict=True):
        assert record.original is not None, "every interaction is acknowledged within 3 seconds"
        assert len(seen) == 1 and seen[0].embeds and not seen[0].ephemeral
        assert record.followups == []


async def test_a_dropped_gateway_is_resumed_and_the_answer_still_arrives(scene, stand_in):
    resumes = stand_in.gateway.resumes
    record = await scene.send("comprehend", image=scene.photo(), max_new_tokens=30)
    while record.original is None:
        await asyncio.sleep(0.01)
    await stand_in.gateway.drop()
    seen = await record.answered()
    assert seen[0].embeds
    async with asyncio.timeout(30):
        while stand_in.gateway.resumes == resumes:
            await asyncio.sleep(0.05)
    reply = (await scene.ask("tasks list"))[0]
    assert reply.embeds[0]["title"] == "Tasks"


async def test_rate_limited_webhook_routes_are_retried_and_delivered_once(scene, stand_in):
    fault = stand_in.limits.inject("PATCH", "/messages/@original", status=429, times=2, retry_after=0.3)
    record = await scene.send("comprehend", image=scene.photo(), max_new_tokens=3)
    seen = await record.answered()
    assert fault.served == 2
    assert len(seen) == 1 and seen[0].embeds
    edits = [r for r in stand_in.requests if r[0] == "PATCH" and record.token in r[1]]
    assert len(edits) == 3


async def test_a_server_error_on_the_webhook_is_retried_and_delivered_once(scene, stand_in):
    fault = stand_in.limits.inject("PATCH", "/messages/@original", status=502, times=1)
    record = await scene.send("comprehend", image=scene.photo(), max_new_tokens=3)
    seen = await record.answered()
    assert fault.served == 1
    assert len(seen) == 1 and seen[0].embeds
