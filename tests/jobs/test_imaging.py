"""The pure image functions behind the GPU stages: decode, classify, upscale, encode."""

from __future__ import annotations

import io
import math
import struct
import time
import zlib
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from jobs.pipelines.context import StageError
from jobs.pipelines.lib import imaging
from jobs.pipelines.lib.imaging import (
    classify_image,
    decode_image,
    encode_image,
    psnr,
    upscale,
    upscale_halo,
)
from omniva.images import encode_png

MAX_PIXELS = 16_000_000


def sample_picture(width: int = 256, height: int = 192, supersample: int = 4) -> Image.Image:
    """Smooth gradients, a few filled shapes and thin dark lines, anti-aliased like a photo."""
    big_w, big_h = width * supersample, height * supersample
    x = np.linspace(0.0, 1.0, big_w)[None, :]
    y = np.linspace(0.0, 1.0, big_h)[:, None]
    red = 40 + 200 * x * np.ones_like(y)
    green = 30 + 200 * y * np.ones_like(x)
    blue = 127 + 90 * np.sin(5 * x + 3 * y)
    image = Image.fromarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    k = supersample
    draw.ellipse((20 * k, 20 * k, 100 * k, 90 * k), fill=(250, 240, 30))
    draw.rectangle(
        (140 * k, 30 * k, 220 * k, 110 * k),
        fill=(20, 30, 160),
        outline=(255, 255, 255),
        width=3 * k,
    )
    draw.polygon([(40 * k, 170 * k), (120 * k, 110 * k), (160 * k, 180 * k)], fill=(200, 20, 60))
    for i in range(5):
        row = (130 + 10 * i) * k
        draw.line((150 * k, row, 240 * k, row), fill=(10, 10, 10), width=2 * k)
    return image.resize((width, height), Image.Resampling.BOX)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB pixels, with one empty IDAT and no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def decode_error(data: bytes, *, max_pixels: int = MAX_PIXELS) -> StageError:
    with pytest.raises(StageError) as caught:
        decode_image(data, max_pixels=max_pixels)
    return caught.value


# --- decode_image ---------------------------------------------------------------------


