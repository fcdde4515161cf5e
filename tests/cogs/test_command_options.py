"""What Discord's clients are told of each option, so they refuse out-of-range values as the user types."""

from __future__ import annotations

import dataclasses
import types

import discord
from discord import app_commands

from cogs.inference import Inference
from cogs.utils.autocomplete import model_names
from cogs.utils.options import limit_options
from core.serving.model_choice import short_name


def registered(world, name: str) -> dict:
    return next(command for command in world.discord.global_commands if command["name"] == name)


def options(command: dict, *path: str) -> dict[str, dict]:
    """The options of a command, or of one of its subcommands, by name."""
    for name in path:
        command = next(option for option in command["options"] if option["name"] == name)
    return {option["name"]: option for option in command["options"]}


def bounds(option: dict) -> tuple:
    if option["type"] == 3:
        return option.get("min_length"), option.get("max_length")
    return option.get("min_value"), option.get("max_value")


async def test_comprehend_declares_the_operators_ranges(world):
    settings = world.bot.settings
    declared = options(registered(world, "comprehend"))
    for name, allowed in settings.generation:
        if name in declared:
            assert bounds(declared[name]) == (allowed.low, allowed.high), name
    assert bounds(declared["max_new_tokens"]) == (1, 256) and bounds(declared["temperature"]) == (0.05, 2.0)
    assert isinstance(declared["top_k"]["max_value"], int)  # an integer option takes whole numbers
    assert bounds(declared["prompt"]) == (1, settings.prompts.max_chars)
    assert bounds(declared["task"]) == (None, None) and "image4" in declared


async def test_images_the_operator_turned_off_are_not_offered(world, monkeypatch):
    monkeypatch.setattr(world.bot.settings.images, "max_per_request", 2)
    command = Inference(world.bot).comprehend.to_dict(world.bot.tree)
    names = [option["name"] for option in command["options"]]
    assert "image2" in names and "image3" not in names and "image4" not in names
    assert "image4" in options(registered(world, "comprehend"))  # the running cog's copy is its own


async def test_task_options_declare_the_task_limits(world):
    limits = world.bot.settings.limits
    manage = registered(world, "manage-tasks")
    examples = (1, limits.max_examples_per_task)
    assert bounds(options(manage, "move-example")["position"]) == examples
    assert bounds(options(manage, "move-example")["to"]) == examples
    assert bounds(options(manage, "edit-example")["text"]) == (1, limits.max_example_chars)
    created = options(manage, "create")
    assert [bounds(created[name]) for name in ("name", "template", "description")] == [
        (1, 32),
        (1, limits.max_template_chars),
        (0, limits.max_description_chars),
    ]
    assert bounds(options(manage, "rename")["new_name"]) == bounds(options(manage, "import")["name"]) == (1, 32)


async def test_server_quotas_and_channels_declare_what_a_server_may_choose(world):
    settings = registered(world, "settings")
    quotas = options(settings, "quotas")
    defaults = world.bot.settings.quotas
    assert bounds(quotas["cooldown_seconds"]) == (defaults.user_cooldown_seconds, 3600)
    assert bounds(quotas["in_flight"]) == (1, defaults.guild_in_flight)
    assert bounds(quotas["per_period"]) == (1, defaults.guild_per_period)
    # Text, announcement, voice and stage chats, forums and media channels: their posts follow them.
    for action in ("add", "remove"):
        assert set(options(settings, "channels", action)["channel"]["channel_types"]) == {0, 2, 5, 13, 15, 16}
    assert set(options(settings, "reports")["channel"]["channel_types"]) == {0, 5}


def leaves(options: list[dict], path: str) -> list[tuple[str, dict]]:
    """The options a user fills in, under their subcommands and groups."""
    found = []
    for option in options:
        name = f"{path} {option['name']}"
        found += leaves(option.get("options", []), name) if option["type"] in (1, 2) else [(name, option)]
    return found


async def test_every_option_says_what_it_is_for(world):
    commands = [*world.discord.global_commands, *world.discord.guild_commands[world.admin_guild.id]]
    options = [leaf for command in commands for leaf in leaves(command.get("options", []), command["name"])]
    assert "settings channels add channel" in [name for name, _ in options]
    assert [name for name, option in options if option.get("description") in (None, "", "…")] == []


async def test_admin_commands_are_shown_to_the_admin_guilds_administrators_only(world):
    [admin] = world.discord.guild_commands[world.admin_guild.id]
    assert int(admin["default_member_permissions"]) == 1 << 3  # Administrator
    assert bounds(options(admin, "sync")["guild_id"]) == (17, 20)


async def test_limits_discord_would_refuse_to_sync_are_capped_or_left_to_the_bot(world):
    """A prompt limit of 8000 characters worked before it was declared; Discord takes at most 6000."""

    @app_commands.command(description="d")
    async def command(interaction: discord.Interaction, text: str, seconds: int) -> None: ...

    limit_options(command, text=(1, 8000), seconds=(7200, 3600))
    declared = options(command.to_dict(world.bot.tree))
    assert bounds(declared["text"]) == (1, 6000)
    assert bounds(declared["seconds"]) == (None, None)  # no value could meet it: the bot says why


async def test_model_choices_fit_discords_100_characters(world):
    """A choice's value holds at most 100 characters; one longer made Discord refuse the whole list."""
    long_folder = "/srv/models/" + "x" * 101
    catalog = world.bot.models
    world.bot.models = dataclasses.replace(catalog, choices=(*catalog.choices, long_folder))
    interaction = types.SimpleNamespace(client=world.bot)
    choices = await model_names(interaction, "")
    assert choices and all(len(choice.value) <= 100 and len(choice.name) <= 100 for choice in choices)
    assert [choice.value for choice in choices] == [short_name(name) for name in catalog.choices][: len(choices)]


async def test_settings_show_reads_a_zero_cooldown_as_no_wait(world):
    [shown] = await world.reply("settings show", world.moderator)
    fields = {field["name"]: field["value"] for field in shown.embeds[0]["fields"]}
    assert fields["Quotas (the bot's defaults)"] == (
        "no wait between a member's requests · up to 64 answered or waiting at once · 10000 per hour"
    )


async def test_evaluate_completes_the_task_and_the_model_as_they_are_typed(world):
    declared = options(registered(world, "manage-tasks"), "evaluate")
    assert [(name, option.get("required", False)) for name, option in declared.items()] == [
        ("task", True),
        ("model", False),
    ]
    assert declared["task"]["autocomplete"] and declared["model"]["autocomplete"]
