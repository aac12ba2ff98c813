"""The `image_generation` engine handlers: text to image, for the pod_design pipeline.

Two generators answer the same request with the same result shape:

- `procedural`: abstract, text-free art drawn with Pillow (gradients, discs, rings,
  polygons, stripes), deterministic from (prompt, seed, size): the same request gives
  the same bytes. It needs no model and no GPU, so every install can run the pipeline.
- the ComfyUI client (`comfyui_handler`): a minimal standard text-to-image workflow
  (checkpoint, two text encodings, empty latent, sampler, VAE decode, save) queued with
  `POST /prompt`, polled with `GET /history/{id}` until it has outputs or a deadline
  passes, and the image fetched with `GET /view`.

The request: a stage event (engines/sdk/handlers.py) finds it under `requests[<stage>]` in
one of its parents' outputs (pod_design's `prompt` stage makes one per generate stage);
any other event's data is the request itself. Fields: `prompt`, `negative_prompt`?,
`seed`?, `width`?, `height`?. The result: `{"image_png_base64", "width", "height",
"seed", "prompt", "generator", "bytes"}`. The engine may run on another machine and
does not share the server's storage, so the image travels in the result.

ComfyUI is configured by the engine's environment: OMNIVA_COMFYUI_URL (its presence
selects ComfyUI over the procedural generator; `run_engine --comfyui-url` overrides it),
OMNIVA_COMFYUI_CHECKPOINT, OMNIVA_COMFYUI_STEPS, OMNIVA_COMFYUI_TIMEOUT_S. `manage.py
run_engine` reads them once at start and hands the choice to `register_builtin_handlers`
(engines/sdk/builtin.py).
"""

from __future__ import annotations

import base64
import colorsys
import contextlib
import hashlib
import json
import math
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from engines.sdk.handlers import Handler, HandlerError, ProgressFn, is_stage_event
from omniva.images import MAX_EDGE, ImageCheckError, encode_png, open_png

EVENT_TYPE = "image_generation"

# A request's width and height: DEFAULT_EDGE when it names none, from MIN_EDGE to
# omniva.images.MAX_EDGE (the largest picture a pipeline takes back).
DEFAULT_EDGE = 512
MIN_EDGE = 64
# Latent diffusion works on 8x8 pixel blocks: other sizes are silently cropped.
EDGE_MULTIPLE = 8
PROMPT_MAX_CHARS = 2000
SEED_MAX = 2**32 - 1

INVALID_DATA = "INVALID_DATA"
COMFYUI_UNAVAILABLE = "COMFYUI_UNAVAILABLE"  # not reachable, or a 5xx: a retry may work
COMFYUI_REJECTED = "COMFYUI_REJECTED"  # the workflow was refused (a missing checkpoint)
COMFYUI_FAILED = "COMFYUI_FAILED"  # the workflow ran and failed
COMFYUI_TIMEOUT = "COMFYUI_TIMEOUT"
COMFYUI_NO_IMAGE = "COMFYUI_NO_IMAGE"
COMFYUI_BAD_RESPONSE = "COMFYUI_BAD_RESPONSE"

COMFYUI_URL_ENV = "OMNIVA_COMFYUI_URL"
COMFYUI_CHECKPOINT_ENV = "OMNIVA_COMFYUI_CHECKPOINT"
COMFYUI_STEPS_ENV = "OMNIVA_COMFYUI_STEPS"
COMFYUI_TIMEOUT_ENV = "OMNIVA_COMFYUI_TIMEOUT_S"
DEFAULT_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
DEFAULT_NEGATIVE_PROMPT = "text, letters, watermark, signature, blurry, low quality"
# The node ids of the workflow graph; the image is read from the SaveImage node's output.
SAVE_NODE = "9"
JSON_MAX_BYTES = 16 * 2**20
IMAGE_MAX_BYTES = 32 * 2**20


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    seed: int = 0
    width: int = DEFAULT_EDGE
    height: int = DEFAULT_EDGE
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT


def _invalid(message: str) -> HandlerError:
    return HandlerError(message, INVALID_DATA)


