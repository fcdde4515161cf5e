"""Uploads to RGB images: which files are accepted, what they become, and the message for each refusal.

Every image is made in memory with Pillow/numpy, except the project's own photos in data/images.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import core.images
from core.config import PROJECT_ROOT, ImageSettings
from core.errors import BadImage
from core.images import (
    MAX_ASPECT_RATIO,
    STORED_LONG_SIDE,
    check_signature,
    crop_extreme_aspect,
    encode_for_storage,
    load_image,
)

DEFAULT = ImageSettings()
SMALL_KEPT = ImageSettings(max_side_kept=256)

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

Colour = tuple[int, int, int]
PixelCheck = tuple[tuple[int, int], Colour]

NOT_READABLE = r"not an image I can read; send a JPEG, PNG, WebP, GIF, BMP or TIFF file\."
DAMAGED = r"^The image file is damaged or incomplete; try saving it again\.$"
PHOTOS = sorted((PROJECT_ROOT / "data" / "images").glob("*.jpg"))


# --- helpers -------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(size: tuple[int, int] = (32, 16), left: Colour = RED, right: Colour = BLUE) -> Image.Image:
    """Left half one colour, right half another: checks that pixels land where they should."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def frames(colours: list[Colour], size: tuple[int, int] = (16, 16)) -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for colour in colours]


def multi_frame(fmt: str, colours: list[Colour], **options: object) -> bytes:
    first, *rest = frames(colours)
    return encode(first, fmt, save_all=True, append_images=rest, **options)


def greyscale_row(values: list[float], dtype: type[np.generic]) -> Image.Image:
    return Image.fromarray(np.array([values], dtype=dtype))


def noise_rgb(size: int, seed: int = 1) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG signature and IHDR claiming a size, with no pixel data at all.

    Decoding it would fail as damaged, so getting the pixel-cap message proves the cap is checked first.
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


def corrupt_idat(data: bytes) -> bytes:
    """Flip bytes in the middle of the first IDAT chunk's compressed data (the CRC no longer matches)."""
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    damaged = bytearray(data)
    for offset in range(start + length // 4, start + length // 4 + 64):
        damaged[offset] ^= 0xFF
    return bytes(damaged)


def tiff_with_rational_strip_offsets() -> bytes:
    """A TIFF whose strip offsets are typed as a fraction: Pillow fails on it with a TypeError."""
    data = bytearray(encode(noise_rgb(16), "TIFF"))
    assert data[:4] == b"II*\0"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", data, ifd)[0], 12):
        if struct.unpack_from("<H", data, entry)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, entry + 2, 5)  # RATIONAL
    return bytes(data)


def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def assert_colour(actual: object, expected: Colour, tolerance: int) -> None:
    assert isinstance(actual, tuple), actual
    assert len(actual) == 3, actual
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


def assert_pixels(image: Image.Image, checks: list[PixelCheck], tolerance: int) -> None:
    for xy, expected in checks:
        assert_colour(image.getpixel(xy), expected, tolerance)


# --- accepted inputs -----------------------------------------------------------------------------


def _rgba() -> bytes:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 1), (0, 0, 255, 255))
    image.putpixel((2, 2), (0, 0, 0, 128))
    return encode(image, "PNG")


def _la() -> bytes:
    image = Image.new("LA", (4, 4), (0, 0))  # fully transparent black
    image.putpixel((1, 1), (50, 255))
    return encode(image, "PNG")


def _palette_with_transparency(fmt: str) -> bytes:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([*BLACK, *RED, *GREEN] + [0] * (256 - 3) * 3)
    image.putpixel((1, 1), 1)
    image.putpixel((2, 2), 2)
    return encode(image, fmt, transparency=0)


def _one_bit(fmt: str) -> bytes:
    image = Image.new("1", (8, 8), 0)
    image.putpixel((1, 1), 1)
    return encode(image, fmt)


def _cmyk_jpeg() -> bytes:
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data


