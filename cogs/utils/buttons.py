"""The bot's buttons (under answers and waiting requests, and /forget-me's), in a module cog reloads leave alone.

They are dynamic items whose ``custom_id`` names a stored request or a waiting interaction, so
they keep working after a restart and past discord.py's view timeout. discord.py registers the
class of every dynamic item in a view it keeps: were this class in the reloaded cog, an answer
posted by a request that outlived a reload would register the old class again, and a changed
pattern would run one click twice. The work is the cog's, looked up at each click.
"""

from __future__ import annotations

import re
from typing import Any, Self

import discord

from cogs.utils.bot import Interaction
from cogs.utils.errors import reply_with_error
from core.errors import NotAllowedHere

_ACTIONS = {
    "reroll": ("Re-roll", "🎲", discord.ButtonStyle.secondary),
    "prompt": ("Prompt", "📝", discord.ButtonStyle.secondary),
    "delete": ("Delete", "🗑️", discord.ButtonStyle.secondary),
    "report": ("Report", "🚩", discord.ButtonStyle.secondary),
    "cancel": ("Cancel", "✖️", discord.ButtonStyle.danger),
}


_ACTION_ID = r"flamingo:(?P<action>[a-z]+):(?P<id>[0-9]{1,20})"


class ActionButton(discord.ui.DynamicItem[discord.ui.Button], template=_ACTION_ID):
    """One button of an answer (or of a waiting request); the cog does the work, so reloads apply to it."""

    def __init__(self, action: str, target_id: int) -> None:
        label, emoji, style = _ACTIONS[action]
        button: discord.ui.Button[discord.ui.View] = discord.ui.Button(
            label=label, emoji=emoji, style=style, custom_id=f"flamingo:{action}:{target_id}"
        )
        super().__init__(button)
        self.action, self.target_id = action, target_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str]
    ) -> Self:
        if match["action"] not in _ACTIONS:
            raise ValueError(f"unknown button action {match['action']!r}")
        return cls(match["action"], int(match["id"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # only this bot sends its buttons
        await _handle(interaction, "Inference", f"on_{self.action}", self.target_id)


class ForgetExamplesButton(
    discord.ui.DynamicItem[discord.ui.Button], template=r"flamingo-forget:(?P<user>[0-9]{1,20})"
):
    """/forget-me's confirmation that the examples someone added to servers' tasks may go."""

    def __init__(self, user_id: int) -> None:
        button: discord.ui.Button[discord.ui.View] = discord.ui.Button(
            label="Delete my examples", style=discord.ButtonStyle.danger, custom_id=f"flamingo-forget:{user_id}"
        )
        super().__init__(button)
        self.user_id = user_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str]
    ) -> Self:
        return cls(int(match["user"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # only this bot sends its buttons
        await _handle(interaction, "Privacy", "on_forget_examples", self.user_id)


class CancelEvaluationButton(
    discord.ui.DynamicItem[discord.ui.Button], template=r"flamingo-evaluation:(?P<job>[0-9]{1,20})"
):
    """Stops a task's evaluation (``/manage-tasks evaluate``), named by its interaction's id."""

    def __init__(self, job_id: int) -> None:
        button: discord.ui.Button[discord.ui.View] = discord.ui.Button(
            label="Cancel", emoji="✖️", style=discord.ButtonStyle.danger, custom_id=f"flamingo-evaluation:{job_id}"
        )
        super().__init__(button)
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str]
    ) -> Self:
        return cls(int(match["job"]))

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]  # only this bot sends its buttons
        await _handle(interaction, "Tasks", "on_cancel_evaluation", self.job_id)


async def _handle(interaction: Interaction, cog_name: str, method: str, target_id: int) -> None:
    """A click, handled by the cog as it is now (held while cogs reload, finished before a shutdown).
    discord.py only logs what a dynamic item raises; the user is told here instead."""
    client = interaction.client
    client.track_current_task()
    await client.after_reload()
    try:
        cog = client.get_cog(cog_name)
        if cog is None:
            raise NotAllowedHere("The bot is being updated; try again in a moment.")
        await getattr(cog, method)(interaction, target_id)
    except Exception as error:
        await reply_with_error(interaction, error)


def button_view(*buttons: ActionButton) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for button in buttons:
        view.add_item(button)
    return view


# The target of the buttons of an answer that was not stored: request ids start far above it.
UNSTORED = 0


def answer_view(request_id: int | None) -> discord.ui.View:
    """An answer's buttons. Unstored (``request_id`` None: the database refused the write), it keeps
    only Delete and Report, which work from the message itself; Re-roll and Prompt need its images and prompt."""
    if request_id is None:
        return button_view(ActionButton("delete", UNSTORED), ActionButton("report", UNSTORED))
    return button_view(*(ActionButton(action, request_id) for action in ("reroll", "prompt", "delete", "report")))


def answered_request(message: discord.Message) -> int | None:
    """The stored request an answer's buttons name, if the message is one of the bot's answers."""
    for row in message.components:
        for child in getattr(row, "children", ()):
            found = re.fullmatch(_ACTION_ID, getattr(child, "custom_id", None) or "")
            if found is not None:
                return None if int(found["id"]) == UNSTORED else int(found["id"])
    return None