def _bounded_int(raw: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(f"{name} must be an integer from {low} to {high}, not {value!r}")
    return value


def image_request(data: dict[str, Any]) -> ImageRequest:
    """The request an event carries (see the module doc), checked."""
    raw: Any = data
    if is_stage_event(data):
        stage = data["stage"]
        found = [
            output["requests"][stage]
            for output in (data.get("inputs") or {}).values()
            if isinstance(output, dict)
            and isinstance(output.get("requests"), dict)
            and stage in output["requests"]
        ]
        raw = found[0] if found else data["params"]
    if not isinstance(raw, dict):
        raise _invalid("the request must be an object")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > PROMPT_MAX_CHARS:
        raise _invalid(f"prompt must be a non-blank string of at most {PROMPT_MAX_CHARS} chars")
    negative = raw.get("negative_prompt", DEFAULT_NEGATIVE_PROMPT)
    if not isinstance(negative, str) or len(negative) > PROMPT_MAX_CHARS:
        raise _invalid(f"negative_prompt must be a string of at most {PROMPT_MAX_CHARS} chars")
    width = _bounded_int(raw, "width", DEFAULT_EDGE, MIN_EDGE, MAX_EDGE)
    height = _bounded_int(raw, "height", DEFAULT_EDGE, MIN_EDGE, MAX_EDGE)
    if width % EDGE_MULTIPLE or height % EDGE_MULTIPLE:
        raise _invalid(f"width and height must be multiples of {EDGE_MULTIPLE}")
    return ImageRequest(
        prompt=prompt.strip(),
        seed=_bounded_int(raw, "seed", 0, 0, SEED_MAX),
        width=width,
        height=height,
        negative_prompt=negative,
    )


def _result(request: ImageRequest, png: bytes, image: Image.Image, generator: str) -> dict:
    return {
        "image_png_base64": base64.b64encode(png).decode("ascii"),
        "width": image.width,
        "height": image.height,
        "seed": request.seed,
        "prompt": request.prompt,
        "generator": generator,
        "bytes": len(png),
    }


# --- procedural ------------------------------------------------------------------------

# Drawn at twice the size and scaled down: Pillow's shapes have no anti-aliasing.
SUPERSAMPLE = 2
Color = tuple[int, int, int]


def _palette(rng: random.Random) -> list[Color]:
    """Five colours around a random hue: analogous, complementary or triadic."""
    hue = rng.random()
    offsets = rng.choice(
        [(0, 0.08, -0.08, 0.5, 0.04), (0, 0.5, 0.45, 0.55, 0.1), (0, 1 / 3, 2 / 3, 0.05, 0.38)]
    )
    colors = []
    for offset in offsets:
        r, g, b = colorsys.hsv_to_rgb(
            (hue + offset) % 1.0, rng.uniform(0.45, 0.95), rng.uniform(0.5, 1.0)
        )
        colors.append((round(r * 255), round(g * 255), round(b * 255)))
    return colors


def _gradient(size: tuple[int, int], start: Color, end: Color, angle: float) -> Image.Image:
    width, height = size
    # A rotated square as wide as the diagonal still covers the whole canvas.
    side = math.ceil(math.hypot(width, height))
    mask = Image.linear_gradient("L").resize((side, side), Image.Resampling.BILINEAR)
    mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR)
    left, top = (side - width) // 2, (side - height) // 2
    mask = mask.crop((left, top, left + width, top + height))
    return Image.composite(Image.new("RGB", size, end), Image.new("RGB", size, start), mask)


def _glow(canvas: Image.Image, rng: random.Random, color: Color) -> None:
    """A soft radial light somewhere on the canvas."""
    width, height = canvas.size
    radius = int(min(width, height) * rng.uniform(0.3, 0.6))
    # radial_gradient is black at its centre and white at its rim: invert for a glow.
    mask = Image.radial_gradient("L").resize((2 * radius, 2 * radius), Image.Resampling.BILINEAR)
    mask = mask.point(lambda v: max(0, 200 - v))
    centre = (int(width * rng.uniform(0.2, 0.8)), int(height * rng.uniform(0.2, 0.8)))
    canvas.paste(color, (centre[0] - radius, centre[1] - radius), mask)


