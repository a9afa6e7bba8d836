"""Decoding untrusted bytes: every Pillow format/mode to RGB, every bad file to an error kind."""

from __future__ import annotations

import pytest

from georeasoner.core.images import MAX_PIXELS, ImageError, decode_image, error_kind, resize_center_crop
from samples import bad_files, good_files


@pytest.mark.parametrize("name", sorted(good_files()))
def test_good_files_decode_to_rgb(name):
    img = decode_image(good_files()[name])
    assert img.mode == "RGB" and img.size[0] > 0
    assert resize_center_crop(img, 32).size == (32, 32)


def test_exif_orientation_is_applied():
    img = decode_image(good_files()["exif_rotated.jpg"])
    assert img.size == (60, 120)  # stored 120x60, displayed rotated


def test_sixteen_bit_is_scaled_not_clipped():
    img = decode_image(good_files()["sixteen_bit.png"])
    lo, hi = img.convert("L").getextrema()
    assert lo < 10 and hi > 245


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_files_raise_their_kind(name):
    data, kind = bad_files()[name]
    with pytest.raises(ImageError) as info:
        decode_image(data)
    assert info.value.kind == kind
    assert error_kind(info.value.row_error) == kind and ": " in info.value.row_error


def test_pixel_limit_is_pillows_default():
    assert MAX_PIXELS == 89_478_485


@pytest.mark.parametrize("n_bytes", [300, 500, 700, 2000])
def test_jpegs_cut_anywhere_are_truncated(n_bytes):
    from samples import cut_jpeg

    with pytest.raises(ImageError) as info:
        decode_image(cut_jpeg(n_bytes))
    assert info.value.kind == "truncated", info.value.row_error


# VmHWM, this process's own peak RSS (ru_maxrss would count the forking parent's RSS too)
_PEAK_RSS = """
import sys
from georeasoner.core.images import decode_image

def status(field):
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024

data = open(sys.argv[1], "rb").read()
reduce_to = int(sys.argv[2]) or None
before = status("VmRSS")
img = decode_image(data, reduce_to=reduce_to)
print(img.size[0], img.size[1], status("VmHWM") - before)
"""


@pytest.mark.parametrize("reduce_to", [0, 2048])
def test_sixteen_bit_decode_memory_is_bounded(tmp_path, reduce_to):
    """A 16-bit 6000x6000 PNG (~150 KB) decodes without float64 full-size copies: the peak RSS above the bytes in
    hand is about the decoded 16-bit image (72 MB) plus one band, and the RGB result when it is not reduced.
    (Before: +1.4 GB, float64 arrays of the whole image.)"""
    import subprocess
    import sys

    from conftest import REPO
    from samples import large_png

    path = tmp_path / "huge16.png"
    path.write_bytes(large_png(6000, 6000, 16))
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path), str(reduce_to)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    width, height, grew = map(int, out.stdout.split())
    decoded, mib = 6000 * 6000 * 2, 2**20
    if reduce_to:
        assert (width, height) == (3000, 3000)
        assert grew < decoded + 100 * mib, f"+{grew / mib:.0f} MiB"
    else:
        assert (width, height) == (6000, 6000)
        assert grew < decoded + 6000 * 6000 * 4 + 100 * mib, f"+{grew / mib:.0f} MiB"  # + the RGB result


def test_reduce_to_shrinks_while_decoding():
    """``reduce_to`` keeps the longest side >= reduce_to; it is the full decode reduced by an integer factor
    (box average) for PNG, DCT-scaled for JPEG; 16-bit values are scaled as without it; EXIF orientation applies."""
    from PIL import Image

    from georeasoner.core.images import decode_image_sized
    from samples import _photo, _save, large_png

    png = large_png(2100, 900, 16)
    full = decode_image(png)
    small, size = decode_image_sized(png, reduce_to=500)
    assert size == (2100, 900) and small.size == (525, 225)  # factor 4
    assert small.tobytes() == full.reduce(4).tobytes()
    lo, hi = small.convert("L").getextrema()
    assert lo < 5 and hi > 250
    photo = _photo(3, size=(1600, 1200))
    exif = photo.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    jpeg = _save(photo, "JPEG", quality=90, exif=exif)
    img, size = decode_image_sized(jpeg, reduce_to=300)
    assert size == (1600, 1200) and img.size == (300, 400)  # DCT scale 1/4, then turned upright
    assert decode_image(jpeg).size == (1200, 1600)
    img.thumbnail((150, 150), Image.BICUBIC)
    assert img.size == (112, 150)