def _sixteen_bit_png() -> bytes:
    data = encode(greyscale_row([65535, 32768, 0, 1000], np.uint16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    return data


def _tiff_of(values: list[float], dtype: type[np.generic], mode: str) -> Callable[[], bytes]:
    def make() -> bytes:
        data = encode(greyscale_row(values, dtype), "TIFF")
        assert Image.open(io.BytesIO(data)).mode == mode
        return data

    return make


def _grey(value: int) -> Colour:
    return (value, value, value)


HALVES_CHECKS: list[PixelCheck] = [((2, 2), RED), ((8, 13), RED), ((24, 2), BLUE), ((29, 13), BLUE)]


@pytest.mark.parametrize(
    ("make", "size", "checks", "tolerance"),
    [
        pytest.param(lambda: encode(halves(), "JPEG", quality=95), (32, 16), HALVES_CHECKS, 12, id="jpeg"),
        pytest.param(lambda: encode(halves(), "PNG"), (32, 16), HALVES_CHECKS, 0, id="png"),
        pytest.param(lambda: encode(halves(), "WEBP", lossless=True), (32, 16), HALVES_CHECKS, 0, id="webp-lossless"),
        pytest.param(lambda: encode(halves(), "WEBP", quality=90), (32, 16), HALVES_CHECKS, 16, id="webp-lossy"),
        pytest.param(lambda: encode(halves(), "GIF"), (32, 16), HALVES_CHECKS, 0, id="gif"),
        pytest.param(lambda: encode(halves(), "BMP"), (32, 16), HALVES_CHECKS, 0, id="bmp"),
        pytest.param(lambda: encode(halves(), "TIFF"), (32, 16), HALVES_CHECKS, 0, id="tiff"),
        pytest.param(
            lambda: multi_frame("GIF", [RED, GREEN, BLUE], duration=50, loop=0),
            (16, 16),
            [((0, 0), RED), ((15, 15), RED)],
            0,
            id="animated-gif-first-frame",
        ),
        pytest.param(
            lambda: multi_frame("GIF", [GREEN, RED, BLUE], duration=50, loop=0),
            (16, 16),
            [((8, 8), GREEN)],
            0,
            id="animated-gif-first-frame-green",
        ),
        pytest.param(
            lambda: multi_frame("WEBP", [BLUE, RED, GREEN], lossless=True),
            (16, 16),
            [((8, 8), BLUE)],
            0,
            id="animated-webp-first-frame",
        ),
        pytest.param(
            lambda: multi_frame("TIFF", [GREEN, RED, BLUE]),
            (16, 16),
            [((8, 8), GREEN)],
            0,
            id="multi-frame-tiff-first-frame",
        ),
        pytest.param(
            lambda: multi_frame("MPO", [RED, BLUE], quality=95),
            (16, 16),
            [((8, 8), RED)],
            12,
            id="mpo-first-frame",
        ),
        pytest.param(
            _rgba,
            (4, 4),
            [((0, 0), WHITE), ((3, 3), WHITE), ((1, 1), BLUE), ((2, 2), _grey(127))],
            1,
            id="rgba-transparent-becomes-white",
        ),
        pytest.param(_la, (4, 4), [((0, 0), WHITE), ((1, 1), _grey(50))], 0, id="la-transparent-becomes-white"),
        pytest.param(
            lambda: _palette_with_transparency("PNG"),
            (4, 4),
            [((0, 0), WHITE), ((1, 1), RED), ((2, 2), GREEN)],
            0,
            id="p-png-transparent-index-becomes-white",
        ),
        pytest.param(
            lambda: _palette_with_transparency("GIF"),
            (4, 4),
            [((0, 0), WHITE), ((1, 1), RED), ((2, 2), GREEN)],
            0,
            id="p-gif-transparent-index-becomes-white",
        ),
        pytest.param(
            lambda: encode(Image.new("L", (5, 3), 77), "PNG"), (5, 3), [((4, 2), _grey(77))], 0, id="l-greyscale"
        ),
        pytest.param(
            _sixteen_bit_png,
            (4, 1),
            [((0, 0), WHITE), ((1, 0), _grey(128)), ((2, 0), BLACK), ((3, 0), _grey(4))],
            0,
            id="i16-png-scaled-not-clipped",
        ),
        pytest.param(
            _tiff_of([0, 100, 255, 200], np.int32, "I"),
            (4, 1),
            [((0, 0), BLACK), ((1, 0), _grey(100)), ((2, 0), WHITE), ((3, 0), _grey(200))],
            0,
            id="i-tiff-8-bit-range-kept",
        ),
        pytest.param(
            _tiff_of([0, 1000, 65535, 32768], np.int32, "I"),
            (4, 1),
            [((0, 0), BLACK), ((1, 0), _grey(4)), ((2, 0), WHITE), ((3, 0), _grey(128))],
            0,
            id="i-tiff-16-bit-range-scaled",
        ),
        pytest.param(
            _tiff_of([0.0, 0.5, 1.0, 0.25], np.float32, "F"),
            (4, 1),
            [((0, 0), BLACK), ((1, 0), _grey(128)), ((2, 0), WHITE), ((3, 0), _grey(64))],
            0,
            id="f-tiff-stretched-min-to-max",
        ),
        pytest.param(
            _tiff_of([-10.0, 0.0, 10.0, 5.0], np.float32, "F"),
            (4, 1),
            [((0, 0), BLACK), ((1, 0), _grey(128)), ((2, 0), WHITE), ((3, 0), _grey(191))],
            0,
            id="f-tiff-negative-values",
        ),
        pytest.param(_cmyk_jpeg, (16, 16), [((8, 8), RED)], 12, id="cmyk-jpeg"),
        pytest.param(
            lambda: encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "TIFF"),
            (4, 4),
            [((2, 2), RED)],
            0,
            id="cmyk-tiff",
        ),
        pytest.param(lambda: _one_bit("PNG"), (8, 8), [((0, 0), BLACK), ((1, 1), WHITE)], 0, id="1-bit-png"),
        pytest.param(lambda: _one_bit("BMP"), (8, 8), [((0, 0), BLACK), ((1, 1), WHITE)], 0, id="1-bit-bmp"),
        pytest.param(lambda: _one_bit("TIFF"), (8, 8), [((0, 0), BLACK), ((1, 1), WHITE)], 0, id="1-bit-tiff"),
        pytest.param(lambda: _one_bit("GIF"), (8, 8), [((0, 0), BLACK), ((1, 1), WHITE)], 0, id="1-bit-gif"),
        pytest.param(
            lambda: encode(Image.new("RGB", (1, 1), (9, 200, 9)), "PNG"),
            (1, 1),
            [((0, 0), (9, 200, 9))],
            0,
            id="1x1-png",
        ),
        pytest.param(
            lambda: encode(Image.new("RGB", (1, 1), (9, 200, 9)), "JPEG", quality=95),
            (1, 1),
            [((0, 0), (9, 200, 9))],
            8,
            id="1x1-jpeg",
        ),
        pytest.param(lambda: encode(halves((2, 3)), "PNG"), (2, 3), [((0, 2), RED), ((1, 0), BLUE)], 0, id="2x3-png"),
        pytest.param(lambda: encode(halves((2, 3)), "BMP"), (2, 3), [((0, 0), RED), ((1, 2), BLUE)], 0, id="2x3-bmp"),
    ],
)
def test_accepted_input_becomes_rgb_with_the_right_pixels(
    make: Callable[[], bytes], size: tuple[int, int], checks: list[PixelCheck], tolerance: int
) -> None:
    image = load_image(make(), DEFAULT)

    assert image.mode == "RGB"
    assert image.size == size
    assert_pixels(image, checks, tolerance)


@pytest.mark.parametrize(
    ("fmt", "orientation", "size", "red_at"),
    [
        pytest.param("JPEG", 1, (40, 20), (2, 2), id="jpeg-orientation-1-unchanged"),
        pytest.param("JPEG", 3, (40, 20), (37, 17), id="jpeg-orientation-3-rotated-180"),
        pytest.param("JPEG", 6, (20, 40), (17, 2), id="jpeg-orientation-6-rotated-90-cw"),
        pytest.param("JPEG", 8, (20, 40), (2, 37), id="jpeg-orientation-8-rotated-90-ccw"),
        pytest.param("PNG", 6, (20, 40), (17, 2), id="png-orientation-6-rotated-90-cw"),
    ],
)
def test_exif_orientation_is_applied(
    fmt: str, orientation: int, size: tuple[int, int], red_at: tuple[int, int]
) -> None:
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 10, 5))  # the stored top-left corner is red
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, fmt, exif=exif.tobytes(), quality=95)

    image = load_image(data, DEFAULT)

    assert image.mode == "RGB"
    assert image.size == size
    assert_colour(image.getpixel(red_at), RED, 12)
    width, height = size
    corners = [(1, 1), (width - 2, 1), (1, height - 2), (width - 2, height - 2)]
    for corner in corners:
        if abs(corner[0] - red_at[0]) > 4 or abs(corner[1] - red_at[1]) > 4:
            assert_colour(image.getpixel(corner), BLUE, 12)


