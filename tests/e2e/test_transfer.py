"""A checkpoint's layers on another language model, end to end: the bot says so, and describe takes --language-model."""

from __future__ import annotations

import asyncio

import pytest

from tests.fake_discord.payloads import MANAGE_GUILD
from tests.helpers.cli import run_main
from tests.helpers.e2e import E2E, Scene, click, new_bot
from tests.helpers.settings import IMAGES

pytestmark = [E2E, pytest.mark.transfer]


async def test_answers_and_status_name_the_language_model_under_the_layers(
    stand_in, model_dirs, other_language_models, tmp_path
):
    twin = other_language_models["twin"]
    bot = new_bot(stand_in, model_dirs, tmp_path)
    bot.env["FLAMINGO_MODEL__LANGUAGE_MODEL"] = str(twin)
    await bot.start()
    try:
        guild = await stand_in.join("Transferred")
        moderator = stand_in.add_member(guild, "moderator", permissions=MANAGE_GUILD | (1 << 31))
        here = Scene(stand_in, guild, stand_in.add_member(guild, "reader"), moderator)
        answer = (await here.ask("comprehend", image=here.photo("coffee"), prompt="<image>Output:", max_new_tokens=6))[
            0
        ]

        shown = (await (await click(here, answer, "Prompt")).answered())[0]
        fields = {f["name"]: f["value"] for f in shown.embeds[0]["fields"]}
        assert fields["Model"] == "llama with twin as its language model"

        # The default's answers are stored under no model name, so the label never gets in a re-roll's way.
        rerolled = (await (await click(here, answer, "Re-roll")).answered())[0]
        assert rerolled.embeds[0]["footer"]["text"].startswith("task: caption · ")
        shown = (await (await click(here, rerolled, "Prompt")).answered())[0]
        assert {f["name"]: f["value"] for f in shown.embeds[0]["fields"]}["Model"] == fields["Model"]

        owner = stand_in.admin_guild.members[stand_in.owner.id]
        shown = (await here.ask("admin status", owner, stand_in.admin_guild))[0]
        fields = {f["name"]: f["value"] for f in shown.embeds[0]["fields"]}
        named = f"{model_dirs['llama'].resolve()} with {twin.resolve()} as its language model"
        assert fields["Model"] == named
        assert f"Loaded {named} (fp32)" in bot.log()
    finally:
        exit_status = await bot.stop()
        assert exit_status == 0, bot.log()[-4000:]


async def test_describe_puts_the_layers_on_the_language_model_it_is_given(model_dirs, other_language_models):
    ask = [
        "describe",
        IMAGES / "coffee.jpg",
        "--model",
        model_dirs["llama"],
        "--device",
        "cpu",
        "--max-new-tokens",
        "6",
    ]
    own = await asyncio.to_thread(run_main, *ask)
    transferred = await asyncio.to_thread(run_main, *ask, "--language-model", other_language_models["twin"])
    assert (own.returncode, transferred.returncode) == (0, 0), transferred.stderr[-2000:]
    assert transferred.stdout != own.stdout
    assert f"Putting the trained layers of {model_dirs['llama'].resolve()} on " in transferred.stderr
