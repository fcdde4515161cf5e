"""/queue's wording: the line, the asker's places, the typical times and the quota, in a few lines."""

from __future__ import annotations

from dataclasses import replace

from cogs.queue import queue_embed
from core.line_view import LineView
from core.quotas import QuotaLeft
from core.serving import LineStatus
from core.serving.line_times import TypicalTimes

QUIET = LineView(
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b",
    False,
    LineStatus(0, 0, None),
    (),
    0,
    QuotaLeft(0, 8, 0, 120, 3600, None, 0.0),
    None,
)


def _fields(view: LineView, in_dms: bool = False) -> dict[str, str]:
    embed = queue_embed(view, in_dms)
    assert len(embed) < 6000
    return {field.name: field.value for field in embed.fields}


def test_a_busy_line_names_the_chosen_model_the_askers_places_and_the_typical_times():
    busy = LineView(
        "openflamingo/OpenFlamingo-4B-vitl-rpj3b",
        True,
        LineStatus(5, 2, TypicalTimes(answers=12, waited=42.4, answering=95.0, window_seconds=600)),
        (2, 4, 5),
        1,
        QuotaLeft(4, 8, 117, 120, 3600, 2519.5, 6.2),
        None,
    )
    assert _fields(busy) == {
        "Model": "**OpenFlamingo-4B-vitl-rpj3b** (this server's choice)",
        "Line": "5 waiting · 2 being answered",
        "Your requests": "number 2, 4 and 5 in line · 1 being answered",
        "Lately": "A request typically waits 43 s in line and takes 2 min to answer "
        "(the median of 12 answers in the last 10 minutes).",
        "This server's quota": "4 of 8 answered or waiting at once\n3 of 120 left per hour (one more back in 42 min)\n"
        "You can ask again in 7 s.",
    }


def test_a_quiet_line_and_direct_messages():
    assert _fields(QUIET, in_dms=True) == {
        "Model": "**OpenFlamingo-9B-vitl-mpt7b**",
        "Line": "Empty: a request starts at once.",
        "Your requests": "Nothing in line.",
        "Lately": "No answers lately.",
        "Your quota": "0 of 8 answered or waiting at once\n120 of 120 left per hour\nYou can ask now.",
    }


def test_a_member_kept_from_asking_here_is_told_why():
    kept = replace(QUIET, refusal="I only answer in <#5> on this server.")
    assert _fields(kept)["Asking here"] == "I only answer in <#5> on this server."


def test_short_times_keep_their_tenths():
    lately = replace(
        QUIET, line=LineStatus(0, 0, TypicalTimes(answers=1, waited=0.02, answering=1.25, window_seconds=600))
    )
    assert _fields(lately)["Lately"] == (
        "A request typically waits under 0.1 s in line and takes 1.2 s to answer "
        "(the median of 1 answer in the last 10 minutes)."
    )
