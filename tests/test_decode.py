"""decode_image turns every kind of web image into the RGB picture a viewer shows, or rejects it with a reason."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from capfilt.decode import DecodeError, decode_image, sniff_image_ext
from tests.datasets import encode_image, make_image

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, to declare any size and bit depth (Pillow cannot save 16-bit RGB)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def close(actual: object, expected: tuple[int, ...], tolerance: int = 6) -> bool:
    """Whether a pixel matches `expected` within JPEG's rounding."""
    assert isinstance(actual, tuple) and len(actual) == len(expected), actual
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


def test_plain_jpeg_is_returned_as_rgb_of_the_same_size() -> None:
    image = decode_image(encode_image(make_image(32, 24, RED)))
    assert image.mode == "RGB" and image.size == (32, 24)
    assert close(image.getpixel((5, 5)), RED)


def test_exif_rotated_jpeg_comes_out_upright() -> None:
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view", as phones write it
    image = decode_image(encode_image(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (20, 40)
    assert close(image.getpixel((10, 5)), RED) and close(image.getpixel((10, 35)), BLUE)


def test_16_bit_grayscale_png_keeps_its_brightness() -> None:
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    image = decode_image(encode_image(Image.fromarray(values), "PNG"))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_16_bit_rgb_png_keeps_its_colours() -> None:
    row = b"\x00" + struct.pack(">HHH", 65535, 32896, 0) * 2
    image = decode_image(png(2, 1, 16, 2, row))
    assert close(image.getpixel((0, 0)), (255, 128, 0), tolerance=1)


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk = encode_image(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    image = decode_image(cmyk)
    assert image.mode == "RGB" and close(image.getpixel((8, 8)), RED)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    image = decode_image(encode_image(rgba, "PNG"))
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 0)) == RED
    assert close(image.getpixel((2, 0)), (127, 127, 127), tolerance=1)


def test_grayscale_with_alpha_is_composited_on_white() -> None:
    image = decode_image(encode_image(Image.new("LA", (4, 4), (0, 0)), "PNG"))
    assert image.getpixel((1, 1)) == WHITE


def test_palette_gif_with_transparent_index_is_white_there() -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((3, 3), 1)
    image = decode_image(encode_image(palette, "GIF", transparency=0))
    assert image.getpixel((0, 0)) == WHITE and image.getpixel((3, 3)) == RED


def test_palette_png_without_transparency_keeps_its_colours() -> None:
    image = decode_image(encode_image(make_image(8, 8, BLUE).convert("P"), "PNG"))
    assert image.mode == "RGB" and image.getpixel((2, 2)) == BLUE


def test_grayscale_jpeg_becomes_rgb() -> None:
    image = decode_image(encode_image(Image.new("L", (8, 8), 100), "JPEG"))
    assert image.mode == "RGB" and close(image.getpixel((4, 4)), (100, 100, 100), tolerance=2)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_its_first_frame(fmt: str) -> None:
    frames = [make_image(16, 16, RED), make_image(16, 16, BLUE)]
    data = encode_image(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    image = decode_image(data)
    assert image.mode == "RGB" and close(image.getpixel((8, 8)), RED, tolerance=12)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "TIFF"])
def test_other_formats_decode(fmt: str) -> None:
    image = decode_image(encode_image(make_image(10, 6, BLUE), fmt))
    assert image.mode == "RGB" and image.size == (10, 6) and close(image.getpixel((3, 3)), BLUE)


def test_empty_bytes_are_an_empty_image() -> None:
    with pytest.raises(DecodeError) as error:
        decode_image(b"")
    assert error.value.reason == "empty_image"


@pytest.mark.parametrize(
    "data",
    [b"<html>404 Not Found</html>", encode_image(make_image(64, 64))[:300]],
    ids=["html-error-page", "truncated-jpeg"],
)
def test_broken_bytes_are_undecodable(data: bytes) -> None:
    with pytest.raises(DecodeError) as error:
        decode_image(data)
    assert error.value.reason == "undecodable_image" and error.value.detail


@pytest.mark.parametrize("side", [60000, 9000], ids=["beyond-pillow-limit", "beyond-capfilt-limit"])
def test_decompression_bomb_is_refused_from_its_header(side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    bomb = png(side, side, 8, 2, b"\x00" + b"\x00" * 3 * side)  # declares side x side, holds one row
    assert len(bomb) < 1000
    started = time.perf_counter()
    with pytest.raises(DecodeError) as error:
        decode_image(bomb)
    assert error.value.reason == "image_too_large"
    assert time.perf_counter() - started < 0.5


def test_max_pixels_is_configurable() -> None:
    data = encode_image(make_image(100, 100))
    with pytest.raises(DecodeError) as error:
        decode_image(data, max_pixels=5000)
    assert error.value.reason == "image_too_large" and "100x100" in error.value.detail
    assert decode_image(data, max_pixels=10000).size == (100, 100)


@pytest.mark.parametrize(
    "fmt, ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tiff")]
)
def test_sniff_image_ext_names_the_encoding(fmt: str, ext: str) -> None:
    assert sniff_image_ext(encode_image(make_image(4, 4), fmt)) == ext


def test_sniff_image_ext_of_other_bytes_is_none() -> None:
    assert sniff_image_ext(b"hello") is None
