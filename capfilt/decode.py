"""Turn a sample's image bytes into the RGB picture a viewer would show, or say why not.

Web data holds every kind of image: EXIF-rotated phone photos, transparent logos, palette GIFs, 16-bit PNGs,
CMYK JPEGs, and the occasional decompression bomb. The models need plain RGB, and a bomb must be refused from
its header before Pillow allocates its pixels.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from capfilt.errors import DecodeError

__all__ = ["DEFAULT_MAX_PIXELS", "DecodeError", "decode_image", "sniff_image_ext"]

# 8192 x 8192: far above what captioning needs, and a bound on the ~200 MB one decoded RGB image may take.
DEFAULT_MAX_PIXELS = 8192 * 8192

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` to an RGB image as a viewer shows it, or raise `DecodeError`.

    EXIF orientation is applied, transparency is composited on white, and an animation gives its first frame.
    An image whose header declares more than `max_pixels` pixels is refused before it is decoded (Pillow's
    own bomb limit, twice `Image.MAX_IMAGE_PIXELS`, also ends as `image_too_large`).
    """
    if not data:
        raise DecodeError("empty_image", "the image has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise DecodeError("image_too_large", str(error)) from None
    except Exception as error:  # noqa: BLE001  # Pillow raises many types for bad data; all mean the same
        raise DecodeError("undecodable_image", _describe(error)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError("image_too_large", f"{width}x{height} pixels, more than the limit of {max_pixels}")
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image)
    except Exception as error:  # noqa: BLE001
        raise DecodeError("undecodable_image", _describe(error)) from None


def sniff_image_ext(data: bytes) -> str | None:
    """The usual file extension of an encoded image, from its magic bytes (None when not recognised)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    has_transparency = "transparency" in image.info
    if image.mode == "RGB" and not has_transparency:
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("L") clips 16-bit values at 255 (a white picture); scale the full range instead.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if image.mode in _ALPHA_MODES or (has_transparency and image.mode in ("P", "L", "RGB")):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _describe(error: Exception) -> str:
    """The error in words, without object addresses, so that reruns write the same rejects file."""
    return f"{type(error).__name__}: {_ADDRESS.sub('', str(error))}"


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
