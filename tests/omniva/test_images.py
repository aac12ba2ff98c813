"""omniva/images.py: the PNG checks the image engine and pod_design share."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from omniva.images import (
    IMAGE_TOO_LARGE,
    INVALID_IMAGE,
    MAX_EDGE,
    ImageCheckError,
    encode_png,
    open_png,
)


def truncated_png(size: tuple[int, int]) -> bytes:
    """A PNG of `size` in noise (which does not compress) cut in half: its header is
    whole, its pixel data short."""
    data = encode_png(Image.frombytes("L", size, os.urandom(size[0] * size[1])))
    return data[: len(data) // 2]


def test_a_png_round_trips() -> None:
    picture = Image.new("RGB", (64, 32), (10, 200, 30))

    decoded = open_png(encode_png(picture))

    assert decoded.size == (64, 32)
    assert decoded.getpixel((5, 5)) == (10, 200, 30)


def test_the_size_is_refused_from_the_header_before_any_pixel_is_decoded() -> None:
    with pytest.raises(ImageCheckError) as too_large:
        open_png(truncated_png((MAX_EDGE + 1, 1)))
    with pytest.raises(ImageCheckError) as truncated:
        open_png(truncated_png((8, 8)))

    assert too_large.value.code == IMAGE_TOO_LARGE
    assert truncated.value.code == INVALID_IMAGE


@pytest.mark.parametrize("data", [b"", b"GIF89a not a png", b"\x89PNG\r\n\x1a\n garbage"])
def test_what_is_not_a_png_is_an_invalid_image(data: bytes) -> None:
    with pytest.raises(ImageCheckError) as refused:
        open_png(data)

    assert refused.value.code == INVALID_IMAGE


def test_a_smaller_limit_is_the_callers_to_set() -> None:
    with pytest.raises(ImageCheckError) as refused:
        open_png(encode_png(Image.new("RGB", (65, 64))), max_edge=64)

    assert refused.value.code == IMAGE_TOO_LARGE
