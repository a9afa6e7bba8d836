"""Decode untrusted image bytes into RGB, or a per-item error of a CONVENTIONS kind.

Kinds: ``empty``, ``truncated``, ``not_an_image``, ``too_many_pixels``, ``unreadable`` (and ``model``, used by
model stages). Any format Pillow decodes is accepted; every mode is converted to RGB (16-bit scaled, alpha
dropped, CMYK converted) after applying EXIF orientation. The pixel limit is checked from the header, before
any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

ERROR_KINDS = ("empty", "truncated", "not_an_image", "too_many_pixels", "unreadable", "model")


class ImageError(ValueError):
    """A per-item failure: ``kind`` is one of :data:`ERROR_KINDS`."""

    def __init__(self, kind: str, detail: str):
        assert kind in ERROR_KINDS, kind
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    @property
    def row_error(self) -> str:
        """The ``error`` column value: ``"<kind>: <detail>"``."""
        return f"{self.kind}: {self.detail}"


def error_kind(error: str | None) -> str | None:
    """The kind part of an ``error`` column value."""
    return error.split(":", 1)[0] if error else None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB image with EXIF orientation applied, or :class:`ImageError`."""
    if not data:
        raise ImageError("empty", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_many_pixels", str(exc).split(".")[0]) from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", f"{len(data)} bytes Pillow cannot identify") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a per-item error
        raise _classify(exc) from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"{width}x{height} = {width * height} pixels > {max_pixels}")
    if width <= 0 or height <= 0:
        raise ImageError("unreadable", f"size {width}x{height}")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Exception as exc:  # noqa: BLE001
        raise _classify(exc) from None


_TRUNCATION_TEXTS = ("truncated", "premature end", "broken data stream", "unexpected end", "not enough data")


def _classify(exc: Exception) -> ImageError:
    """A parser exception as ``truncated`` (the data stops early) or ``unreadable``."""
    text = f"{type(exc).__name__}: {exc}"
    if any(t in text.lower() for t in _TRUNCATION_TEXTS):
        return ImageError("truncated", text)
    return ImageError("unreadable", text)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic), then crop the centre square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
