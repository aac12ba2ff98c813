"""Pure image functions for the GPU pipeline stages: decode, classify, upscale, encode.

Nothing here touches the database. Bad input raises StageError with a stable code and
`retryable=False` (retrying cannot fix the bytes): INVALID_IMAGE for bytes that do not
decode as an image of an accepted format, IMAGE_TOO_LARGE for more pixels than allowed.

The upscaler is classical image processing, not a learned model: bicubic resampling
followed by an unsharp mask, both in torch so they run on the stage's device. It works
tile by tile so the memory it needs is bounded by the tile, not by the picture.
"""

from __future__ import annotations

import functools
import io
import math
import struct
import warnings
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from jobs.pipelines.context import StageError
from omniva.images import IMAGE_TOO_LARGE, INVALID_IMAGE

# Only the common web formats: each of Pillow's many other decoders is attack surface
# for bytes that arrive from users, and none of them is needed.
ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# An aspect ratio within this fraction of 1 counts as square: a 200x195 photo is meant
# to be square, and a crop a few pixels off should not change its category.
SQUARE_TOLERANCE = 0.05
DOMINANT_COLORS = 5
# Colour statistics do not need every pixel; a small copy makes them cheap and stable.
CLASSIFY_MAX_EDGE = 128

UPSCALE_METHOD = "bicubic + unsharp mask (torch)"
UPSCALE_SCALES = (2, 4)
# Blur width of the unsharp mask in *input* pixels, so the sharpening acts on the same
# image detail at either scale (in output pixels it is this times the scale).
UNSHARP_SIGMA = 0.5
# How much of the detail (image minus its blur) is added back.
UNSHARP_AMOUNT = 0.8
# A Gaussian is negligible beyond three sigmas.
GAUSSIAN_TRUNCATE = 3.0
# Bicubic reads two input pixels on either side of the point it samples.
BICUBIC_SUPPORT = 2
# One more input pixel than strictly needed, so rounding in the sample positions can
# never reach a tile's clamped edge.
HALO_MARGIN = 1


def _stage_error(code: str, message: str) -> StageError:
    return StageError(code, message, retryable=False)


