"""What a Discord client sends, checked against what the bot registered and showed.

Discord's clients enforce each option's type, range, length and choices, send only registered
options (every required one included), keep guild-only commands out of DMs, and offer clicks only
on components a message has. A test that builds anything else is told at once, before the bot sees
it; ``raw=True`` on the builders sends it anyway, as a modified client could.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from tests.fake_discord.records import Message

SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2
STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER, ATTACHMENT = 3, 4, 5, 6, 7, 8, 9, 10, 11
TYPE_NAMES = {
    STRING: "text",
    INTEGER: "integer",
    BOOLEAN: "boolean",
    USER: "user",
    CHANNEL: "channel",
    ROLE: "role",
    MENTIONABLE: "mentionable",
    NUMBER: "number",
    ATTACHMENT: "attachment",
}
# What a client may send for an option of each type besides the type itself.
_ALSO_ACCEPTED = {NUMBER: {INTEGER}, MENTIONABLE: {USER, ROLE}}
BOT_DM = 1
SAFE_INTEGER = 2**53


class NotSendable(ValueError):
    """An interaction no Discord client sends; pass ``raw=True`` to send it as a modified client could."""


def check_context(command: Mapping[str, Any], in_guild: bool, label: str) -> None:
    """Guild commands, and global ones registered without the bot-DM context, are not offered in DMs."""
    if in_guild:
        return
    contexts = command.get("contexts")
    in_dms = BOT_DM in contexts if contexts is not None else command.get("dm_permission") is not False
    if "guild_id" in command or not in_dms:
        raise NotSendable(f"{label} is registered for servers only: Discord does not offer it in DMs")


def check_menu(command: Mapping[str, Any], kind: int, label: str) -> None:
    if command.get("type", 1) != kind:
        raise NotSendable(f"{label} is not registered as a command of type {kind}")


def check_options(
    command: Mapping[str, Any],
    path: list[str],
    given: list[dict[str, Any]],
    resolved: Mapping[str, Any],
    *,
    focused: str | None = None,
) -> None:
    """Options of ``/command path...`` as a client sends them. ``focused``: an autocomplete, sent as the user
    types, so values need not be complete (nor within their ranges) yet; the focused one is partial text."""
    label = f"/{command['name']}"
    declared = command.get("options") or []
    for part in path:
        nested = next(
            (o for o in declared if o["name"] == part and o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP)), None
        )
        if nested is None:
            raise NotSendable(f"{label} has no subcommand {part!r}")
        label, declared = f"{label} {part}", nested.get("options") or []
    if any(option["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP) for option in declared):
        raise NotSendable(f"{label} is a group: a client sends one of its subcommands")
    by_name = {option["name"]: option for option in declared}
    for option in given:
        if option["name"] not in by_name:
            raise NotSendable(f"{label} has no option {option['name']!r} (it has {sorted(by_name)})")
        if option["name"] != focused:
            typing = focused is not None
            _check_value(f"{label} {option['name']}", by_name[option["name"]], option, resolved, typing=typing)
    if focused is not None:
        if not by_name.get(focused, {}).get("autocomplete"):
            raise NotSendable(f"{label} {focused} is not registered with autocomplete")
        return
    missing = sorted(set(n for n, o in by_name.items() if o.get("required")) - {o["name"] for o in given})
    if missing:
        raise NotSendable(f"{label} needs {', '.join(missing)}: a client sends every required option")


def _check_value(
    label: str, declared: Mapping[str, Any], option: Mapping[str, Any], resolved: Mapping[str, Any], *, typing: bool
) -> None:
    kind, sent, value = declared["type"], option["type"], option["value"]
    if sent != kind and sent not in _ALSO_ACCEPTED.get(kind, ()):
        raise NotSendable(f"{label} takes {TYPE_NAMES.get(kind, kind)} values, not {TYPE_NAMES.get(sent, sent)}")
    if typing:
        return
    choices = declared.get("choices")
    if choices and value not in [choice["value"] for choice in choices]:
        raise NotSendable(f"{label} offers only {[choice['value'] for choice in choices]}, not {value!r}")
    if kind == INTEGER and not -SAFE_INTEGER < value < SAFE_INTEGER:
        raise NotSendable(f"{label}: {value} is beyond what Discord's integers hold")
    if kind in (INTEGER, NUMBER):
        _check_bounds(label, value, declared.get("min_value"), declared.get("max_value"), "")
    elif kind == STRING:
        _check_bounds(label, len(value), declared.get("min_length"), declared.get("max_length"), " characters")
    elif kind == CHANNEL and declared.get("channel_types") is not None:
        channel_type = resolved["channels"][value]["type"]
        if channel_type not in declared["channel_types"]:
            raise NotSendable(f"{label} offers channels of types {declared['channel_types']}, not {channel_type}")


def _check_bounds(label: str, value: float, low: float | None, high: float | None, unit: str) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        allowed = f"at most {high}" if low is None else f"at least {low}" if high is None else f"{low} to {high}"
        raise NotSendable(f"{label}: {value}{unit}, where {allowed} are registered")


def check_click(message: Message, custom_id: str, component_type: int) -> None:
    """A click on a component the message has (as the user saw it when clicking), and not disabled."""
    for component in _components(message.components):
        if component.get("custom_id") == custom_id:
            if component.get("disabled"):
                raise NotSendable(f"the component {custom_id!r} is disabled: a client does not send clicks on it")
            if component.get("type") != component_type:
                raise NotSendable(f"the component {custom_id!r} is of type {component.get('type')}")
            return
    raise NotSendable(f"message {message.id} has no component {custom_id!r}")


def check_submission(modals: Iterable[Mapping[str, Any]], custom_id: str, values: Mapping[str, str]) -> None:
    """A modal the bot showed, with its text inputs: each required one filled, each within its lengths."""
    modal = next((m for m in modals if m.get("custom_id") == custom_id), None)
    if modal is None:
        raise NotSendable(f"the bot never showed a modal {custom_id!r}")
    inputs = {item["custom_id"]: item for item in _components(modal.get("components") or []) if item.get("type") == 4}
    unknown = set(values) - set(inputs)
    if unknown:
        raise NotSendable(f"modal {custom_id!r} has no text inputs {sorted(unknown)}")
    for key, item in inputs.items():
        text = values.get(key, "")
        if item.get("required", True) and not text:
            raise NotSendable(f"modal {custom_id!r} requires {key!r}")
        if text:
            label = f"modal {custom_id!r} input {key!r}"
            _check_bounds(label, len(text), item.get("min_length"), item.get("max_length"), " characters")


def _components(components: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    """Every component, rows and labels opened."""
    for component in components:
        yield component
        children = list(component.get("components") or [])
        if isinstance(component.get("component"), Mapping):
            children.append(component["component"])
        yield from _components(children)
