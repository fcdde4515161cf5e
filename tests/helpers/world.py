"""Uploads and private replies in the cogs' tests' world (the real bot on the stand-in, driven in-process)."""

from __future__ import annotations

import io

from PIL import Image

from tests.helpers.settings import IMAGES


def photo(world, name: str = "chelsea"):
    return world.discord.upload(f"{name}.jpg", (IMAGES / f"{name}.jpg").read_bytes(), "image/jpeg")


def small_image(world, shade: int = 0):
    buffer = io.BytesIO()
    Image.new("RGB", (12, 8), (shade, 255 - shade, 90)).save(buffer, format="PNG")
    return world.discord.upload(f"small-{shade}.png", buffer.getvalue(), "image/png")


def picture_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\xff\xd8"), data[:8]
    return Image.open(io.BytesIO(data)).size


async def private(world, command: str, member=None, guild="default", **options) -> str:
    """The one private, plain-text message a command answers with."""
    messages = await world.reply(command, member, guild, **options)
    assert len(messages) == 1, messages
    assert messages[0].ephemeral, messages[0]
    assert not messages[0].embeds and not messages[0].files
    return messages[0].content
