"""Uploads that are costly to read, for the tests of the decode bounds and for benchmarks.

``slow_header_jpeg`` is a valid JPEG whose header Pillow (13) reads one byte at a time: after the
start-of-image marker comes a run of 0xFF fill bytes (which JPEG allows before a marker), then an
ordinary small picture. Pillow's header parser loops in Python over every fill byte (libjpeg, which
decodes the pixels afterwards, skips them at once): on a shared 2-core machine 4 MiB took 1.5 s to
read, and 25 MiB, the upload limit, 17 s. Runs of 0x00 instead (junk before a marker) read about six
times faster.
"""

from __future__ import annotations

import io
import time
from typing import NoReturn

from PIL import Image

_START_OF_IMAGE = b"\xff\xd8"


def small_jpeg(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def slow_header_jpeg(size: int = 25 * 2**20) -> bytes:
    """A valid 64×48 JPEG of ``size`` bytes (at least the small picture's), nearly all of it fill
    bytes that Pillow's header parser reads one by one."""
    picture = small_jpeg()
    fill = max(0, size - len(picture))
    return _START_OF_IMAGE + b"\xff" * fill + picture[len(_START_OF_IMAGE) :]


def reads_forever(*_: object) -> NoReturn:
    """A stand-in for reading a file (an image, a task file) in a worker process that never ends:
    only the time bound stops it."""
    while True:
        time.sleep(60)