@functools.cache
def _open_formats() -> tuple[str, ...]:
    # Image.open raises KeyError for a format whose plugin is not registered (WEBP
    # without libwebp, say), so ask only for the ones this Pillow build has.
    Image.init()
    return tuple(name for name in ACCEPTED_FORMATS if name in Image.OPEN)


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode `data` into an RGB image, upright per its EXIF orientation.

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb is refused at the cost of reading a few bytes. Transparency is
    composited on white.
    """
    too_large = _stage_error(IMAGE_TOO_LARGE, f"the image has more than {max_pixels} pixels")
    try:
        # Pillow's own bomb check warns (RuntimeWarning) before it raises; as an error
        # here it is refused like ours instead of slipping through as a log line.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=_open_formats())
            width, height = image.size
            if width * height > max_pixels:
                raise too_large
            image.load()
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise too_large from exc
    except UnidentifiedImageError as exc:
        raise _stage_error(
            INVALID_IMAGE,
            f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})",
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        # Truncated or corrupt data surfaces as any of these, depending on the plugin.
        raise _stage_error(INVALID_IMAGE, f"the image could not be decoded: {exc}") from exc
    if width <= 0 or height <= 0:
        raise _stage_error(INVALID_IMAGE, "the image has no pixels")
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # Pillow's I -> L conversion clips at 255, which would turn a 16-bit picture
        # white; scale it into 8 bits instead.
        wide = np.asarray(image, dtype=np.float64) / 257.0
        narrow = np.clip(np.rint(wide), 0, 255).astype(np.uint8)
        return Image.fromarray(narrow).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def classify_image(image: Image.Image) -> dict[str, Any]:
    """Describe an image's shape and its up to five dominant colours, largest share first.

    Returns width, height, aspect_ratio (width / height, 4 places), category
    ("portrait", "landscape" or "square") and dominant_colors, a list of
    {"hex": "#rrggbb", "share": fraction of the pixels} whose shares sum to 1.
    """
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _stage_error(INVALID_IMAGE, "the image has no pixels")
    ratio = width / height
    if abs(ratio - 1.0) <= SQUARE_TOLERANCE:
        category = "square"
    elif ratio > 1.0:
        category = "landscape"
    else:
        category = "portrait"
    return {
        "width": width,
        "height": height,
        "aspect_ratio": round(ratio, 4),
        "category": category,
        "dominant_colors": _dominant_colors(image),
    }


def _dominant_colors(image: Image.Image) -> list[dict[str, Any]]:
    rgb = _to_rgb(image)
    shrink = CLASSIFY_MAX_EDGE / max(rgb.size)
    if shrink < 1.0:
        size = (max(1, round(rgb.width * shrink)), max(1, round(rgb.height * shrink)))
        small = rgb.resize(size, Image.Resampling.BOX)
    else:
        small = rgb
    quantized = small.quantize(colors=DOMINANT_COLORS, method=Image.Quantize.MEDIANCUT)
    palette = quantized.getpalette() or []
    total = small.width * small.height
    counts: dict[str, int] = {}
    # getcolors gives (count, palette index) for the indices actually used; two
    # indices can hold the same colour, so merge by colour.
    # A "P" image's colours are palette indices (the stubs also allow RGB tuples).
    used = cast("list[tuple[int, int]]", quantized.getcolors(maxcolors=256) or [])
    for count, index in used:
        red, green, blue = palette[3 * index : 3 * index + 3]
        key = f"#{red:02x}{green:02x}{blue:02x}"
        counts[key] = counts.get(key, 0) + count
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [{"hex": key, "share": round(count / total, 4)} for key, count in ranked]


def upscale_halo(scale: int) -> int:
    """Input pixels read around each tile so that its output matches the untiled one."""
    return BICUBIC_SUPPORT + math.ceil(_blur_radius(scale) / scale) + HALO_MARGIN


def _blur_radius(scale: int) -> int:
    return math.ceil(GAUSSIAN_TRUNCATE * UNSHARP_SIGMA * scale)


def _gaussian_kernel(scale: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    radius = _blur_radius(scale)
    sigma = UNSHARP_SIGMA * scale
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    return weights.to(device=device, dtype=dtype)


def _upscale_tile(tile: torch.Tensor, scale: int, kernel: torch.Tensor) -> torch.Tensor:
    """Upscale and sharpen one (1, 3, h, w) tile with values in [0, 1]."""
    up = F.interpolate(tile, scale_factor=scale, mode="bicubic", align_corners=False)
    radius = (kernel.numel() - 1) // 2
    channels = up.shape[1]
    # The Gaussian is separable: a row pass and a column pass cost 2k, not k^2, per pixel.
    row = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    column = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    blurred = F.conv2d(F.pad(up, (radius, radius, 0, 0), mode="replicate"), row, groups=channels)
    blurred = F.conv2d(
        F.pad(blurred, (0, 0, radius, radius), mode="replicate"), column, groups=channels
    )
    return (up + UNSHARP_AMOUNT * (up - blurred)).clamp_(0.0, 1.0)


def upscale(
    image: Image.Image,
    *,
    scale: int,
    device: torch.device | str = "cpu",
    tile: int = 512,
    half: bool = False,
) -> Image.Image:
    """Enlarge `image` by `scale` (2 or 4): bicubic resampling, then an unsharp mask.

    This is classical resampling, not a learned super-resolution model: it makes edges
    crisper than plain bicubic but invents no detail. The input is cut into tiles of at
    most `tile` x `tile` pixels, each upscaled with a halo of neighbouring pixels
    (`upscale_halo`) that is cropped off again, so the result does not depend on the
    tile size and the device memory needed is bounded by the tile. `half` computes in
    float16, which halves the memory of a tile and is faster on CUDA; on CPU it works
    too (torch has the float16 kernels) but gains little, so float32 is the default.
    """
    if scale not in UPSCALE_SCALES:
        raise ValueError(f"scale must be one of {UPSCALE_SCALES}, got {scale!r}")
    if tile < 1:
        raise ValueError(f"tile must be at least 1 pixel, got {tile!r}")
    device = torch.device(device)
    dtype = torch.float16 if half else torch.float32
    pixels = np.asarray(_to_rgb(image), dtype=np.uint8)
    height, width = pixels.shape[:2]
    halo = upscale_halo(scale)
    # Replicate-padding the whole picture once means every tile, at the border or not,
    # reads the same neighbours as the untiled run would.
    padded = np.pad(pixels, ((halo, halo), (halo, halo), (0, 0)), mode="edge")
    output = np.empty((height * scale, width * scale, 3), dtype=np.uint8)
    with torch.inference_mode():
        kernel = _gaussian_kernel(scale, device=device, dtype=dtype)
        for top in range(0, height, tile):
            bottom = min(top + tile, height)
            for left in range(0, width, tile):
                right = min(left + tile, width)
                window = padded[top : bottom + 2 * halo, left : right + 2 * halo]
                source = torch.from_numpy(np.ascontiguousarray(window)).to(device)
                source = source.permute(2, 0, 1).unsqueeze(0).to(dtype).div_(255.0)
                result = _upscale_tile(source, scale, kernel)
                crop = halo * scale
                result = result[
                    0,
                    :,
                    crop : crop + (bottom - top) * scale,
                    crop : crop + (right - left) * scale,
                ]
                # Scale and round in float32: in float16, value * 255 is off by up to
                # 1/16 of a grey level, enough to round some pixels to the wrong one.
                levels = result.float().mul_(255.0).round_().to(torch.uint8)
                output[top * scale : bottom * scale, left * scale : right * scale] = (
                    levels.permute(1, 2, 0).cpu().numpy()
                )
    return Image.fromarray(output)


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio of two same-sized images in dB over 8-bit RGB; inf if equal."""
    if a.size != b.size:
        raise ValueError(f"images differ in size: {a.size} and {b.size}")
    first = np.asarray(a.convert("RGB"), dtype=np.float64)
    second = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((first - second) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


ENCODE_FORMATS = ("PNG", "JPEG", "WEBP")


def encode_image(image: Image.Image, image_format: str = "PNG", *, quality: int = 90) -> bytes:
    """Encode `image` as PNG (lossless), JPEG or WEBP (`quality` 1-100 for the lossy two)."""
    name = image_format.upper()
    if name not in ENCODE_FORMATS:
        raise ValueError(f"image_format must be one of {ENCODE_FORMATS}, got {image_format!r}")
    buffer = io.BytesIO()
    if name == "PNG":
        image.save(buffer, format="PNG")
    elif name == "JPEG":
        # JPEG has no alpha channel: flatten on white, the same way decode_image does.
        _to_rgb(image).save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()
