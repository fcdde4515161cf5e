"""Uploads read in worker processes: the same pictures and refusals as in the bot's own process, and
a file that takes too long is refused, its process killed, instead of holding a thread for good."""

from __future__ import annotations

import numpy as np
import pytest

from core.config import ImageSettings
from core.errors import BadImage
from core.images import TOO_SLOW, in_worker, load_image, read_image
from core.workers import WorkerPool
from tests.helpers.heavy_images import reads_forever, slow_header_jpeg, small_jpeg
from tests.helpers.jobs import crash
from tests.helpers.settings import IMAGES

_POOL = WorkerPool("test-image-workers", size=1, waiting=0, preload=("core.images", "tests.helpers.heavy_images"))
QUICK = ImageSettings(decode_seconds=0.2)


async def test_a_members_upload_reads_as_in_the_bots_own_process():
    data = (IMAGES / "rocket.jpg").read_bytes()
    here, there = load_image(data, ImageSettings()), await read_image(data, ImageSettings())
    assert there.size == here.size and there.mode == "RGB"
    assert np.array_equal(np.asarray(there), np.asarray(here))
    with pytest.raises(BadImage, match=r"^The image file is damaged or incomplete; try saving it again\.$"):
        await read_image(data[: len(data) // 2], ImageSettings())


async def test_a_file_read_for_too_long_is_refused_and_the_next_is_read():
    with pytest.raises(BadImage) as refused:
        await in_worker(_POOL, reads_forever, small_jpeg(), QUICK)
    assert (
        str(refused.value) == TOO_SLOW == "This image took too long to read; save it again as an ordinary JPEG or PNG."
    )
    assert (await in_worker(_POOL, load_image, small_jpeg(), QUICK)).size == (64, 48)


async def test_a_crash_while_reading_is_a_refusal_not_the_bots_end():
    with pytest.raises(BadImage, match=r"^This image could not be read; save it again as an ordinary JPEG or PNG\.$"):
        await in_worker(_POOL, crash, small_jpeg(), QUICK)


async def test_the_slow_header_jpeg_of_the_benchmarks_is_a_valid_picture_of_the_size_asked():
    data = slow_header_jpeg(64 * 1024)
    assert len(data) == 64 * 1024
    image = await read_image(data, ImageSettings())
    assert image.size == (64, 48)
    assert image.getpixel((32, 24)) == load_image(small_jpeg(), ImageSettings()).getpixel((32, 24))