def test_a_png_decodes_to_the_same_rgb_pixels() -> None:
    picture = sample_picture(64, 48)
    decoded = decode_image(png_bytes(picture), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.size == (64, 48)
    assert np.array_equal(np.asarray(decoded), np.asarray(picture))


def test_random_bytes_are_an_invalid_image_that_is_not_retried() -> None:
    noise = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    error = decode_error(noise)
    assert error.code == "INVALID_IMAGE"
    assert error.retryable is False


def test_empty_bytes_are_an_invalid_image() -> None:
    assert decode_error(b"").code == "INVALID_IMAGE"


def test_a_truncated_png_is_an_invalid_image() -> None:
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    error = decode_error(data[: len(data) // 2])
    assert error.code == "INVALID_IMAGE"
    assert error.retryable is False


def test_a_format_outside_the_accepted_ones_is_an_invalid_image() -> None:
    buffer = io.BytesIO()
    sample_picture(16, 16).save(buffer, format="PPM")  # Pillow reads PPM; we do not accept it
    assert decode_error(buffer.getvalue()).code == "INVALID_IMAGE"


def test_more_pixels_than_allowed_is_image_too_large() -> None:
    data = png_bytes(sample_picture(40, 30))
    error = decode_error(data, max_pixels=40 * 30 - 1)
    assert error.code == "IMAGE_TOO_LARGE"
    assert error.retryable is False
    assert decode_image(data, max_pixels=40 * 30).size == (40, 30)


def test_the_pixel_limit_is_checked_from_the_header_before_any_pixel_is_decoded() -> None:
    # The file holds no pixel data at all: decoding it fails, so IMAGE_TOO_LARGE can
    # only come from the header.
    data = png_header_only(4000, 3000)
    assert decode_error(data, max_pixels=4000 * 3000).code == "INVALID_IMAGE"
    assert decode_error(data, max_pixels=1_000_000).code == "IMAGE_TOO_LARGE"


def test_a_decompression_bomb_header_is_refused_quickly() -> None:
    # 10^10 pixels: 30 GB of RGB that could never be decoded in memory.
    data = png_header_only(100_000, 100_000)
    started = time.perf_counter()
    error = decode_error(data)
    assert error.code == "IMAGE_TOO_LARGE"
    assert time.perf_counter() - started < 1.0


def test_pillows_own_bomb_limit_still_applies_when_max_pixels_is_higher() -> None:
    over_warning = png_header_only(10_000, 10_000)  # past Pillow's warning limit
    over_error = png_header_only(100_000, 100_000)  # past Pillow's error limit
    assert decode_error(over_warning, max_pixels=10**12).code == "IMAGE_TOO_LARGE"
    assert decode_error(over_error, max_pixels=10**12).code == "IMAGE_TOO_LARGE"


def test_an_rgba_image_comes_out_rgb_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((1, 0), (255, 0, 0, 0))  # fully transparent
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    decoded = decode_image(png_bytes(rgba), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 0, 0)
    assert decoded.getpixel((1, 0)) == (255, 255, 255)
    assert all(abs(channel - 127) <= 1 for channel in decoded.getpixel((2, 0)))


def test_a_palette_image_comes_out_rgb_with_its_colours() -> None:
    picture = Image.new("RGB", (20, 10), (255, 0, 0))
    picture.paste((0, 0, 255), (10, 0, 20, 10))
    palette = picture.quantize(colors=2)
    assert palette.mode == "P"
    decoded = decode_image(png_bytes(palette), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 0, 0)
    assert decoded.getpixel((19, 9)) == (0, 0, 255)


def test_a_gif_with_a_transparent_colour_comes_out_white_there() -> None:
    picture = Image.new("P", (4, 4), 1)
    picture.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))
    picture.putpixel((0, 0), 0)
    buffer = io.BytesIO()
    picture.save(buffer, format="GIF", transparency=0)
    decoded = decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((3, 3)) == (0, 200, 0)


def test_an_rgb_png_with_a_transparent_colour_key_comes_out_white_there() -> None:
    picture = Image.new("RGB", (4, 4), (255, 0, 0))
    picture.putpixel((3, 3), (0, 0, 200))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", transparency=(255, 0, 0))
    decoded = decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((3, 3)) == (0, 0, 200)


def test_a_16_bit_greyscale_png_is_scaled_to_8_bits_not_clipped() -> None:
    grey = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    decoded = decode_image(png_bytes(grey), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    assert [decoded.getpixel((x, 0)) for x in range(3)] == [
        (0, 0, 0),
        (128, 128, 128),
        (255, 255, 255),
    ]


def test_a_cmyk_jpeg_comes_out_rgb() -> None:
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, format="JPEG", quality=95)
    decoded = decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB"
    red, green, blue = decoded.getpixel((4, 4))
    assert red > 200
    assert max(green, blue) < 60


def test_the_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to show
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (0, 128, 255)).save(buffer, format="JPEG", exif=exif.tobytes())
    assert decode_image(buffer.getvalue(), max_pixels=MAX_PIXELS).size == (20, 40)


# --- classify_image -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "category", "aspect_ratio"),
    [
        ((300, 100), "landscape", 3.0),
        ((100, 300), "portrait", 0.3333),
        ((200, 200), "square", 1.0),
        ((200, 195), "square", 1.0256),
        ((195, 200), "square", 0.975),
        ((200, 180), "landscape", 1.1111),
        ((180, 200), "portrait", 0.9),
    ],
)
def test_an_image_is_classified_by_its_aspect_ratio(
    size: tuple[int, int], category: str, aspect_ratio: float
) -> None:
    result = classify_image(Image.new("RGB", size, (10, 20, 30)))
    assert (result["width"], result["height"]) == size
    assert result["category"] == category
    assert result["aspect_ratio"] == aspect_ratio


