"""Discord's documented limits on what a bot sends: messages, interaction responses, modals and commands.

A request over a limit is answered as Discord answers it (400 ``Invalid Form Body``, code 50035,
with the offending fields nested under ``errors``) and marked ``broke_limits``, so the stand-in
records it and the test fails even when the bot swallows the error.

https://discord.com/developers/docs/resources/message#embed-object-embed-limits
https://discord.com/developers/docs/components/reference
https://discord.com/developers/docs/interactions/application-commands
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tests.fake_discord.records import DiscordError

Path = tuple[str | int, ...]

CONTENT = 2000
EMBEDS = 10
FILES = 10
EMBED_TOTAL = 6000
ROWS = 5
BUTTONS_PER_ROW = 5
CUSTOM_ID = 100
CHOICES = 25
COMMAND_OPTIONS = 25
COMMAND_TOTAL = 4000
# Chat input command and option names: lowercase where the script has case.
# https://discord.com/developers/docs/interactions/application-commands#application-command-object-application-command-naming
NAME = re.compile(r"^[-_'\w]{1,32}$")

BUTTON, SELECTS, TEXT_INPUT, LABEL = 2, (3, 5, 6, 7, 8), 4, 18
LINK_BUTTON, PREMIUM_BUTTON = 5, 6
SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2
COMPONENTS_V2 = 1 << 15


class Form:
    """The problems of one request body, reported as Discord does: nested by field path under ``errors``."""

    def __init__(self) -> None:
        self.problems: list[tuple[Path, str, str]] = []

    def add(self, path: Path, code: str, message: str) -> None:
        self.problems.append((path, code, message))

    def length(self, path: Path, value: Any, high: int, low: int = 0) -> None:
        """A string or list of ``low`` to ``high`` items; a missing one (None) is required when ``low`` > 0."""
        if value is None and low:
            self.add(path, "BASE_TYPE_REQUIRED", "This field is required")
        elif not low and len(value or ()) > high:
            self.add(path, "BASE_TYPE_MAX_LENGTH", f"Must be {high} or fewer in length.")
        elif low and not low <= len(value) <= high:
            self.add(path, "BASE_TYPE_BAD_LENGTH", f"Must be between {low} and {high} in length.")

    def within(self, path: Path, value: Any, low: float, high: float) -> None:
        """An optional number from ``low`` to ``high``."""
        if value is not None and not (isinstance(value, int | float) and low <= value <= high):
            self.add(path, "NUMBER_TYPE_OUT_OF_RANGE", f"Must be between {low} and {high}.")

    def errors(self) -> dict[str, Any]:
        nested: dict[str, Any] = {}
        for path, code, message in self.problems:
            node = nested
            for key in path:
                node = node.setdefault(str(key), {})
            node.setdefault("_errors", []).append({"code": code, "message": message})
        return nested

    def raise_if_any(self) -> None:
        if self.problems:
            raise DiscordError(400, 50035, "Invalid Form Body", errors=self.errors(), broke_limits=True)


def flatten(errors: Mapping[str, Any], path: str = "") -> list[str]:
    """``errors`` as lines ``field.path: message``, the way discord.py words them."""
    lines = []
    for key, value in errors.items():
        if key == "_errors":
            lines += [f"{path}: {error['message']}" for error in value]
        else:
            lines += flatten(value, f"{path}.{key}" if path else key)
    return lines


# Messages


def check_message(path: Path, payload: Mapping[str, Any], files: Mapping[str, bytes], size_limit: int) -> None:
    """The fields a message create or edit sets (edits leave the others as they were), and its uploads'
    sizes (each within ``size_limit``, the ``attachment_size_limit`` of the interaction or the guild)."""
    form = Form()
    form.length((*path, "content"), payload.get("content") or "", CONTENT)
    embeds = payload.get("embeds") or []
    form.length((*path, "embeds"), embeds, EMBEDS)
    total = 0
    for index, embed in enumerate(embeds):
        total += _check_embed(form, (*path, "embeds", index), embed)
    if total > EMBED_TOTAL:
        form.add((*path, "embeds"), "MAX_EMBED_SIZE_EXCEEDED", f"Embed size exceeds maximum size of {EMBED_TOTAL}")
    form.length((*path, "attachments"), list(files) or payload.get("attachments") or [], FILES)
    v2 = bool(int(payload.get("flags") or 0) & COMPONENTS_V2)
    if payload.get("components"):
        _check_components(form, (*path, "components"), payload["components"], v2=v2)
    if payload.get("allowed_mentions") is not None:
        _check_allowed_mentions(form, (*path, "allowed_mentions"), payload["allowed_mentions"])
    form.raise_if_any()
    if any(len(data) > size_limit for data in files.values()):
        raise DiscordError(413, 40005, "Request entity too large", broke_limits=True)


def check_not_empty(content: str, embeds: list[Any], files: Mapping[str, bytes], components: list[Any]) -> None:
    """A message as it will be after the request: Discord refuses one with nothing in it."""
    if not (content or embeds or files or components):
        raise DiscordError(400, 50006, "Cannot send an empty message", broke_limits=True)


def _check_embed(form: Form, path: Path, embed: Mapping[str, Any]) -> int:
    """Checks one embed; its characters that count towards the 6000 of a message."""
    form.length((*path, "title"), embed.get("title") or "", 256)
    form.length((*path, "description"), embed.get("description") or "", 4096)
    fields = embed.get("fields") or []
    form.length((*path, "fields"), fields, 25)
    for index, field in enumerate(fields):
        form.length((*path, "fields", index, "name"), field.get("name"), 256, low=1)
        form.length((*path, "fields", index, "value"), field.get("value"), 1024, low=1)
    footer, author = embed.get("footer"), embed.get("author")
    if footer is not None:
        form.length((*path, "footer", "text"), footer.get("text"), 2048, low=1)
    if author is not None:
        form.length((*path, "author", "name"), author.get("name"), 256, low=1)
    parts = [embed.get("title"), embed.get("description"), (footer or {}).get("text"), (author or {}).get("name")]
    parts += [text for field in fields for text in (field.get("name"), field.get("value"))]
    return sum(len(part or "") for part in parts)


def _check_components(form: Form, path: Path, rows: list[Mapping[str, Any]], *, v2: bool = False) -> None:
    """Action rows of buttons or one select; components v2 layouts are checked only for their ids."""
    custom_ids: list[str] = []
    if not v2:
        form.length(path, rows, ROWS)
    for index, row in enumerate(rows):
        if v2 and row.get("type") != 1:
            _collect_ids(row, custom_ids)
            continue
        if row.get("type") != 1:
            form.add((*path, index, "type"), "COMPONENT_TYPE_INVALID", "Top-level components must be action rows")
            continue
        _check_row(form, (*path, index, "components"), row.get("components") or [], custom_ids)
    if len(custom_ids) != len(set(custom_ids)):
        form.add(path, "COMPONENT_CUSTOM_ID_DUPLICATED", "Component custom id cannot be duplicated")


def _collect_ids(component: Mapping[str, Any], custom_ids: list[str]) -> None:
    if "custom_id" in component:
        custom_ids.append(component["custom_id"])
    for child in [*(component.get("components") or []), component.get("component"), component.get("accessory")]:
        if isinstance(child, Mapping):
            _collect_ids(child, custom_ids)


def _check_row(form: Form, path: Path, items: list[Mapping[str, Any]], custom_ids: list[str]) -> None:
    form.length(path, items, BUTTONS_PER_ROW, low=1)
    if len(items) > 1 and any(item.get("type") in SELECTS for item in items):
        form.add(path, "COMPONENT_LAYOUT_WIDTH_EXCEEDED", "The specified component exceeds the maximum width")
    for index, item in enumerate(items):
        where = (*path, index)
        kind = item.get("type")
        if kind == BUTTON:
            _check_button(form, where, item)
        elif kind in SELECTS:
            _check_select(form, where, item)
        else:
            form.add((*where, "type"), "COMPONENT_TYPE_INVALID", f"Component type {kind} cannot be in a message row")
        if "custom_id" in item:
            custom_ids.append(item["custom_id"])


def _check_button(form: Form, path: Path, button: Mapping[str, Any]) -> None:
    style = button.get("style")
    if style == LINK_BUTTON:
        form.length((*path, "url"), button.get("url"), 512, low=1)
    elif style != PREMIUM_BUTTON:
        form.length((*path, "custom_id"), button.get("custom_id"), CUSTOM_ID, low=1)
    form.length((*path, "label"), button.get("label") or "", 80)
    if style != PREMIUM_BUTTON and not (button.get("label") or button.get("emoji")):
        form.add(path, "BUTTON_COMPONENT_NO_LABEL_OR_EMOJI", "A button needs a label or an emoji")


def _check_select(form: Form, path: Path, select: Mapping[str, Any]) -> None:
    form.length((*path, "custom_id"), select.get("custom_id"), CUSTOM_ID, low=1)
    form.length((*path, "placeholder"), select.get("placeholder") or "", 150)
    form.within((*path, "min_values"), select.get("min_values"), 0, 25)
    form.within((*path, "max_values"), select.get("max_values"), 1, 25)
    if select.get("type") == 3:  # a string select lists its options
        options = select.get("options") or []
        form.length((*path, "options"), options, 25, low=1)
        for index, option in enumerate(options):
            for key in ("label", "value"):
                form.length((*path, "options", index, key), option.get(key), 100, low=1)
            form.length((*path, "options", index, "description"), option.get("description") or "", 100)


# Interaction responses


def checked_choices(choices: Any) -> list[dict[str, Any]]:
    """An autocomplete answer: at most 25 choices, each named in 1 to 100 characters, text values up to 100."""
    form = Form()
    path: Path = ("data", "choices")
    if not isinstance(choices, list):
        form.add(path, "BASE_TYPE_REQUIRED", "This field is required")
        form.raise_if_any()
    form.length(path, choices, CHOICES)
    for index, choice in enumerate(choices):
        form.length((*path, index, "name"), choice.get("name"), 100, low=1)
        if isinstance(choice.get("value"), str):
            form.length((*path, index, "value"), choice["value"], 100)
    form.raise_if_any()
    return choices


def checked_modal(data: dict[str, Any]) -> dict[str, Any]:
    """A modal: a title of 1 to 45 characters and 1 to 5 text inputs, in rows or labels."""
    form = Form()
    form.length(("data", "title"), data.get("title"), 45, low=1)
    form.length(("data", "custom_id"), data.get("custom_id"), CUSTOM_ID, low=1)
    components = data.get("components") or []
    form.length(("data", "components"), components, 5, low=1)
    for index, component in enumerate(components):
        path: Path = ("data", "components", index)
        if component.get("type") == LABEL:
            form.length((*path, "label"), component.get("label"), 45, low=1)
            form.length((*path, "description"), component.get("description") or "", 100)
            inputs, path = [component.get("component") or {}], (*path, "component")
        else:
            inputs, path = component.get("components") or [], (*path, "components", 0)
            if len(inputs) != 1:
                form.add(path, "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 1 in length.")
        for item in inputs[:1]:
            if item.get("type") == TEXT_INPUT:
                _check_text_input(form, path, item, labelled=component.get("type") == LABEL)
    form.raise_if_any()
    return data


def _check_text_input(form: Form, path: Path, item: Mapping[str, Any], *, labelled: bool) -> None:
    form.length((*path, "custom_id"), item.get("custom_id"), CUSTOM_ID, low=1)
    if not labelled:
        form.length((*path, "label"), item.get("label"), 45, low=1)
    form.length((*path, "placeholder"), item.get("placeholder") or "", 100)
    form.length((*path, "value"), item.get("value") or "", 4000)
    form.within((*path, "min_length"), item.get("min_length"), 0, 4000)
    form.within((*path, "max_length"), item.get("max_length"), 1, 4000)


def _check_allowed_mentions(form: Form, path: Path, allowed: Any) -> None:
    """Known parse types, and no type both parsed and listed."""
    if not isinstance(allowed, dict):
        form.add(path, "MODEL_TYPE_CONVERT", "Must be an object.")
        return
    parse = allowed.get("parse") or []
    if not set(parse) <= {"everyone", "roles", "users"}:
        form.add((*path, "parse"), "ENUM_TYPE_COERCE", f"Value(s) {parse} are not valid.")
    for kind in ("users", "roles"):
        if kind in parse and allowed.get(kind):
            form.add(
                path,
                "MESSAGE_ALLOWED_MENTIONS_PARSE_EXCLUSIVE",
                f'parse:["{kind}"] and {kind}: [ids...] are mutually exclusive.',
            )
        form.length((*path, kind), allowed.get(kind) or [], 100)


# Application commands


def check_commands(commands: Any) -> None:
    """A bulk overwrite: each command, and no more than 100 chat input, 5 user and 5 message commands."""
    form = Form()
    if not isinstance(commands, list):
        form.add((), "BASE_TYPE_REQUIRED", "Must be an array of application commands.")
        form.raise_if_any()
    for kind, most in ((1, 100), (2, 5), (3, 5)):
        same = [c for c in commands if c.get("type", 1) == kind]
        if len(same) > most:
            form.add((), "APPLICATION_COMMAND_TOO_MANY", f"Must be {most} or fewer commands of type {kind}.")
        names = [c.get("name") for c in same]
        if len(names) != len(set(names)):
            form.add((), "APPLICATION_COMMANDS_DUPLICATE_NAME", "Application command names must be unique")
    for index, command in enumerate(commands):
        _check_command(form, (index,), command)
    form.raise_if_any()


def _check_command(form: Form, path: Path, command: Mapping[str, Any]) -> None:
    kind = command.get("type", 1)
    options = command.get("options") or []
    if kind == 1:
        _check_name(form, (*path, "name"), command.get("name"))
        form.length((*path, "description"), command.get("description"), 100, low=1)
        _check_options(form, (*path, "options"), options, depth=0)
    else:  # user and message commands: any name up to 32 characters, no description, no options
        form.length((*path, "name"), command.get("name"), 32, low=1)
        if command.get("description"):
            form.add((*path, "description"), "APPLICATION_COMMAND_DESCRIPTION_INVALID", "Must be empty.")
        if options:
            form.add((*path, "options"), "APPLICATION_COMMAND_OPTIONS_INVALID", "Must be empty.")
    for key, allowed in (("contexts", {0, 1, 2}), ("integration_types", {0, 1})):
        if not set(command.get(key) or []) <= allowed:
            form.add((*path, key), "ENUM_TYPE_COERCE", f"Values must be among {sorted(allowed)}.")
    if _characters(command) > COMMAND_TOTAL:
        form.add(path, "APPLICATION_COMMAND_TOO_LARGE", f"Command exceeds maximum size ({COMMAND_TOTAL})")


def _check_name(form: Form, path: Path, name: Any) -> None:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name != name.lower():
        form.add(path, "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")


def _check_options(form: Form, path: Path, options: list[Mapping[str, Any]], depth: int) -> None:
    form.length(path, options, COMMAND_OPTIONS)
    names = [option.get("name") for option in options]
    if len(names) != len(set(names)):
        form.add(path, "APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS", "Option names must be unique")
    nested = [option.get("type") in (SUB_COMMAND, SUB_COMMAND_GROUP) for option in options]
    if any(nested) and not all(nested):
        form.add(path, "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID", "Subcommands cannot be mixed with other options")
    required = [bool(option.get("required")) for option in options if option.get("type") not in (1, 2)]
    if required != sorted(required, reverse=True):
        form.add(path, "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID", "Required options must be before optional ones")
    for index, option in enumerate(options):
        _check_option(form, (*path, index), option, depth)


def _check_option(form: Form, path: Path, option: Mapping[str, Any], depth: int) -> None:
    kind = option.get("type")
    _check_name(form, (*path, "name"), option.get("name"))
    form.length((*path, "description"), option.get("description"), 100, low=1)
    if kind in (SUB_COMMAND, SUB_COMMAND_GROUP):
        # A group holds subcommands only; a subcommand holds no further nesting; two levels at most.
        if depth >= (1 if kind == SUB_COMMAND_GROUP else 2):
            form.add((*path, "type"), "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID", "Subcommands nest too deep")
        children = option.get("options") or []
        if kind == SUB_COMMAND_GROUP and any(child.get("type") != SUB_COMMAND for child in children):
            form.add((*path, "options"), "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID", "A group holds subcommands")
        if kind == SUB_COMMAND and any(child.get("type") in (1, 2) for child in children):
            form.add((*path, "options"), "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID", "Subcommands cannot nest")
        _check_options(form, (*path, "options"), children, depth + 1)
        return
    if not isinstance(kind, int) or not 3 <= kind <= 11:
        form.add((*path, "type"), "ENUM_TYPE_COERCE", f"Value {kind!r} is not a valid option type.")
    choices = option.get("choices") or []
    form.length((*path, "choices"), choices, CHOICES)
    if choices and option.get("autocomplete"):
        form.add((*path, "autocomplete"), "APPLICATION_COMMAND_AUTOCOMPLETE_INVALID", "Cannot have choices too")
    for index, choice in enumerate(choices):
        form.length((*path, "choices", index, "name"), choice.get("name"), 100, low=1)
        if isinstance(choice.get("value"), str):
            form.length((*path, "choices", index, "value"), choice["value"], 100)
    form.within((*path, "min_length"), option.get("min_length"), 0, 6000)
    form.within((*path, "max_length"), option.get("max_length"), 1, 6000)
    low, high = option.get("min_value"), option.get("max_value")
    if low is not None and high is not None and low > high:
        form.add((*path, "max_value"), "NUMBER_TYPE_MIN", f"Must be at least min_value ({low}).")


def _characters(command: Mapping[str, Any]) -> int:
    """Names, descriptions and choice names and values of a command and its options, which count together."""
    total = len(command.get("name") or "") + len(command.get("description") or "")
    for choice in command.get("choices") or []:
        total += len(choice.get("name") or "") + len(str(choice.get("value", "")))
    return total + sum(_characters(option) for option in command.get("options") or [])
