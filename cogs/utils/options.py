"""Option limits declared to Discord from the operator's config, so that clients refuse out-of-range
values as the user types, instead of the bot after the command is sent.

The bot still checks every value itself: a client may show an older version of a command, and a
request can be forged. Limits come from config, which decorators cannot read, so they are set on
each cog's own copy of its commands when the cog is made.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from discord import AppCommandOptionType, app_commands

from core.generation import OPTIONS
from core.wording import DISCORD_TEXT_LIMIT

Callback = TypeVar("Callback", bound=Callable[..., object])


def generation_options(callback: Callback) -> Callback:
    """One option per row of ``core.generation.OPTIONS``, described by its help, in place of the
    callback's ``**options``: what discord.py reads (the signature) is the table, so a new generation
    option needs no change here."""
    signature = inspect.signature(callback)
    fixed = [parameter for parameter in signature.parameters.values() if parameter.kind is not parameter.VAR_KEYWORD]
    added = [
        inspect.Parameter(
            option.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=option.default,
            annotation=option.kind if option.default is not None else option.kind | None,
        )
        for option in OPTIONS
    ]
    vars(callback)["__signature__"] = signature.replace(parameters=[*fixed, *added])  # what inspect.signature reads
    return app_commands.describe(**{option.name: option.help for option in OPTIONS})(callback)


def limit_options(command: app_commands.Command, **limits: tuple[float, float]) -> None:
    """Numbers get a least and a greatest value, text a least and a greatest length (discord.py
    sends ``min_value`` and ``max_value`` of a string option as its lengths)."""
    for name, (low, high) in limits.items():
        parameter = command._params[name]
        if parameter.type in (AppCommandOptionType.integer, AppCommandOptionType.string):
            low, high = math.ceil(low), math.floor(high)
        if parameter.type is AppCommandOptionType.string:  # Discord refuses to sync longer limits
            low, high = min(low, DISCORD_TEXT_LIMIT), min(high, DISCORD_TEXT_LIMIT)
        if low > high:  # a setting no value can meet: the bot's own refusal explains it
            continue
        command._params[name] = replace(parameter, min_value=low, max_value=high)


def drop_options(command: app_commands.Command, *names: str) -> None:
    """Options the operator turned off (such as a fourth image) are not offered; their defaults apply."""
    for name in names:
        del command._params[name]
