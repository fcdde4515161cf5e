"""/comprehend as a user meets it: deferral, the answer embed, and every refusal in private."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from cogs.utils.answering import params_text
from core.config import GenerationSettings
from core.errors import GenerationFailed, ServiceBusy
from core.generation import GenerationParams
from core.images import TOO_SLOW
from tests.helpers.gated_engine import GatedEngine
from tests.helpers.heavy_images import slow_header_jpeg
from tests.helpers.settings import IMAGES
from tests.helpers.world import photo


async def test_comprehend_answers_with_the_image_and_the_models_answer(world, llama_engine, builtin_tasks, photos):
    messages = await world.reply("comprehend", image=photo(world), max_new_tokens=6)
    assert len(messages) == 1
    reply = messages[0]
    assert not reply.ephemeral
    embed = reply.embeds[0]
    task = builtin_tasks["caption"]
    expected = llama_engine.run(
        llama_engine.prepare([photos["chelsea"]], task.prompt_template, task, GenerationParams(max_new_tokens=6))
    )
    assert embed["description"] == (expected.text or "*(the model gave an empty answer)*")
    assert embed["author"]["name"] == "Reader asked"
    assert embed["footer"]["text"].startswith("task: caption · ")
    assert embed["image"]["url"] == "attachment://image.jpg"
    assert list(reply.files) == ["image.jpg"]


async def _private_only(record) -> str:
    """The user sees exactly one message, private, and no public 'thinking' left behind."""
    messages = await record.answered()
    assert len(messages) == 1, messages
    assert messages[0].ephemeral
    return messages[0].content


async def test_prompt_without_image_marker_is_refused_privately_at_once(world):
    record = world.invoke("comprehend", image=photo(world), prompt="What is this?")
    message = await _private_only(record)
    assert (
        message
        == "The prompt has 0 <image> markers but 1 image was given; put one `<image>` where each image should be read."
    )
    assert world.bot.service.waiting == 0


async def test_out_of_range_parameters_are_refused_privately(world):
    assert await _private_only(world.invoke("comprehend", image=photo(world), num_beams=40, raw=True)) == (
        "num_beams must be between 1 and 5 (got 40)."
    )
    assert await _private_only(world.invoke("comprehend", image=photo(world), temperature=0.3)) == (
        "temperature only applies when sampling; turn on do_sample."
    )


async def test_reserved_tokens_in_the_prompt_are_refused(world):
    message = await _private_only(world.invoke("comprehend", image=photo(world), prompt="<image>Output:<|endofchunk|>"))
    assert "reserved token `<|endofchunk|>`" in message


async def test_a_file_that_is_not_an_image_replaces_the_public_thinking_with_a_private_message(world):
    text = world.discord.upload("notes.png", b"just some text, not a picture", "image/png")
    message = await _private_only(world.invoke("comprehend", image=text))
    assert message == "This file is not an image I can read; send a JPEG, PNG, WebP, GIF, BMP or TIFF file."


async def test_an_announced_oversized_file_is_refused_before_download(world):
    big = world.discord.upload("huge.png", b"\0" * (26 * 1024 * 1024), "image/png")
    message = await _private_only(world.invoke("comprehend", image=big))
    assert message == "The file is 26.0 MiB; the limit is 25.0 MiB."
    assert ("GET", f"/cdn/attachments/{big.id}/huge.png") not in world.discord.requests


async def test_more_images_than_the_operator_allows_are_refused_before_download(world, monkeypatch):
    monkeypatch.setattr(world.bot.settings.images, "max_per_request", 2)
    uploads = [photo(world, name) for name in ("chelsea", "coffee", "rocket")]
    images = dict(zip(("image", "image2", "image3"), uploads, strict=True))
    message = await _private_only(world.invoke("comprehend", prompt="<image><image><image>", **images))
    assert message == "At most 2 images can be read at once."
    assert not [path for method, path in world.discord.requests if path.startswith("/cdn/")]


async def test_unknown_task_is_refused_privately(world):
    message = await _private_only(world.invoke("comprehend", image=photo(world), task="poetry"))
    assert message.startswith("There is no task called “poetry” here; the built-in tasks are caption, vqa")


class _Given:
    """A queue ticket whose answer the test provides."""

    position = None

    def __init__(self, produce) -> None:
        self.produce = produce

    async def answer(self):
        return await self.produce()

    def cancel(self) -> None:
        pass


def answer_with(monkeypatch, world, produce) -> None:
    monkeypatch.setattr(world.bot.service, "submit", lambda *args, **kwargs: _Given(produce))


async def test_busy_model_is_reported_privately(world, monkeypatch):
    from core.errors import ServiceBusy

    def busy(*args, **kwargs):
        raise ServiceBusy("The model is busy (8 requests are already waiting); try again in a minute.")

    monkeypatch.setattr(world.bot.service, "submit", busy)
    message = await _private_only(world.invoke("comprehend", image=photo(world)))
    assert message == "The model is busy (8 requests are already waiting); try again in a minute."


async def test_unexpected_errors_give_an_id_that_is_in_the_log(world, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(world.bot.service, "submit", broken)
    message = await _private_only(world.invoke("comprehend", image=photo(world)))
    error_id = message.split("`")[1]
    assert message == f"Something went wrong on our side (error id `{error_id}`); the bot's owner can look it up."
    assert any(error_id in record.getMessage() and record.exc_info for record in caplog.records)


async def test_long_answers_are_clipped_in_the_embed_and_attached_whole(world, monkeypatch):
    from core.model.engine import Answer

    long_text = "word " * 2000

    async def verbose(*args, **kwargs):
        return Answer(long_text.strip(), (1,) * 900, "<image>Output:", 10, True, 0.5)

    answer_with(monkeypatch, world, verbose)
    reply = (await world.reply("comprehend", image=photo(world)))[0]
    assert len(reply.embeds[0]["description"]) == 4096
    assert reply.embeds[0]["description"].endswith("…")
    assert reply.files["answer.txt"].decode() == long_text.strip()


async def test_answers_never_mention_anyone(world, monkeypatch):
    from core.model.engine import Answer

    async def pinging(*args, **kwargs):
        return Answer("@everyone look", (1,), "<image>Output:", 10, True, 0.1)

    answer_with(monkeypatch, world, pinging)
    reply = (await world.reply("comprehend", image=photo(world)))[0]
    assert reply.embeds[0]["description"] == "@everyone look"
    assert reply.silent  # the edit that carried the answer told Discord to ping nobody


async def test_comprehend_works_in_direct_messages_with_builtin_tasks(world):
    reply = (await world.reply("comprehend", guild=None, image=photo(world), task="vqa", max_new_tokens=3))[0]
    assert reply.embeds[0]["footer"]["text"].startswith("task: vqa · ")


async def test_the_interaction_is_acknowledged_within_three_seconds_even_when_the_model_is_slow(world, monkeypatch):
    original = world.bot.service.submit

    def slow(*args, **kwargs):
        async def late():
            await asyncio.sleep(3.5)
            return await original(*args, **kwargs).answer()

        return _Given(late)

    monkeypatch.setattr(world.bot.service, "submit", slow)
    reply = (await world.reply("comprehend", image=photo(world), max_new_tokens=2))[0]
    assert not reply.ephemeral and reply.embeds


async def test_a_report_slowed_by_the_channels_rate_limit_still_thanks_the_reporter(world):
    """Posting may wait past Discord's 3 seconds to acknowledge a click; the click is acknowledged first."""
    answer = (await world.reply("comprehend", image=photo(world), max_new_tokens=2))[0]
    mods = await world.discord.add_channel(world.guild, "mods")
    await world.bot.store.change_guild_settings(world.guild.id, lambda rules: replace(rules, report_channel=mods.id))
    world.discord.limits.inject("POST", f"/channels/{mods.id}/messages", status=429, retry_after=3.2)
    report = next(b["custom_id"] for row in answer.components for b in row["components"] if b["label"] == "Report")
    payload = world.discord.component_payload(answer, report, world.member, world.guild)
    world.bot._connection.parse_interaction_create(payload)
    thanks = await world.discord.record(payload).answered()
    assert [(m.content, m.ephemeral) for m in thanks] == [("Thank you; the moderators have been told.", True)]
    assert len(world.discord.channel_messages[mods.id]) == 1


