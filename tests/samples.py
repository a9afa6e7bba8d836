"""Image files of every kind a bucket holds: good ones in many formats and modes, and bad ones."""

from __future__ import annotations

import io
import zlib
import struct

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo(seed: int, size=(96, 72)) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2] = (90, 140, 210)
    return Image.fromarray(arr)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(width: int = 10_000, height: int = 9_000) -> bytes:
    """A valid PNG header declaring width*height pixels (> Pillow's 89,478,485 limit), a few KB on disk."""
    raw = zlib.compress(b"\x00" * (1 + (width + 7) // 8) * 64)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def large_png(width: int, height: int, bit_depth: int = 16, colour: bool = False) -> bytes:
    """A complete, valid PNG of width x height pixels (greyscale or RGB, 8 or 16 bits) that compresses to a few
    hundred KB: every row is the same dark-to-bright gradient (rows after the first use PNG's "up" filter, all
    zeros). Written row by row, never held decoded."""
    channels, step = (3 if colour else 1), bit_depth // 8
    top = (1 << bit_depth) - 1
    values = np.linspace(0, top, width).astype(">u2" if step == 2 else "u1")
    first = b"\x00" + np.repeat(values, channels).tobytes()
    same = b"\x02" + bytes(len(first) - 1)
    packer = zlib.compressobj(9)
    body = packer.compress(first) + b"".join(packer.compress(same) for _ in range(height - 1)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 2 if colour else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def good_files(seed: int = 0) -> dict[str, bytes]:
    """Name -> bytes of images Pillow decodes, in many formats and modes."""
    base = _photo(seed)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    exif_img = _photo(seed + 1, size=(120, 60))
    exif = exif_img.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    sixteen = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))
    return {
        "rgb.jpg": _save(base, "JPEG", quality=90),
        "rgba.png": _save(rgba, "PNG"),
        "grey.jpg": _save(base.convert("L"), "JPEG"),
        "cmyk.jpg": _save(base.convert("CMYK"), "JPEG"),
        "exif_rotated.jpg": _save(exif_img, "JPEG", exif=exif),
        "sixteen_bit.png": _save(sixteen, "PNG"),
        "photo.webp": _save(base, "WEBP"),
        "anim.gif": _save(base.convert("P"), "GIF"),
        "scan.tiff": _save(base, "TIFF"),
        "palette_alpha.png": _save(rgba.convert("P"), "PNG"),
    }


def bad_files(seed: int = 0) -> dict[str, tuple[bytes, str]]:
    """Name -> (bytes, expected error kind)."""
    jpeg = _save(_photo(seed), "JPEG", quality=90)
    return {
        "zero.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "not_image.jpg": (b"<html>this is not a picture</html>" * 10, "not_an_image"),
        "bomb.png": (bomb_png(), "too_many_pixels"),
    }


def cut_jpeg(n_bytes: int = 500, seed: int = 0) -> bytes:
    """A JPEG cut inside its header tables (Pillow fails while opening, not while decoding)."""
    return _save(_photo(seed), "JPEG", quality=90)[:n_bytes]
