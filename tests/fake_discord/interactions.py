"""INTERACTION_CREATE payloads as Discord builds them when a user acts, for the stand-in's tests.

Each builder refuses (``NotSendable``) what Discord's clients never send (see ``incoming``), unless
called with ``raw=True``, for tests of what only a modified client could send.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.fake_discord.incoming import check_click, check_context, check_menu, check_options, check_submission
from tests.fake_discord.payloads import (
    ALL_PERMISSIONS,
    ATTACHMENT_OPTION,
    CHANNEL_OPTION,
    OPTION_TYPES,
    ROLE_OPTION,
    SUB_COMMAND,
    SUB_COMMAND_GROUP,
    Attachment,
    Channel,
    Guild,
    Member,
    Role,
    snowflake,
    user_payload,
)
from tests.fake_discord.records import InteractionRecord, Message


class InteractionBuilder:
    """Builds payloads for commands the bot registered; each one opens a record of what the user sees."""

    application_id: int
    global_commands: list[dict[str, Any]]
    guild_commands: dict[int, list[dict[str, Any]]]
    interactions: dict[str, InteractionRecord]
    attachment_size_limit: int
    clock: Callable[[], float]
    message_json: Callable[[Message], dict[str, Any]]

    def record(self, payload: dict[str, Any]) -> InteractionRecord:
        return self.interactions[payload["token"]]

    def command(self, name: str, guild: Guild | None) -> dict[str, Any]:
        """A command the bot registered; users can only invoke those."""
        candidates = (self.guild_commands.get(guild.id, []) if guild else []) + self.global_commands
        for command in candidates:
            if command["name"] == name:
                return command
        raise LookupError(f"the bot never registered /{name}")

    def _options(self, options: dict[str, Any], resolved: dict[str, Any]) -> list[dict[str, Any]]:
        given = []
        for name, value in options.items():
            if value is None:
                continue
            if isinstance(value, Attachment):
                resolved.setdefault("attachments", {})[str(value.id)] = value.payload()
                given.append({"name": name, "type": ATTACHMENT_OPTION, "value": str(value.id)})
            elif isinstance(value, Channel):
                # Resolved channels carry the user's permissions in them, as Discord sends them.
                channel = value.payload() | {"permissions": str(ALL_PERMISSIONS)}
                resolved.setdefault("channels", {})[str(value.id)] = channel
                given.append({"name": name, "type": CHANNEL_OPTION, "value": str(value.id)})
            elif isinstance(value, Role):
                resolved.setdefault("roles", {})[str(value.id)] = value.payload()
                given.append({"name": name, "type": ROLE_OPTION, "value": str(value.id)})
            else:
                given.append({"name": name, "type": OPTION_TYPES[type(value)], "value": value})
        return given

    def _command_data(
        self,
        command_line: str,
        guild: Guild | None,
        options: list[dict[str, Any]],
        resolved: dict[str, Any],
        *,
        raw: bool,
        focused: str | None = None,
    ) -> dict[str, Any]:
        root, *path = command_line.split()
        command = self.command(root, guild)
        if not raw:
            check_context(command, guild is not None, f"/{root}")
            check_options(command, path, options, resolved, focused=focused)
        if path:  # ``/group sub`` or ``/group subgroup sub``, as Discord nests them
            options = [{"name": path[-1], "type": SUB_COMMAND, "options": options}]
            if len(path) == 2:
                options = [{"name": path[0], "type": SUB_COMMAND_GROUP, "options": options}]
        data: dict[str, Any] = {"id": command["id"], "name": root, "type": command.get("type", 1), "options": options}
        if "guild_id" in command:  # a guild command says where it is registered
            data["guild_id"] = command["guild_id"]
        if resolved:
            data["resolved"] = resolved
        return data

    @staticmethod
    def _channel(guild: Guild | None, in_channel: Channel | None) -> Channel | None:
        """Where the user acts: ``in_channel`` if given, else the guild's first channel (None: a new DM)."""
        if in_channel is None:
            return guild.channels[0] if guild is not None else None
        if in_channel.guild_id != (guild.id if guild is not None else None):
            raise ValueError(f"channel {in_channel.name!r} is not in {guild.name if guild else 'a DM'!r}")
        return in_channel

    def _envelope(
        self, kind: int, data: dict[str, Any], member: Member, guild: Guild | None, in_channel: Channel | None = None
    ) -> dict[str, Any]:
        """The fields every interaction carries, and a record of what the user will see."""
        payload: dict[str, Any] = {
            "id": str(snowflake()),
            "application_id": str(self.application_id),
            "type": kind,
            "data": data,
            "token": f"interaction-token-{snowflake()}",
            "version": 1,
            "locale": "en-US",
            "app_permissions": str((1 << 31) - 1),
            "entitlements": [],
            "attachment_size_limit": self.attachment_size_limit,
        }
        channel = self._channel(guild, in_channel)
        if guild is not None and channel is not None:
            payload |= {
                "guild_id": str(guild.id),
                "guild_locale": "en-US",
                "channel_id": str(channel.id),
                "channel": channel.payload(),
                "member": member.payload(),
                "authorizing_integration_owners": {"0": str(guild.id)},
                "context": 0,
            }
        else:
            channel = channel or Channel(snowflake(), None)
            payload |= {
                "channel_id": str(channel.id),
                "channel": channel.payload() | {"type": 1, "recipients": [user_payload(member.id, member.name)]},
                "user": user_payload(member.id, member.name),
                "authorizing_integration_owners": {"1": str(member.id)},
                "context": 1,
            }
        metadata = {
            "id": payload["id"],
            "type": kind,
            "user": user_payload(member.id, member.name),
            "authorizing_integration_owners": payload["authorizing_integration_owners"],
        }
        record = InteractionRecord(
            int(payload["id"]),
            payload["token"],
            self.clock(),
            channel_id=channel.id,
            metadata=metadata,
            attachment_size_limit=self.attachment_size_limit,
        )
        self.interactions[payload["token"]] = record
        return payload

    def interaction_payload(
        self,
        command_line: str,
        member: Member,
        guild: Guild | None,
        *,
        in_channel: Channel | None = None,
        raw: bool = False,
        **options: Any,
    ) -> dict[str, Any]:
        """A slash command ``/command [subcommand]`` with the given option values, used in ``in_channel``.

        ``in_channel`` defaults to the guild's first channel (a fresh DM channel without a guild).
        """
        resolved: dict[str, Any] = {}
        data = self._command_data(command_line, guild, self._options(options, resolved), resolved, raw=raw)
        return self._envelope(2, data, member, guild, in_channel)

    def autocomplete_payload(
        self,
        command_line: str,
        member: Member,
        guild: Guild | None,
        focused: str,
        *,
        in_channel: Channel | None = None,
        raw: bool = False,
        **options: Any,
    ) -> dict[str, Any]:
        """A user typing in option ``focused`` (its partial text as a string, as Discord sends it)."""
        resolved: dict[str, Any] = {}
        given = self._options(options, resolved)
        for option in given:
            if option["name"] == focused:
                option["focused"] = True
                option["value"] = str(option["value"])
        data = self._command_data(command_line, guild, given, resolved, raw=raw, focused=focused)
        return self._envelope(4, data, member, guild, in_channel)

    def context_menu_payload(
        self,
        name: str,
        member: Member,
        guild: Guild | None,
        message: dict[str, Any],
        *,
        in_channel: Channel | None = None,
        raw: bool = False,
    ) -> dict[str, Any]:
        """A message context menu command on ``message`` (a message object as Discord sends it).

        Menu names may contain spaces, so the name is looked up whole.
        """
        command = self.command(name, guild)
        if not raw:
            check_menu(command, 3, name)
            check_context(command, guild is not None, name)
        data = {
            "id": command["id"],
            "name": name,
            "type": 3,
            "target_id": message["id"],
            "resolved": {"messages": {message["id"]: message}},
        }
        if "guild_id" in command:
            data["guild_id"] = command["guild_id"]
        return self._envelope(2, data, member, guild, in_channel)

    def component_payload(
        self,
        message: Message,
        custom_id: str,
        member: Member,
        guild: Guild | None,
        component_type: int = 2,
        *,
        in_channel: Channel | None = None,
        raw: bool = False,
    ) -> dict[str, Any]:
        """A click on a button (or a select) of one of the bot's messages, as it is when the user clicks.

        ``in_channel`` defaults to the message's own channel when the stand-in knows it is in ``guild``.
        """
        if not raw:
            check_click(message, custom_id, component_type)
        if in_channel is None and guild is not None:
            in_channel = next((c for c in guild.channels if c.id == message.channel_id), None)
        data = {"custom_id": custom_id, "component_type": component_type}
        payload = self._envelope(3, data, member, guild, in_channel)
        payload["message"] = self.message_json(message)
        self.record(payload).target = message
        return payload

    def modal_payload(
        self,
        custom_id: str,
        values: dict[str, str],
        member: Member,
        guild: Guild | None,
        *,
        in_channel: Channel | None = None,
        raw: bool = False,
    ) -> dict[str, Any]:
        """A submitted modal (one the bot showed): one text input per row, as Discord sends them."""
        if not raw:
            check_submission((r.modal for r in self.interactions.values() if r.modal), custom_id, values)
        rows = [
            {"type": 1, "components": [{"type": 4, "custom_id": key, "value": value}]} for key, value in values.items()
        ]
        return self._envelope(5, {"custom_id": custom_id, "components": rows}, member, guild, in_channel)