async def test_a_private_request_refused_while_waiting_replaces_its_place_in_line(world):
    """With private answers, its place in line and Cancel button would stay beside the refusal."""
    await world.bot.store.change_guild_settings(world.guild.id, lambda rules: replace(rules, ephemeral_answers=True))
    gated = GatedEngine(world.bot.service.engine)
    world.bot.service.engine = gated
    running = world.invoke("comprehend", image=photo(world), max_new_tokens=2)
    await asyncio.to_thread(gated.started.wait, 30)
    queued = world.invoke("comprehend", image=photo(world, "rocket"), max_new_tokens=2)
    await queued.wait_for(lambda: bool(queued.original and queued.original.content.startswith("⏳")), timeout=30)
    world.bot.request_shutdown()  # queued requests are told to try later
    gated.gate.set()
    await running.answered()
    await queued.wait_for(lambda: not queued.original.content.startswith("⏳"), timeout=30)
    for _ in range(100):  # closed before anything is asserted, so a failure cannot leave it closing
        if world.bot.is_closed():
            break
        await asyncio.sleep(0.05)
    assert [message.content for message in queued.visible] == ["The bot is shutting down; your request was not run."]
    assert queued.original.ephemeral and queued.original.components == []
    assert world.bot.is_closed()


async def test_a_refusal_once_files_are_read_keeps_the_cooldown_one_from_the_signature_does_not(world, monkeypatch):
    """A valid picture beside a truncated one was refused as damaged after decoding, and a crafted
    header took seconds to read: both could be sent again at once, over and over. A file that is
    plainly not an image costs nothing."""
    monkeypatch.setattr(world.bot.settings.quotas, "user_cooldown_seconds", 30)
    not_an_image = world.discord.upload("notes.png", b"these are notes, not a picture", "image/png")
    for _ in range(2):
        message = await private_reply(world, image=not_an_image)
        assert message.startswith("This file is not an image I can read")
    not_a_png = world.discord.upload("fake.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")
    assert (await private_reply(world, image=not_a_png)).startswith("This file is not an image I can read")
    assert (await private_reply(world, image=photo(world))).startswith("You are asking too fast")
    whole = (IMAGES / "rocket.jpg").read_bytes()
    truncated = world.discord.upload("half.jpg", whole[: len(whole) // 2], "image/jpeg")
    two = {"image": photo(world), "image2": truncated, "prompt": "<image>and<image>Output:"}
    assert (await private_reply(world, world.moderator, **two)).startswith(
        "Image 2: The image file is damaged or incomplete"  # which of the two
    )
    assert (await private_reply(world, world.moderator, **two)).startswith("You are asking too fast")


async def test_an_upload_read_too_long_is_refused_and_the_next_is_answered(world, monkeypatch):
    """Pillow read a crafted 25 MiB JPEG header for 17.7 s, holding one of the four decoding threads
    that every server shares; uploads are now read in worker processes killed at ``decode_seconds``."""
    monkeypatch.setattr(world.bot.settings.images, "decode_seconds", 0.2)
    slow = world.discord.upload("slow.jpg", slow_header_jpeg(4 * 2**20), "image/jpeg")
    assert await private_reply(world, image=slow) == TOO_SLOW
    monkeypatch.setattr(world.bot.settings.images, "decode_seconds", 10.0)
    messages = await world.reply("comprehend", image=photo(world))
    assert not messages[0].ephemeral


async def private_reply(world, member=None, **options) -> str:
    [message] = await world.reply("comprehend", member, **options)
    assert message.ephemeral
    return message.content


async def test_a_command_out_of_step_with_discord_says_it_is_being_updated(world):
    """A client still showing an older version of the command (before a sync) gets a plain answer."""
    payload = world.discord.interaction_payload("comprehend", world.member, world.guild, image=photo(world))
    payload["data"]["options"] = []  # from before the image was required, say
    world.bot._connection.parse_interaction_create(payload)
    [message] = await world.discord.record(payload).answered()
    assert message.ephemeral and message.content == "This command is being updated; try again in a moment."


def outcomes(world) -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for sample in world.bot.metrics.requests.collect()[0].samples
        if sample.name.endswith("_total")
    }


async def test_each_request_is_logged_without_its_content_and_counted_by_outcome(world, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="core.asking")
    messages = await world.reply("comprehend", image=photo(world), prompt="<image>A secret about my cat:")
    assert not messages[0].ephemeral
    [line] = [record.getMessage() for record in caplog.records if "answered in guild" in record.getMessage()]
    assert line.startswith("request ") and f"guild {world.guild.id}: task caption, model llama, 1 image(s)" in line
    assert "secret" not in caplog.text

    for error in (ServiceBusy("The model is busy; try again in a minute."), GenerationFailed("The model failed.")):

        def submit(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(world.bot.service, "submit", submit)
        await world.reply("comprehend", image=photo(world))
    assert outcomes(world) == {"answered": 1.0, "refused": 1.0, "failed": 1.0}


def test_the_prompt_button_tells_how_the_answer_was_made_in_words():
    settings = GenerationSettings()
    assert params_text(GenerationParams(), settings) == "greedy · up to 30 new tokens"  # the default, in force
    sampled = GenerationParams(do_sample=True, temperature=0.7, top_k=40, max_new_tokens=12)
    assert params_text(sampled, settings) == "sampled · up to 12 new tokens · temperature 0.7 · top_k 40"
    beams = GenerationParams(num_beams=3, length_penalty=1.5)
    assert params_text(beams, settings) == "beam search over 3 beams · up to 30 new tokens · length_penalty 1.5"
    # Stored before the operator narrowed a range: described, not refused.
    narrowed = GenerationSettings(max_new_tokens={"low": 1, "high": 8}, max_new_tokens_default=8)
    assert params_text(GenerationParams(max_new_tokens=200), narrowed) == "greedy · up to 200 new tokens"