def test_a_half_red_half_blue_image_has_red_and_blue_as_dominant_colours() -> None:
    picture = Image.new("RGB", (300, 100), (255, 0, 0))
    picture.paste((0, 0, 255), (150, 0, 300, 100))
    colors = classify_image(picture)["dominant_colors"]
    assert {color["hex"] for color in colors} == {"#ff0000", "#0000ff"}
    assert all(color["share"] == pytest.approx(0.5, abs=0.02) for color in colors)


def test_a_solid_green_image_has_one_dominant_colour_covering_it() -> None:
    colors = classify_image(Image.new("RGB", (64, 48), (0, 255, 0)))["dominant_colors"]
    assert colors == [{"hex": "#00ff00", "share": 1.0}]


def test_a_busy_picture_has_at_most_five_dominant_colours_largest_first() -> None:
    colors = classify_image(sample_picture())["dominant_colors"]
    shares = [color["share"] for color in colors]
    assert 1 < len(colors) <= 5
    assert shares == sorted(shares, reverse=True)
    assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    assert all(len(color["hex"]) == 7 and color["hex"].startswith("#") for color in colors)


# --- upscale --------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2, 4])
def test_upscaling_multiplies_both_sides_by_the_scale(scale: int) -> None:
    result = upscale(sample_picture(37, 23), scale=scale)
    assert result.mode == "RGB"
    assert result.size == (37 * scale, 23 * scale)


@pytest.mark.parametrize("scale", [0, 1, 3, 8])
def test_scales_other_than_2_and_4_are_refused(scale: int) -> None:
    with pytest.raises(ValueError, match="scale"):
        upscale(sample_picture(8, 8), scale=scale)


def test_a_tile_smaller_than_one_pixel_is_refused() -> None:
    with pytest.raises(ValueError, match="tile"):
        upscale(sample_picture(8, 8), scale=2, tile=0)