def _shape(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], fill: Any) -> None:
    width, height = size
    unit = min(width, height)
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    radius = unit * rng.uniform(0.05, 0.3)
    kind = rng.choice(("disc", "ring", "polygon", "polygon", "stripes", "arc"))
    if kind == "disc":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif kind == "ring":
        draw.ellipse(
            (cx - radius, cy - radius, cx + radius, cy + radius),
            outline=fill,
            width=max(1, int(radius * rng.uniform(0.08, 0.3))),
        )
    elif kind == "polygon":
        sides = rng.randint(3, 7)
        rotation = rng.uniform(0, math.tau)
        points = [
            (
                cx + radius * math.cos(rotation + i * math.tau / sides),
                cy + radius * math.sin(rotation + i * math.tau / sides),
            )
            for i in range(sides)
        ]
        draw.polygon(points, fill=fill)
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        dx, dy = math.cos(angle) * unit, math.sin(angle) * unit
        gap = unit * rng.uniform(0.02, 0.06)
        stroke = max(1, int(gap * rng.uniform(0.2, 0.6)))
        for i in range(rng.randint(3, 8)):
            ox, oy = -math.sin(angle) * gap * i, math.cos(angle) * gap * i
            draw.line(
                (cx - dx + ox, cy - dy + oy, cx + dx + ox, cy + dy + oy), fill=fill, width=stroke
            )
    else:
        start = rng.uniform(0, 360)
        draw.arc(
            (cx - radius, cy - radius, cx + radius, cy + radius),
            start,
            start + rng.uniform(60, 300),
            fill=fill,
            width=max(1, int(radius * 0.15)),
        )


def draw_procedural(request: ImageRequest) -> Image.Image:
    """Abstract art for `request`: the same request always draws the same pixels."""
    digest = hashlib.sha256(f"{request.seed}\x00{request.prompt}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:16], "big"))  # noqa: S311 (art, not secrets)
    size = (request.width * SUPERSAMPLE, request.height * SUPERSAMPLE)
    colors = _palette(rng)
    canvas = _gradient(size, colors[0], colors[1], rng.uniform(0, 360))
    _glow(canvas, rng, colors[4])
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.randint(7, 16)):
        color = rng.choice(colors[1:])
        _shape(draw, rng, size, (*color, rng.randint(110, 235)))
    canvas = Image.alpha_composite(canvas.convert("RGBA"), layer).convert("RGB")
    return canvas.resize((request.width, request.height), Image.Resampling.LANCZOS)


def procedural(data: dict[str, Any], report_progress: ProgressFn) -> dict[str, Any]:
    """The `image_generation` handler that draws with Pillow (see draw_procedural)."""
    request = image_request(data)
    report_progress(10)
    image = draw_procedural(request)
    report_progress(90)
    return _result(request, encode_png(image), image, "procedural")


# --- ComfyUI ---------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, not {raw!r}")
    return value


@dataclass(frozen=True)
class ComfyUIConfig:
    url: str
    checkpoint: str = DEFAULT_CHECKPOINT
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "euler"
    scheduler: str = "normal"
    # The whole generation, queue wait included; each HTTP call has its own timeout.
    timeout_s: float = 600.0
    poll_s: float = 1.0
    request_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the ComfyUI URL must be an http(s) URL, not {self.url!r}")

    @classmethod
    def from_environment(cls, url: str | None = None) -> ComfyUIConfig:
        """The ComfyUI settings of this engine's environment; `url` overrides its URL."""
        return cls(
            url=(url or os.environ.get(COMFYUI_URL_ENV, "")).strip().rstrip("/"),
            checkpoint=os.environ.get(COMFYUI_CHECKPOINT_ENV, "").strip() or DEFAULT_CHECKPOINT,
            steps=int(_env_float(COMFYUI_STEPS_ENV, 20)),
            timeout_s=_env_float(COMFYUI_TIMEOUT_ENV, 600.0),
        )


