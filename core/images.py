"""Turn uploaded bytes into a safe RGB image, or refuse them with a message a person understands.

Only common raster formats are opened (Pillow can parse many more, some through external
programs). The pixel count is checked from the header before any pixel is decoded, because
Pillow's own decompression-bomb guard only warns below ~179 million pixels. A crafted header can
still take Pillow many seconds to read, so uploads are read in worker processes (``read_image``,
and ``core.tasks.uploads`` for task uploads), which are killed when a file takes too long.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.config import ImageSettings
from core.errors import BadImage, ServiceBusy
from core.wording import sizes
from core.workers import PoolFull, TimedOut, WorkerDied, WorkerPool

T = TypeVar("T")

# Multi-picture JPEGs (MPO, from phone cameras) open through the JPEG plugin.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
_NOT_AN_IMAGE = f"This file is not an image I can read; send a {_ACCEPTED_NAMES} file."
_SIGNATURE_BYTES = 16  # what Pillow's formats are told apart by
_WHITE = (255, 255, 255)
# A centred crop wider than this keeps everything the vision encoder's centre crop sees.
MAX_ASPECT_RATIO = 2.0
# Decodes at once, across the process: each may briefly take about 12 bytes per pixel (460 MB at
# the 40-megapixel limit), and many requests, imports and example uploads can arrive together.
_DECODING = threading.BoundedSemaphore(4)
# What Pillow raises on malformed files besides its own errors: any of them means a bad upload.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TypeError, KeyError, IndexError, struct.error)
# Members' uploads read in worker processes, four at once as in this process, each killed past
# ``decode_seconds``. Task uploads have workers of their own (``core.tasks.uploads``).
_MEMBERS_WORKERS = WorkerPool("member-images", size=4, waiting=64, preload=(__name__,))
TOO_SLOW = "This image took too long to read; save it again as an ordinary JPEG or PNG."
_WORKER_DIED = "This image could not be read; save it again as an ordinary JPEG or PNG."
BUSY = "The bot is reading many images right now; try again in a minute."


def check_file_size(size: int, settings: ImageSettings) -> None:
    """Also used before downloading an attachment whose size is announced."""
    if size == 0:
        raise BadImage("The file is empty.")
    if size > settings.max_bytes:
        shown, limit = sizes(size, settings.max_bytes)
        raise BadImage(f"The file is {shown}; the limit is {limit}.")


def _open(data: bytes, settings: ImageSettings) -> Image.Image:
    check_file_size(len(data), settings)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise BadImage(_too_many_pixels(settings, "far more than that")) from None
    except (UnidentifiedImageError, *_DECODE_ERRORS):
        raise BadImage(_NOT_AN_IMAGE) from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage("The image has no pixels.")
    if width * height > settings.max_pixels:
        raise BadImage(_too_many_pixels(settings, f"{width}×{height} pixels"))
    return image


def _too_many_pixels(settings: ImageSettings, actual: str) -> str:
    return f"Images may have at most {settings.max_pixels / 1e6:g} million pixels; this one has {actual}."


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float greyscale to 0..255 (Pillow's convert clips instead).

    In place, in float32 (exact for 16-bit values): a 40-megapixel upload takes one 160 MB array.
    """
    pixels = np.asarray(image, dtype=np.float32)
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    if image.mode == "F":
        finite = np.isfinite(pixels)
        low = float(pixels.min(where=finite, initial=np.inf))
        high = float(pixels.max(where=finite, initial=-np.inf))
        low, high = (low, high) if low <= high else (0.0, 1.0)
        np.nan_to_num(pixels, copy=False, nan=low, posinf=high, neginf=low)
        del finite
        pixels -= low
        pixels *= 255.0 / (high - low or 1.0)
    else:
        top = 255.0 if image.mode == "I" and pixels.max() <= 255 else 65535.0
        np.clip(pixels, 0, top, out=pixels)
        pixels *= 255.0 / top
    np.rint(pixels, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith(("I", "F")):
        image = _to_eight_bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _shrink(image: Image.Image, max_short_side: int) -> Image.Image:
    width, height = image.size
    short = min(width, height)
    if short <= max_short_side:
        return image
    scale = max_short_side / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block is ignored, since the pixels are fine."""
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        return image


def check_signature(data: bytes, settings: ImageSettings) -> None:
    """Whether the file starts as an accepted format does: the check made before any parsing, so a
    file that is plainly not an image is refused for nothing. Reading a header is not free (Pillow
    took 8 s over a crafted 25 MiB JPEG header), so every later refusal counts as work spent."""
    check_file_size(len(data), settings)
    Image.init()
    prefix = data[:_SIGNATURE_BYTES]
    for name in ACCEPTED_FORMATS:
        _, accepts = Image.OPEN[name]
        verdict = accepts is None or accepts(prefix)
        if verdict and not isinstance(verdict, str):  # a string is Pillow's reason for refusing
            return
    raise BadImage(_NOT_AN_IMAGE)


def load_image(data: bytes, settings: ImageSettings) -> Image.Image:
    """Decode an upload: first frame, EXIF orientation applied, transparency on white, RGB, bounded size.

    A strip whose long side would stay above ``STORED_LONG_SIDE`` keeps only its centre
    (``crop_extreme_aspect``), which holds all the encoder reads: a 1024×39062 picture would
    otherwise be held whole, 120 MB, while its request waits in line.
    """
    with _DECODING:  # the header too: a crafted one can take seconds to read
        return _decoded(_open(data, settings), settings)


class StoredImage:
    """A stored image (``encode_for_storage``'s JPEG), decoded by ``load_image`` the first time its pixels
    are asked for, then kept. Its header is checked at once, and tells what the pixels will take."""

    def __init__(self, data: bytes, settings: ImageSettings) -> None:
        width, height = _open(data, settings).size
        self.data = data
        self.decoded_bytes = width * height * 3  # at most: RGB, never enlarged
        self._settings = settings
        self._image: Image.Image | None = None
        self._lock = threading.Lock()  # the model's worker and a Ray encoding thread may ask at once

    def load(self) -> Image.Image:
        with self._lock:
            if self._image is None:
                self._image = load_image(self.data, self._settings)
            return self._image


async def read_image(data: bytes, settings: ImageSettings) -> Image.Image:
    """``load_image`` in a worker process: a file that takes longer than ``settings.decode_seconds``
    to read is refused and its process killed, and no thread of the bot's is held meanwhile."""
    return await in_worker(_MEMBERS_WORKERS, load_image, data, settings)


async def in_worker(
    workers: WorkerPool, read: Callable[[bytes, ImageSettings], T], data: bytes, settings: ImageSettings
) -> T:
    """``read(data, settings)`` in one of ``workers``' processes, any way it fails told as a bad image."""
    try:
        return await workers.run(settings.decode_seconds, read, data, settings)
    except TimedOut:
        raise BadImage(TOO_SLOW) from None
    except WorkerDied:  # a crash in a decoder, or the system out of memory
        raise BadImage(_WORKER_DIED) from None
    except PoolFull:
        raise ServiceBusy(BUSY) from None


def _decoded(image: Image.Image, settings: ImageSettings) -> Image.Image:
    try:
        if image.format in ("JPEG", "MPO"):
            # Let libjpeg decode at a reduced scale when the image is far larger than we keep.
            image.draft("RGB", (settings.max_side_kept, settings.max_side_kept))
        image.seek(0)
        image.load()
        image = _to_rgb(_upright(image))
    except Image.DecompressionBombError:
        raise BadImage(_too_many_pixels(settings, "far more than that")) from None
    except _DECODE_ERRORS:
        raise BadImage("The image file is damaged or incomplete; try saving it again.") from None
    if max(image.size) * min(1.0, settings.max_side_kept / min(image.size)) > STORED_LONG_SIDE:
        image = crop_extreme_aspect(image)
    return _shrink(image, settings.max_side_kept)


def crop_extreme_aspect(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Centre-crop very elongated images before the encoder's resize-then-centre-crop.

    Resizing a 10000×1 image so that its short side is 224 would allocate billions of pixels. The
    kept region still contains everything the encoder's own centre crop looks at.
    """
    width, height = image.size
    if max(width, height) <= max_ratio * min(width, height):
        return image
    if width > height:
        keep = max(1, int(max_ratio * height))
        left = (width - keep) // 2
        return image.crop((left, 0, left + keep, height))
    keep = max(1, int(max_ratio * width))
    top = (height - keep) // 2
    return image.crop((0, top, width, top + keep))


STORED_SHORT_SIDE = 448
# A panorama's long side too is bounded (JPEG itself stops at 65,535 pixels).
STORED_LONG_SIDE = 4096
_STORED_QUALITY = 90


# The longest side of an example's image as /tasks show sends it (it is shown as a thumbnail).
PREVIEW_SIDE = 640


def preview(stored: bytes) -> bytes:
    """A stored image (ours, JPEG) within ``PREVIEW_SIDE``: /tasks show sends every example's to
    whoever asks, and eight tall examples were 13 MB a time."""
    image = Image.open(io.BytesIO(stored))
    if max(image.size) <= PREVIEW_SIDE:
        return stored
    image.draft("RGB", (PREVIEW_SIDE, PREVIEW_SIDE))
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=_STORED_QUALITY)
    return buffer.getvalue()


def image_for_storage(data: bytes, settings: ImageSettings) -> bytes:
    """An upload decoded under the upload rules and encoded as stored, so a crafted file stores nothing odd."""
    return encode_for_storage(load_image(data, settings))


def encode_for_storage(image: Image.Image) -> bytes:
    """A task example or a request's image as saved: JPEG, short side at most twice the encoder's
    224 pixels, long side at most ``STORED_LONG_SIDE``."""
    image = _shrink(image, STORED_SHORT_SIDE)
    if max(image.size) > STORED_LONG_SIDE:
        scale = STORED_LONG_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_STORED_QUALITY)
    return buffer.getvalue()
