"""What ``/queue`` shows a member: the model their requests use, the line and how long answers take
lately, their own places in it, and what is left of the quotas, all read without changing anything.

Anyone may look, wherever they are: the reply is private and shows no server content, so a
member the channels or role keep from asking is told so here rather than refused (``refusal``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from core.asking import Asker, Asking, check_rules
from core.errors import NotAllowedHere
from core.quotas import QuotaLeft
from core.serving import LineStatus, QueuedRequest


@dataclass(frozen=True)
class LineView:
    model: str
    chosen: bool  # the server's choice, not the bot's default
    line: LineStatus
    places: tuple[int, ...]  # the asker's requests waiting, by their place in line
    running: int  # the asker's requests being answered
    quota: QuotaLeft  # the server's, or the asker's own in direct messages
    refusal: str | None  # why the asker could not ask here (the server's channels or role); None: they can


async def view_line(asking: Asking, asker: Asker, waiting: Iterable[tuple[QueuedRequest, int]]) -> LineView:
    """``waiting``: every request waiting for its answer, with who asked (the front end's place-in-line
    updates keep them); the asker's own are picked out, in any server or direct message."""
    rules = await asking.rules(asker.guild_id)
    try:
        check_rules(asker, rules)
        refusal = None
    except NotAllowedHere as error:
        refusal = str(error)
    positions = [ticket.position for ticket, requester in waiting if requester == asker.user_id]
    model = asking.models.in_force(rules.model)
    return LineView(
        model,
        model != asking.models.default,
        asking.service.line_status(),
        tuple(sorted(place for place in positions if place is not None)),
        positions.count(None),
        asking.quotas.left(asker.guild_id, asker.user_id, rules.quotas(asking.settings.quotas)),
        refusal,
    )
