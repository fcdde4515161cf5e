"""Members' uploads read from Discord's CDN: bounded in time, and each failure told in one sentence.

A link can expire or be deleted before the bot reads it, and a download can stall; left to
aiohttp's defaults it would keep the interaction "thinking" for 5 minutes, then fail without a reason.
"""

from __future__ import annotations

import asyncio

import aiohttp
import discord

from core.errors import DownloadFailed
from core.wording import quoted


async def download(attachment: discord.Attachment, seconds: float) -> bytes:
    """The attachment's bytes, or ``DownloadFailed`` saying what went wrong and to send it again."""
    name = quoted(attachment.filename, 60)
    try:
        async with asyncio.timeout(seconds):
            return await attachment.read()
    except TimeoutError:
        raise DownloadFailed(f"Downloading {name} from Discord took over {seconds:g} s; send it again.") from None
    except (discord.NotFound, discord.Forbidden):
        raise DownloadFailed(
            f"Discord no longer has {name} (its link may have expired); send the file again."
        ) from None
    except (discord.HTTPException, aiohttp.ClientError) as error:
        status = f" (HTTP {error.status})" if isinstance(error, discord.HTTPException) else ""
        raise DownloadFailed(
            f"Discord's file server failed while I downloaded {name}{status}; send it again in a moment."
        ) from None