@pytest.mark.parametrize(
    ("fmt", "size"),
    [
        pytest.param("PNG", (5000, 2), id="png-5000x2"),
        pytest.param("PNG", (2, 5000), id="png-2x5000"),
        pytest.param("JPEG", (5000, 2), id="jpeg-5000x2"),
        pytest.param("JPEG", (2, 5000), id="jpeg-2x5000"),
        pytest.param("PNG", (60000, 1), id="png-60000x1"),
        pytest.param("PNG", (1024, 39062), id="png-1024x39062"),
    ],
)
def test_extremely_elongated_image_keeps_only_the_centre_the_encoder_reads(fmt: str, size: tuple[int, int]) -> None:
    data = encode(Image.new("RGB", size, (0, 128, 0)), fmt, quality=95)

    image = load_image(data, DEFAULT)

    # Nothing is scaled up to make the short side larger, and the rest of the strip is not kept.
    short = min(size)
    assert image.mode == "RGB"
    assert sorted(image.size) == [short, int(MAX_ASPECT_RATIO * short)]
    assert_colour(image.getpixel((image.width - 1, image.height - 1)), (0, 128, 0), 4)
    assert crop_extreme_aspect(image) is image


@pytest.mark.parametrize(
    ("fmt", "size", "expected"),
    [
        pytest.param("PNG", (1200, 600), (512, 256), id="png-wide"),
        pytest.param("PNG", (600, 1800), (256, 768), id="png-tall"),
        pytest.param("JPEG", (1200, 600), (512, 256), id="jpeg-wide"),
        pytest.param("JPEG", (2400, 1200), (512, 256), id="jpeg-wide-draft-decoded"),
        pytest.param("JPEG", (600, 1800), (256, 768), id="jpeg-tall"),
        pytest.param("WEBP", (1000, 1000), (256, 256), id="webp-square"),
        pytest.param("PNG", (1000, 300), (853, 256), id="png-rounded"),
        pytest.param("PNG", (256, 300), (256, 300), id="png-short-side-at-limit-unchanged"),
        pytest.param("PNG", (300, 200), (300, 200), id="png-smaller-than-limit-unchanged"),
    ],
)
def test_large_image_is_scaled_so_short_side_is_max_side_kept(
    fmt: str, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    data = encode(halves(size), fmt, quality=95)

    image = load_image(data, SMALL_KEPT)

    assert image.mode == "RGB"
    assert image.size == expected
    width, height = expected
    assert_colour(image.getpixel((width // 8, height // 2)), RED, 12)
    assert_colour(image.getpixel((width - 1 - width // 8, height // 2)), BLUE, 12)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        pytest.param((1200, 600), (512, 256), id="mpo-1200x600"),
        pytest.param((2400, 1200), (512, 256), id="mpo-2400x1200-draft-decoded"),
    ],
)
def test_large_mpo_is_scaled_and_keeps_its_first_picture(size: tuple[int, int], expected: tuple[int, int]) -> None:
    second = Image.new("RGB", size, GREEN)
    data = encode(halves(size), "MPO", save_all=True, append_images=[second], quality=90)
    with Image.open(io.BytesIO(data)) as opened:
        assert (opened.format, getattr(opened, "n_frames", 1)) == ("MPO", 2)

    image = load_image(data, SMALL_KEPT)

    assert image.mode == "RGB"
    assert image.size == expected
    width, height = expected
    assert_colour(image.getpixel((width // 8, height // 2)), RED, 12)
    assert_colour(image.getpixel((width - 1 - width // 8, height // 2)), BLUE, 12)


@pytest.mark.parametrize("path", PHOTOS, ids=[path.stem for path in PHOTOS])
def test_project_photos_load_as_rgb(path: Path) -> None:
    with Image.open(path) as original:
        width, height = ImageOps.exif_transpose(original).size

    image = load_image(path.read_bytes(), DEFAULT)

    assert image.mode == "RGB"
    assert min(width, height) <= DEFAULT.max_side_kept  # these photos are small: kept at their size
    assert image.size == (width, height)
    assert np.asarray(image).std() > 10  # a real photo, not a blank


def test_there_are_project_photos() -> None:
    assert len(PHOTOS) >= 5


# --- refused inputs ------------------------------------------------------------------------------


SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100">'
    b'<rect width="100" height="100" fill="red"/></svg>\n'
)
PDF = (
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
    b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
)
SAMPLE = Image.new("RGB", (64, 48), (200, 30, 40))


@pytest.mark.parametrize(
    ("make", "settings", "message"),
    [
        pytest.param(lambda: b"", DEFAULT, r"^The file is empty\.$", id="empty"),
        pytest.param(
            lambda: np.random.default_rng(0).bytes(2000),
            ImageSettings(max_bytes=1000),
            r"^The file is 2,000 bytes; the limit is 1,000 bytes\.$",
            id="over-max-bytes",
        ),
        pytest.param(
            lambda: encode(noise_rgb(64), "PNG"),
            ImageSettings(max_bytes=1000),
            r"^The file is [\d,]+ bytes; the limit is 1,000 bytes\.$",
            id="valid-png-over-max-bytes",
        ),
        pytest.param(
            lambda: b"\0" * (3 * 1024 * 1024),
            ImageSettings(max_bytes=2 * 1024 * 1024),
            r"^The file is 3\.0 MiB; the limit is 2\.0 MiB\.$",
            id="over-max-bytes-in-megabytes",
        ),
        pytest.param(lambda: b"Hello, this is just some text.\n" * 10, DEFAULT, NOT_READABLE, id="plain-text"),
        pytest.param(lambda: PDF, DEFAULT, NOT_READABLE, id="pdf"),
        pytest.param(lambda: SVG, DEFAULT, NOT_READABLE, id="svg"),
        pytest.param(lambda: np.random.default_rng(1234).bytes(4096), DEFAULT, NOT_READABLE, id="random-bytes"),
        pytest.param(lambda: b"\xff\xd8", DEFAULT, NOT_READABLE, id="jpeg-soi-only"),
        pytest.param(lambda: encode(SAMPLE, "EPS"), DEFAULT, NOT_READABLE, id="eps"),
        pytest.param(lambda: encode(SAMPLE, "ICO"), DEFAULT, NOT_READABLE, id="ico"),
        pytest.param(lambda: encode(SAMPLE, "PPM"), DEFAULT, NOT_READABLE, id="ppm"),
        pytest.param(lambda: encode(SAMPLE, "TGA"), DEFAULT, NOT_READABLE, id="tga"),
        pytest.param(lambda: encode(SAMPLE, "PCX"), DEFAULT, NOT_READABLE, id="pcx"),
        pytest.param(lambda: encode(SAMPLE, "QOI"), DEFAULT, NOT_READABLE, id="qoi"),
        pytest.param(lambda: encode(SAMPLE, "SGI"), DEFAULT, NOT_READABLE, id="sgi"),
        pytest.param(lambda: encode(SAMPLE, "PDF"), DEFAULT, NOT_READABLE, id="pdf-written-by-pillow"),
        pytest.param(lambda: png_header_only(0, 5), DEFAULT, NOT_READABLE, id="png-zero-width"),
        pytest.param(
            lambda: first_half(encode(noise_rgb(64), "JPEG", quality=95)), DEFAULT, DAMAGED, id="truncated-jpeg"
        ),
        pytest.param(lambda: first_half(encode(noise_rgb(64), "PNG")), DEFAULT, DAMAGED, id="truncated-png"),
        pytest.param(lambda: first_half(encode(noise_rgb(64), "GIF")), DEFAULT, DAMAGED, id="truncated-gif"),
        pytest.param(lambda: corrupt_idat(encode(noise_rgb(64), "PNG")), DEFAULT, DAMAGED, id="corrupt-png-idat"),
        pytest.param(lambda: png_header_only(1, 1), DEFAULT, DAMAGED, id="png-without-pixel-data"),
        pytest.param(tiff_with_rational_strip_offsets, DEFAULT, DAMAGED, id="tiff-strip-offsets-a-fraction"),
        pytest.param(
            lambda: png_header_only(20_000, 20_000),
            DEFAULT,
            r"^Images may have at most 40 million pixels; this one has far more than that\.$",
            id="bomb-header-20000x20000",
        ),
        pytest.param(
            lambda: png_header_only(8000, 8000),
            DEFAULT,
            r"^Images may have at most 40 million pixels; this one has 8000×8000 pixels\.$",
            id="bomb-header-8000x8000",
        ),
        pytest.param(
            lambda: png_header_only(200, 200),
            ImageSettings(max_pixels=10_000),
            r"^Images may have at most 0\.01 million pixels; this one has 200×200 pixels\.$",
            id="header-200x200-over-small-cap",
        ),
        pytest.param(
            lambda: encode(Image.new("RGB", (200, 200), RED), "PNG"),
            ImageSettings(max_pixels=10_000),
            r"^Images may have at most 0\.01 million pixels; this one has 200×200 pixels\.$",
            id="real-200x200-over-small-cap",
        ),
        pytest.param(
            lambda: encode(Image.new("RGB", (200, 200), RED), "JPEG"),
            ImageSettings(max_pixels=10_000),
            r"^Images may have at most 0\.01 million pixels; this one has 200×200 pixels\.$",
            id="real-200x200-jpeg-over-small-cap",
        ),
    ],
)
def test_refused_input_has_its_message(make: Callable[[], bytes], settings: ImageSettings, message: str) -> None:
    data = make()

    with pytest.raises(BadImage, match=message):
        load_image(data, settings)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"])
def test_every_accepted_format_passes_the_signature_check(fmt: str) -> None:
    check_signature(encode(SAMPLE, fmt), DEFAULT)


@pytest.mark.parametrize(
    "data",
    [
        b"Hello, this is just some text.\n",
        PDF,
        SVG,
        b"\0\0\0\x18ftypheic\0\0\0\0mif1heic",  # an iPhone's HEIC photo begins so
        encode(SAMPLE, "ICO"),
        encode(SAMPLE, "PPM"),
        encode(SAMPLE, "QOI"),
        np.random.default_rng(1234).bytes(4096),
    ],
    ids=["text", "pdf", "svg", "heic", "ico", "ppm", "qoi", "random"],
)
def test_files_plainly_not_images_are_refused_by_their_signature(data: bytes) -> None:
    with pytest.raises(BadImage, match=NOT_READABLE):
        check_signature(data, DEFAULT)


def test_the_signature_check_reads_no_header() -> None:
    """A JPEG start with megabytes of fill after it: Pillow reads such headers a byte at a time, so
    this check must not (and the request counts as work once past it)."""
    data = b"\xff\xd8" + b"\xff" * (4 * 2**20)
    started = time.perf_counter()
    check_signature(data, DEFAULT)
    assert time.perf_counter() - started < 0.05
    with pytest.raises(BadImage, match=r"^The file is empty\.$"):
        check_signature(b"", DEFAULT)


def test_decompression_bomb_small_on_disk_is_refused_before_decoding() -> None:
    # A real, fully valid 1-bit PNG: 8000 by 6000 = 48 million pixels, a few kilobytes on disk.
    data = encode(Image.new("1", (8000, 6000), 0), "PNG")
    assert len(data) < 50_000

    with pytest.raises(BadImage, match=r"^Images may have at most 40 million pixels; this one has 8000×6000 pixels"):
        load_image(data, DEFAULT)


def test_exactly_max_pixels_is_accepted() -> None:
    data = encode(Image.new("RGB", (100, 100), GREEN), "PNG")

    image = load_image(data, ImageSettings(max_pixels=10_000))

    assert image.size == (100, 100)
    assert image.getpixel((50, 50)) == GREEN


def test_exactly_max_bytes_is_accepted() -> None:
    data = encode(Image.new("RGB", (8, 8), GREEN), "PNG")

    image = load_image(data, ImageSettings(max_bytes=len(data)))

    assert image.getpixel((0, 0)) == GREEN
    with pytest.raises(BadImage, match=r"the limit is"):
        load_image(data, ImageSettings(max_bytes=len(data) - 1))


# --- crop_extreme_aspect -------------------------------------------------------------------------


def unique_columns(width: int, height: int) -> Image.Image:
    """Every column (or row, when tall) gets its own colour, so the crop's position can be read off."""
    index = np.arange(max(width, height))
    colours = np.stack([index % 256, index // 256, np.full_like(index, 7)], axis=-1).astype(np.uint8)
    if width >= height:
        pixels = np.broadcast_to(colours[None, :, :], (height, width, 3))
    else:
        pixels = np.broadcast_to(colours[:, None, :], (height, width, 3))
    return Image.fromarray(np.ascontiguousarray(pixels))


@pytest.mark.parametrize(
    ("size", "expected", "first_kept"),
    [
        pytest.param((1000, 10), (20, 10), 490, id="1000x10-wide"),
        pytest.param((10, 1000), (10, 20), 490, id="10x1000-tall"),
        pytest.param((1001, 10), (20, 10), 490, id="1001x10-odd-width"),
        pytest.param((1000, 1), (2, 1), 499, id="1000x1-single-row"),
        pytest.param((1, 1000), (1, 2), 499, id="1x1000-single-column"),
        pytest.param((5000, 2), (4, 2), 2498, id="5000x2"),
    ],
)
def test_crop_extreme_aspect_keeps_the_centre(
    size: tuple[int, int], expected: tuple[int, int], first_kept: int
) -> None:
    image = unique_columns(*size)

    cropped = crop_extreme_aspect(image)

    assert cropped.size == expected
    assert max(expected) == MAX_ASPECT_RATIO * min(expected)
    wide = size[0] >= size[1]
    long_side = max(size)
    for kept in range(max(expected)):
        xy = (kept, 0) if wide else (0, kept)
        source = (first_kept + kept, 0) if wide else (0, first_kept + kept)
        assert cropped.getpixel(xy) == image.getpixel(source)
    # The centre of the original is inside the crop, near the crop's own centre.
    centre = long_side // 2
    assert first_kept <= centre < first_kept + max(expected)
    assert abs((first_kept + max(expected) / 2) - long_side / 2) <= 1


@pytest.mark.parametrize(
    "size",
    [
        pytest.param((300, 200), id="300x200"),
        pytest.param((200, 300), id="200x300"),
        pytest.param((400, 200), id="400x200-ratio-exactly-2"),
        pytest.param((200, 400), id="200x400-ratio-exactly-2"),
        pytest.param((1, 1), id="1x1"),
        pytest.param((2, 1), id="2x1"),
    ],
)
def test_crop_extreme_aspect_returns_moderate_images_unchanged(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, RED)

    assert crop_extreme_aspect(image) is image


def test_crop_extreme_aspect_honours_a_custom_ratio() -> None:
    image = unique_columns(1000, 10)

    cropped = crop_extreme_aspect(image, max_ratio=3.0)

    assert cropped.size == (30, 10)
    assert cropped.getpixel((0, 0)) == image.getpixel((485, 0))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_float_image_scales_by_its_finite_values(bad: float) -> None:
    values = np.array([[0.0, bad, 1.0, 0.5]], dtype=np.float32)
    data = encode(Image.fromarray(values, mode="F"), "TIFF")
    image = load_image(data, DEFAULT)
    row = [image.getpixel((x, 0))[0] for x in range(4)]
    assert (row[0], row[2], row[3]) == (0, 255, 128)


@pytest.mark.parametrize(
    ("pixels", "fmt"),
    [
        ((np.arange(2000 * 2000) % 65536).astype(np.uint16).reshape(2000, 2000), "PNG"),
        (np.linspace(-5, 5, 2000 * 2000, dtype=np.float32).reshape(2000, 2000), "TIFF"),
    ],
    ids=["16-bit", "float"],
)
def test_deep_images_are_scaled_to_eight_bits_without_large_copies(pixels: np.ndarray, fmt: str) -> None:
    """Four images of up to 40 megapixels per request, several requests at once: each byte per pixel
    counts. (Arrays in float64, one per step, took 25 to 33 bytes per pixel.)"""
    data = encode(Image.fromarray(pixels), fmt)
    tracemalloc.start()
    try:
        image = load_image(data, DEFAULT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 12 * pixels.size
    assert image.mode == "RGB" and image.getextrema()[0][1] >= 250


def test_a_panorama_is_stored_within_jpegs_limits() -> None:
    """JPEG stops at 65,535 pixels a side; a long panorama is scaled down whole, not refused."""
    stored = Image.open(io.BytesIO(encode_for_storage(Image.new("RGB", (66_000, 40), RED))))
    assert stored.format == "JPEG" and stored.size == (STORED_LONG_SIDE, 2)


def test_malformed_exif_is_ignored_not_refused() -> None:
    data = encode(halves(), "PNG", exif=b"garbage!!")  # an eXIf chunk that is not TIFF data
    with pytest.raises(SyntaxError):
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    image = load_image(data, DEFAULT)
    assert image.size == (32, 16)
    assert image.getpixel((0, 0)) == RED


def test_at_most_four_images_decode_at_once_across_the_process(monkeypatch) -> None:
    """Each decode may briefly take ~12 bytes per pixel; requests, imports and uploads arrive together."""
    running, most = 0, 0
    lock = threading.Lock()
    upright = core.images._upright

    def slow_upright(image: Image.Image) -> Image.Image:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return upright(image)

    monkeypatch.setattr(core.images, "_upright", slow_upright)
    data = encode(halves(), "PNG")
    with ThreadPoolExecutor(max_workers=10) as pool:
        images = list(pool.map(lambda _: load_image(data, DEFAULT), range(10)))
    assert most == 4 and all(image.size == (32, 16) for image in images)
