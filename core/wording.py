"""How values are written in the sentences people read: sizes, and someone's input quoted back."""

from __future__ import annotations

DISCORD_TEXT_LIMIT = 6000  # the longest text a Discord option (or an embed in all) may hold


def byte_size(size: int) -> str:
    """MiB with one decimal, smaller sizes in whole KiB or bytes (0.1 MiB would hide differences)."""
    if size >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**10:.0f} KiB" if size >= 2**10 else f"{size} B"


def sizes(size: int, limit: int) -> tuple[str, str]:
    """A size against its limit, in the same unit: exact bytes below a MiB, or where the rounded
    forms would look equal."""
    shown = byte_size(size), byte_size(limit)
    if min(size, limit) >= 2**20 and shown[0] != shown[1]:
        return shown
    return f"{size:,} bytes", f"{limit:,} bytes"


def quoted(text: str, limit: int = 100) -> str:
    """Someone's input inside a refusal, cut so that the reason after it still shows: Discord lets
    an option hold 6000 characters, and a message only 2000."""
    return f"“{text if len(text) <= limit else text[: limit - 1] + '…'}”"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def duration(seconds: float) -> str:
    """As people say it: the largest whole unit, and the next where it is not zero (``2 days``,
    ``1 day 12 hours``, ``5 minutes 3 seconds``), for retention and uptime alike."""
    left = round(seconds)
    for (unit, size), (smaller, smaller_size) in zip(_UNITS, (*_UNITS[1:], ("", 0)), strict=True):
        if left >= size or not smaller_size:
            count, rest = divmod(left, size)
            more = rest // smaller_size if smaller_size else 0
            return plural(count, unit) + (f" {plural(more, smaller)}" if more else "")
    raise AssertionError("the last unit always answers")


def quota_period(seconds: float) -> str:
    """A quota's period after "per": "hour" for the usual one, else its length (``10 minutes``)."""
    return "hour" if seconds == 3600 else duration(seconds)