def text_to_image_graph(request: ImageRequest, config: ComfyUIConfig) -> dict[str, Any]:
    """ComfyUI's default text-to-image workflow in its API form (node id -> node)."""
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": request.seed,
                "steps": config.steps,
                "cfg": config.cfg,
                "sampler_name": config.sampler,
                "scheduler": config.scheduler,
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": config.checkpoint}},
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": request.width, "height": request.height, "batch_size": 1},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": request.prompt, "clip": ["4", 1]}},
        "7": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": request.negative_prompt, "clip": ["4", 1]},
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        SAVE_NODE: {
            "class_type": "SaveImage",
            "inputs": {"filename_prefix": "omniva", "images": ["8", 0]},
        },
    }


def _comfyui_error_text(body: bytes) -> str:
    """ComfyUI's own explanation in an error answer: its message and the node errors."""
    try:
        answer = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", "replace")
    if not isinstance(answer, dict):
        return str(answer)[:300]
    error = answer.get("error")
    parts = [str(error.get("message") or error) if isinstance(error, dict) else str(error or "")]
    for node_id, node in (answer.get("node_errors") or {}).items():
        for item in (node or {}).get("errors", []) if isinstance(node, dict) else []:
            parts.append(f"node {node_id}: {item.get('message')} ({item.get('details')})")
    return "; ".join(part for part in parts if part)[:1000]


