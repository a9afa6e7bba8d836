"""Decode untrusted image bytes into RGB, or a per-item error of a documented kind (docs/conventions.md › Errors).

Kinds: ``empty``, ``truncated``, ``not_an_image``, ``too_many_pixels``, ``unreadable`` (and ``model``, used by
model stages). Any format Pillow decodes is accepted; every mode is converted to RGB (16-bit scaled, alpha
dropped, CMYK converted) after applying EXIF orientation. The pixel limit is checked from the header, before
any pixel is decoded.

Memory: beyond the decoded image itself, a large image is converted a band of rows at a time (16-bit data never
becomes a full-size float array, an RGB image is not copied), and with ``reduce_to`` it is shrunk while decoding
(JPEG's DCT scaling, then an integer box reduction per band), so the result is small too.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

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


_GREY_WIDE = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_GREY = ("1", "L", "LA", "La", *_GREY_WIDE)
_BAND_PIXELS = 1 << 20  # large images are converted (and reduced) a band of about this many pixels at a time
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def _grey_top(img: Image.Image) -> float:
    """The value shown as white: 65535 for 16-bit modes (and 32-bit ones holding values over 255), else 255."""
    if img.mode.startswith("I;16"):
        return 65535.0
    high = img.getextrema()[1]
    return 65535.0 if high is not None and high > 255 else 255.0


def _to_8bit(band: Image.Image, top: float) -> Image.Image:
    """A band in any mode -> ``L`` (grey modes; wide ones scaled by ``top``) or ``RGB`` (alpha dropped, palettes
    and CMYK converted)."""
    if band.mode in _GREY_WIDE:
        arr = np.asarray(band, dtype=np.float32)
        arr *= np.float32(255.0 / top)
        return Image.fromarray(np.clip(arr, 0, 255, out=arr).astype(np.uint8), mode="L")
    if band.mode in _GREY:
        return band.convert("L")
    if band.mode == "P" and "transparency" in band.info:
        band = band.convert("RGBA")
    return band.convert("RGB")


def _to_rgb(img: Image.Image, factor: int = 1) -> Image.Image:
    """RGB, shrunk by the integer ``factor`` (box average, as ``Image.reduce``), built band by band.

    A large image never gets a full-size converted copy (nor a float64 one): each band of rows is converted to
    8 bits and reduced on its own, so the memory beyond the decoded image is one band plus the (reduced) result.
    Bands are a multiple of ``factor`` rows, so the result equals reducing the whole converted image."""
    width, height = img.size
    if factor <= 1 and img.mode == "RGB":
        return img  # already what is wanted: no copy
    if factor <= 1 and width * height <= _BAND_PIXELS:
        return _to_8bit(img, _grey_top(img) if img.mode in _GREY_WIDE else 255.0).convert("RGB")
    top = _grey_top(img) if img.mode in _GREY_WIDE else 255.0
    out = Image.new("L" if img.mode in _GREY else "RGB", (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, _BAND_PIXELS // (width * factor))
    for y in range(0, height, rows):
        band = _to_8bit(img.crop((0, y, width, min(height, y + rows))), top)
        out.paste(band.reduce(factor) if factor > 1 else band, (0, y // factor))
    return out if out.mode == "RGB" else out.convert("RGB")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, reduce_to: int | None = None) -> Image.Image:
    """Bytes -> RGB image with EXIF orientation applied, or :class:`ImageError`.

    ``reduce_to``: decode at a smaller scale where the format allows (JPEG's DCT scaling) and shrink by an
    integer factor (box average) while converting, keeping the longest side at least ``reduce_to``: for
    callers that resize to a bound anyway, so a large image never has a full-size RGB copy."""
    return decode_image_sized(data, max_pixels, reduce_to)[0]


def decode_image_sized(data: bytes, max_pixels: int = MAX_PIXELS,
                       reduce_to: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image` and the image's size as stored (before any reduction or orientation)."""
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
        longest = max(width, height)
        if reduce_to and longest > reduce_to and img.format == "JPEG":
            # the DCT scale draft picks keeps both sides >= the asked size, so the longest stays >= reduce_to
            img.draft(None, (-(-width * reduce_to // longest), -(-height * reduce_to // longest)))
        img.load()
        orientation = img.getexif().get(0x0112, 1)
        factor = max(img.size) // reduce_to if reduce_to else 1
        out = _to_rgb(img, max(1, factor))
        del img
        method = _ORIENTATION.get(orientation)
        return (out.transpose(method) if method is not None else out), (width, height)
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
