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