class ComfyUIClient:
    """A ComfyUI server's HTTP API, as far as one text-to-image generation needs it.

    The URL is the operator's engine configuration, not a user's input, and is usually
    a private address (ComfyUI listens on 127.0.0.1:8188): it is called directly with
    urllib like the engine's own API client (engines/sdk/client.py), not through the
    server's SSRF-guarded omniva/outbound/, which also drops the error bodies whose
    ComfyUI explanation (a checkpoint not found) the event's error should carry.
    """

    def __init__(self, config: ComfyUIConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock

    def _call(self, method: str, path: str, body: Any = None, *, max_bytes: int) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 (ComfyUIConfig checks the scheme)
            self.config.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        where = f"ComfyUI {method} {path.split('?')[0]}"
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=self.config.request_timeout_s
            ) as answer:
                content = answer.read(max_bytes + 1)
        except urllib.error.HTTPError as error:
            explanation = _comfyui_error_text(error.read(64 * 1024))
            code = (
                COMFYUI_UNAVAILABLE if error.code >= 500 or error.code == 429 else COMFYUI_REJECTED
            )
            raise HandlerError(f"{where} answered {error.code}: {explanation}", code) from error
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise HandlerError(f"{where} failed: {reason}", COMFYUI_UNAVAILABLE) from error
        if len(content) > max_bytes:
            raise HandlerError(
                f"{where} answered more than {max_bytes} bytes", COMFYUI_BAD_RESPONSE
            )
        return content

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        content = self._call(method, path, body, max_bytes=JSON_MAX_BYTES)
        try:
            return json.loads(content)
        except ValueError as error:
            raise HandlerError(
                f"ComfyUI {method} {path} answered something that is not JSON",
                COMFYUI_BAD_RESPONSE,
            ) from error

    def submit(self, graph: dict[str, Any], client_id: str) -> str:
        """Queue the workflow; its prompt id."""
        answer = self._json("POST", "/prompt", {"prompt": graph, "client_id": client_id})
        prompt_id = answer.get("prompt_id") if isinstance(answer, dict) else None
        if not prompt_id:
            raise HandlerError(
                f"ComfyUI queued nothing: {_comfyui_error_text(json.dumps(answer).encode())}",
                COMFYUI_REJECTED,
            )
        return str(prompt_id)

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history entry, or None while ComfyUI has none (still queued or
        running)."""
        answer = self._json("GET", f"/history/{urllib.parse.quote(prompt_id, safe='')}")
        if not isinstance(answer, dict):
            raise HandlerError("ComfyUI's history is not an object", COMFYUI_BAD_RESPONSE)
        entry = answer.get(prompt_id)
        return entry if isinstance(entry, dict) else None

    def view(self, image: dict[str, Any]) -> bytes:
        query = urllib.parse.urlencode(
            {
                "filename": str(image.get("filename") or ""),
                "subfolder": str(image.get("subfolder") or ""),
                "type": str(image.get("type") or "output"),
            }
        )
        return self._call("GET", f"/view?{query}", max_bytes=IMAGE_MAX_BYTES)

    def cancel(self, prompt_id: str) -> None:
        """Take the prompt off ComfyUI's queue, best effort (a generation we gave up on
        should not hold its GPU)."""
        with contextlib.suppress(HandlerError):
            self._call("POST", "/queue", {"delete": [prompt_id]}, max_bytes=JSON_MAX_BYTES)

    def wait_for_image(self, prompt_id: str, report_progress: ProgressFn) -> dict[str, Any]:
        """Poll the history until the prompt has an image (its descriptor), failed, or
        ran past the deadline."""
        started = self.clock()
        deadline = started + self.config.timeout_s
        while True:
            entry = self.history(prompt_id)
            if entry is not None:
                image = _saved_image(entry)
                if image is not None:
                    return image
                reported = entry.get("status")
                status: dict[str, Any] = reported if isinstance(reported, dict) else {}
                if status.get("status_str") == "error":
                    raise HandlerError(
                        f"ComfyUI failed the workflow: {_execution_error(status)}", COMFYUI_FAILED
                    )
                if status.get("completed"):
                    raise HandlerError("ComfyUI finished without an image", COMFYUI_NO_IMAGE)
            now = self.clock()
            if now >= deadline:
                self.cancel(prompt_id)
                raise HandlerError(
                    f"ComfyUI did not finish prompt {prompt_id} within {self.config.timeout_s:g} s",
                    COMFYUI_TIMEOUT,
                )
            # ComfyUI's history says nothing until the end: an estimate that approaches
            # 90% (each report also keeps the event's lease alive).
            report_progress(10 + 80 * (1 - math.exp(-(now - started) / 30.0)))
            time.sleep(min(self.config.poll_s, max(0.0, deadline - now)))

    def generate(self, request: ImageRequest, report_progress: ProgressFn) -> bytes:
        """The PNG bytes of one text-to-image generation."""
        prompt_id = self.submit(text_to_image_graph(request, self.config), uuid.uuid4().hex)
        report_progress(10)
        image = self.wait_for_image(prompt_id, report_progress)
        return self.view(image)


def _saved_image(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The first image the workflow saved (the SaveImage node's, else any node's)."""
    outputs = entry.get("outputs")
    if not isinstance(outputs, dict):
        return None
    nodes = [outputs.get(SAVE_NODE)] + [v for k, v in outputs.items() if k != SAVE_NODE]
    for node in nodes:
        images = node.get("images") if isinstance(node, dict) else None
        for image in images or []:
            if isinstance(image, dict) and image.get("filename"):
                return image
    return None


def _execution_error(status: dict[str, Any]) -> str:
    for message in status.get("messages") or []:
        if isinstance(message, list) and len(message) == 2 and message[0] == "execution_error":
            detail = message[1] if isinstance(message[1], dict) else {}
            node = detail.get("node_type") or detail.get("node_id") or "?"
            return f"{detail.get('exception_message') or 'an error'} (in {node})"
    return "no error message"


def comfyui_handler(client: ComfyUIClient) -> Handler:
    """The `image_generation` handler that asks ComfyUI through `client`."""

    def comfyui(data: dict[str, Any], report_progress: ProgressFn) -> dict[str, Any]:
        request = image_request(data)
        png = client.generate(request, report_progress)
        try:
            image = open_png(png)
        except ImageCheckError as error:
            raise HandlerError(f"ComfyUI's image: {error.message}", COMFYUI_BAD_RESPONSE) from error
        result = _result(request, png, image, "comfyui")
        result["checkpoint"] = client.config.checkpoint
        return result

    return comfyui
