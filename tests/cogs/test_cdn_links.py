"""Uploads whose CDN link has expired, or whose download stops halfway, as Discord's CDN serves them."""

from __future__ import annotations

from tests.cogs.test_downloads import GONE
from tests.helpers.world import photo, private


async def test_an_expired_link_is_explained_and_the_file_asked_for_again(world):
    """Discord signs attachment links with an expiry (``ex``); past it the CDN answers 404."""
    upload = photo(world)
    world.discord.expire(upload)
    assert await private(world, "comprehend", image=upload) == GONE


async def test_a_download_cut_off_halfway_is_refused_at_its_bound(world, monkeypatch):
    monkeypatch.setattr(world.bot.settings.images, "download_seconds", 1.0)
    upload = photo(world)
    world.discord.cdn_stalls.add(upload.id)
    message = await private(world, "comprehend", image=upload, max_new_tokens=2)
    assert message == "Downloading “chelsea.jpg” from Discord took over 1 s; send it again."