@pytest.mark.parametrize(("scale", "margin_db"), [(2, 2.0), (4, 1.0)])
def test_upscaling_a_downscaled_picture_beats_nearest_neighbour(
    scale: int, margin_db: float
) -> None:
    original = sample_picture()
    small = original.resize(
        (original.width // scale, original.height // scale), Image.Resampling.BICUBIC
    )
    ours = psnr(original, upscale(small, scale=scale))
    nearest = psnr(original, small.resize(original.size, Image.Resampling.NEAREST))
    assert ours > nearest + margin_db


@pytest.mark.parametrize("scale", [2, 4])
def test_the_unsharp_mask_recovers_more_than_plain_bicubic(scale: int) -> None:
    original = sample_picture()
    small = original.resize(
        (original.width // scale, original.height // scale), Image.Resampling.BOX
    )
    ours = psnr(original, upscale(small, scale=scale))
    bicubic = psnr(original, small.resize(original.size, Image.Resampling.BICUBIC))
    assert ours > bicubic + 0.25


@pytest.mark.parametrize(("scale", "tile"), [(2, 32), (4, 32), (2, 7)])
def test_a_tiled_upscale_equals_the_untiled_one(scale: int, tile: int) -> None:
    # Noise on top of shapes: every tile seam crosses detail the halo must carry over.
    noise = np.random.default_rng(3).normal(0, 25, (70, 100, 3))
    base = np.asarray(sample_picture(100, 70), dtype=np.float64)
    picture = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    tiled = np.asarray(upscale(picture, scale=scale, tile=tile), dtype=np.int16)
    whole = np.asarray(upscale(picture, scale=scale, tile=4096), dtype=np.int16)
    difference = np.abs(tiled - whole)
    assert difference.max() <= 1
    assert np.mean(difference > 0) < 1e-3


def test_each_tile_sent_to_the_device_is_at_most_the_tile_plus_its_halo(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shapes: list[tuple[int, ...]] = []
    real = imaging._upscale_tile

    def recording(tile: torch.Tensor, scale: int, kernel: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tile.shape))
        return real(tile, scale, kernel)

    monkeypatch.setattr(imaging, "_upscale_tile", recording)
    upscale(sample_picture(100, 70), scale=2, tile=32)
    limit = 32 + 2 * upscale_halo(2)
    assert len(shapes) == math.ceil(100 / 32) * math.ceil(70 / 32)
    assert all(height <= limit and width <= limit for _, _, height, width in shapes)


def test_a_flat_image_stays_flat_when_upscaled() -> None:
    # Sharpening must not ring where there is no edge, nor at the picture's border.
    result = np.asarray(upscale(Image.new("RGB", (20, 12), (40, 120, 200)), scale=4, tile=8))
    assert np.all(result == np.array([40, 120, 200], dtype=np.uint8))


def test_half_precision_on_cpu_works_and_matches_full_precision() -> None:
    # Our choice for half=True on CPU: allowed, since torch has the float16 kernels there;
    # the result must still be the same picture to within a grey level or two.
    picture = sample_picture(48, 36)
    half = np.asarray(upscale(picture, scale=2, device="cpu", half=True), dtype=np.int16)
    full = np.asarray(upscale(picture, scale=2, device="cpu"), dtype=np.int16)
    difference = np.abs(half - full)
    assert difference.max() <= 2
    assert difference.mean() < 0.5


if torch.cuda.is_available():

    def test_half_precision_on_cuda_matches_full_precision_on_cpu() -> None:
        picture = sample_picture()
        half = upscale(picture, scale=4, device="cuda", half=True, tile=64)
        full = upscale(picture, scale=4, device="cpu")
        difference = np.abs(np.asarray(half, dtype=np.int16) - np.asarray(full, dtype=np.int16))
        assert difference.max() <= 2
        assert difference.mean() < 0.5


# --- psnr and encoding ----------------------------------------------------------------


def test_psnr_of_identical_images_is_infinite() -> None:
    picture = sample_picture(16, 16)
    assert psnr(picture, picture.copy()) == math.inf


def test_psnr_of_black_against_grey_level_one_is_48_db() -> None:
    black = Image.new("RGB", (8, 8), (0, 0, 0))
    almost = Image.new("RGB", (8, 8), (1, 1, 1))
    assert psnr(black, almost) == pytest.approx(20 * math.log10(255), abs=1e-9)
    assert psnr(black, Image.new("RGB", (8, 8), (255, 255, 255))) == pytest.approx(0.0)


def test_psnr_of_different_sizes_is_refused() -> None:
    with pytest.raises(ValueError, match="size"):
        psnr(Image.new("RGB", (8, 8)), Image.new("RGB", (8, 9)))


def test_encode_png_round_trips_through_decode_image() -> None:
    picture = sample_picture(40, 30)
    data = encode_png(picture)
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(
        np.asarray(decode_image(data, max_pixels=MAX_PIXELS)), np.asarray(picture)
    )


@pytest.mark.parametrize(
    ("image_format", "magic"), [("jpeg", b"\xff\xd8\xff"), ("WEBP", b"RIFF"), ("png", b"\x89PNG")]
)
def test_encode_image_writes_the_format_asked_for(image_format: str, magic: bytes) -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    data = encode_image(rgba, image_format)
    assert data.startswith(magic)
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert decoded.size == (16, 16)


def test_a_jpeg_of_a_transparent_image_is_flattened_on_white() -> None:
    data = encode_image(Image.new("RGBA", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)
    pixel: Any = decode_image(data, max_pixels=MAX_PIXELS).getpixel((8, 8))
    assert all(channel >= 250 for channel in pixel)


def test_encode_image_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="image_format"):
        encode_image(Image.new("RGB", (4, 4)), "TGA")
