"""Safe decode and encode of PNG pictures, shared by the engine and the pipelines.

The `image_generation` engine checks the picture ComfyUI sends it, and `pod_design`
checks the picture an engine sent back, with the same `open_png`; both encode with
`encode_png`. What belongs to the generator (the default size of a request, its
smallest edge, the multiple of 8 that latent diffusion needs) stays in
engines/sdk/image_generation.py.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The largest edge of a picture that passes between an engine and a pipeline: the
# generator takes no request above it, and open_png decodes nothing above it.
MAX_EDGE = 1024

INVALID_IMAGE = "INVALID_IMAGE"
IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"


class ImageCheckError(ValueError):
    """A picture that is not a PNG, or one too large: `code` is INVALID_IMAGE or
    IMAGE_TOO_LARGE."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def open_png(data: bytes, *, max_edge: int = MAX_EDGE) -> Image.Image:
    """Decode `data` as a PNG of at most `max_edge` pixels a side; the size is checked
    from the header before any pixel is decoded. Raises ImageCheckError."""
    if not data.startswith(PNG_SIGNATURE):
        raise ImageCheckError(INVALID_IMAGE, "the image is not a PNG")
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        width, height = image.size
        if not (0 < width <= max_edge and 0 < height <= max_edge):
            raise ImageCheckError(
                IMAGE_TOO_LARGE, f"the image is {width}x{height}; at most {max_edge} a side"
            )
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ImageCheckError):
            raise
        raise ImageCheckError(INVALID_IMAGE, f"the PNG could not be decoded: {exc}") from exc
    return image


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
