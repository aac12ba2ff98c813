"""The `image_generation` handlers: the procedural Pillow generator, and the ComfyUI
client against a local fake ComfyUI (POST /prompt, GET /history/{id}, GET /view), in
process and behind a real `manage.py run_engine --comfyui-url`."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from PIL import Image

from engines.models import Event, EventStatus
from engines.sdk.builtin import register_builtin_handlers
from engines.sdk.client import EngineClient
from engines.sdk.handlers import HandlerError, get_handler
from engines.sdk.image_generation import ComfyUIClient, ComfyUIConfig, comfyui_handler, procedural
from omniva import services as omniva_services
from omniva.models import Scope
from tests.conftest import ProcessGroup, free_port, start_daphne, wait_for


def no_progress(percent: float) -> None:
    pass


def png_of(result: dict[str, Any]) -> Image.Image:
    data = base64.b64decode(result["image_png_base64"])
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


class FakeComfyUI(http.server.ThreadingHTTPServer):
    """ComfyUI's HTTP API as far as the client uses it. `empty_polls` history answers
    are empty before the outputs appear; `mode` is "ok", "error" (the workflow fails),
    "never" (it never finishes) or "reject" (POST /prompt answers 400)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.empty_polls = 2
        self.prompts: list[dict[str, Any]] = []
        self.history_polls = 0
        self.deleted: list[str] = []
        self.views: list[dict[str, list[str]]] = []
        self.image = b""
        super().__init__(("127.0.0.1", 0), _ComfyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def make_image(self, graph: dict[str, Any]) -> bytes:
        latent = graph["5"]["inputs"]
        picture = Image.new("RGB", (latent["width"], latent["height"]), (200, 30, 90))
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return buffer.getvalue()


class _ComfyHandler(http.server.BaseHTTPRequestHandler):
    server: FakeComfyUI

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/queue":
            self.server.deleted.extend(body.get("delete", []))
            self._json(200, {})
            return
        assert self.path == "/prompt"
        if self.server.mode == "reject":
            self._json(
                400,
                {
                    "error": {"type": "prompt_outputs_failed_validation", "message": "Invalid"},
                    "node_errors": {
                        "4": {"errors": [{"message": "Value not in list", "details": "ckpt_name"}]}
                    },
                },
            )
            return
        self.server.prompts.append(body)
        self.server.image = self.server.make_image(body["prompt"])
        self._json(200, {"prompt_id": f"p-{len(self.server.prompts)}", "number": 0})

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/history/"):
            prompt_id = url.path.rsplit("/", 1)[1]
            server = self.server
            server.history_polls += 1
            if server.mode == "never" or server.history_polls <= server.empty_polls:
                self._json(200, {})
            elif server.mode == "error":
                status = {
                    "status_str": "error",
                    "completed": False,
                    "messages": [
                        ["execution_error", {"node_type": "KSampler", "exception_message": "OOM"}]
                    ],
                }
                self._json(200, {prompt_id: {"outputs": {}, "status": status}})
            else:
                image = {"filename": "omniva_00001_.png", "subfolder": "", "type": "output"}
                status = {"status_str": "success", "completed": True, "messages": []}
                self._json(
                    200, {prompt_id: {"outputs": {"9": {"images": [image]}}, "status": status}}
                )
            return
        if url.path == "/view":
            self.server.views.append(urllib.parse.parse_qs(url.query, keep_blank_values=True))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.server.image)))
            self.end_headers()
            self.wfile.write(self.server.image)
            return
        self._json(404, {})

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def comfyui() -> Iterator[FakeComfyUI]:
    server = FakeComfyUI()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def client_for(server_url: str, **overrides: Any) -> ComfyUIClient:
    return ComfyUIClient(ComfyUIConfig(url=server_url, poll_s=0.01, **overrides))


# --- procedural ---------------------------------------------------------------------------


def test_the_procedural_generator_is_deterministic_and_returns_a_png_of_the_asked_size() -> None:
    request = {"prompt": "a fox in a neon forest", "seed": 42, "width": 320, "height": 192}
    first = procedural(request, no_progress)
    again = procedural(dict(request), no_progress)
    other_seed = procedural({**request, "seed": 43}, no_progress)
    other_prompt = procedural({**request, "prompt": "a fox in a desert"}, no_progress)

    assert first == again
    assert first["image_png_base64"] != other_seed["image_png_base64"]
    assert first["image_png_base64"] != other_prompt["image_png_base64"]
    image = png_of(first)
    assert image.size == (320, 192)
    assert (first["width"], first["height"], first["seed"]) == (320, 192, 42)
    assert first["generator"] == "procedural"
    # Art, not a flat fill: many distinct colours.
    assert len(image.convert("RGB").getcolors(maxcolors=1_000_000)) > 1000


def test_a_stage_event_takes_its_request_from_its_parents_requests() -> None:
    data = {
        "job_id": "j",
        "pipeline": "pod_design",
        "stage": "generate_1",
        "params": {"prompt": "the job's prompt", "productTypes": ["tshirt"]},
        "inputs": {
            "prompt": {
                "requests": {
                    "generate_0": {"prompt": "first", "seed": 1, "width": 64, "height": 64},
                    "generate_1": {"prompt": "second", "seed": 2, "width": 128, "height": 64},
                }
            }
        },
    }
    result = procedural(data, no_progress)
    assert (result["prompt"], result["seed"]) == ("second", 2)
    assert png_of(result).size == (128, 64)


@pytest.mark.parametrize(
    "request_data",
    [
        {"prompt": "   "},
        {"prompt": "x", "width": 100},  # not a multiple of 8
        {"prompt": "x", "height": 4096},
        {"prompt": "x", "seed": -1},
        {"seed": 3},
    ],
)
def test_a_bad_request_is_refused_with_invalid_data(request_data: dict[str, Any]) -> None:
    with pytest.raises(HandlerError) as refused:
        procedural(request_data, no_progress)
    assert refused.value.code == "INVALID_DATA"


# --- ComfyUI ------------------------------------------------------------------------------


def test_the_comfyui_handler_sends_prompt_and_seed_in_the_graph_and_returns_its_image(
    comfyui: FakeComfyUI,
) -> None:
    handler = comfyui_handler(client_for(comfyui.url, checkpoint="sdxl.safetensors"))
    progress: list[float] = []
    request = {"prompt": "a red fox, flat vector", "seed": 1234, "width": 256, "height": 192}

    result = handler(request, progress.append)

    [sent] = comfyui.prompts
    graph = sent["prompt"]
    assert {node["class_type"] for node in graph.values()} == {
        "CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
        "VAEDecode", "SaveImage",
    }  # fmt: skip
    assert graph["6"]["inputs"]["text"] == "a red fox, flat vector"
    assert graph["3"]["inputs"]["seed"] == 1234
    assert graph["3"]["inputs"]["positive"] == ["6", 0]
    assert graph["5"]["inputs"] == {"width": 256, "height": 192, "batch_size": 1}
    assert graph["4"]["inputs"]["ckpt_name"] == "sdxl.safetensors"
    assert sent["client_id"]
    # Polled until the outputs appeared, then fetched the saved file.
    assert comfyui.history_polls == 3
    assert comfyui.views == [
        {"filename": ["omniva_00001_.png"], "subfolder": [""], "type": ["output"]}
    ]
    assert base64.b64decode(result["image_png_base64"]) == comfyui.image
    assert png_of(result).size == (256, 192)
    assert (result["generator"], result["seed"], result["checkpoint"]) == (
        "comfyui", 1234, "sdxl.safetensors",
    )  # fmt: skip
    assert progress
    assert progress == sorted(progress)


def test_a_workflow_that_fails_in_comfyui_is_comfyui_failed_with_its_message(
    comfyui: FakeComfyUI,
) -> None:
    comfyui.mode = "error"
    with pytest.raises(HandlerError) as failed:
        comfyui_handler(client_for(comfyui.url))({"prompt": "x"}, no_progress)
    assert failed.value.code == "COMFYUI_FAILED"
    assert "OOM" in failed.value.message
    assert "KSampler" in failed.value.message


def test_a_workflow_comfyui_refuses_is_comfyui_rejected_with_its_explanation(
    comfyui: FakeComfyUI,
) -> None:
    comfyui.mode = "reject"
    with pytest.raises(HandlerError) as refused:
        comfyui_handler(client_for(comfyui.url))({"prompt": "x"}, no_progress)
    assert refused.value.code == "COMFYUI_REJECTED"
    assert "Value not in list" in refused.value.message


def test_a_comfyui_that_never_finishes_times_out_and_the_prompt_leaves_its_queue(
    comfyui: FakeComfyUI,
) -> None:
    comfyui.mode = "never"
    progress: list[float] = []
    with pytest.raises(HandlerError) as timed_out:
        comfyui_handler(client_for(comfyui.url, timeout_s=0.3))({"prompt": "x"}, progress.append)
    assert timed_out.value.code == "COMFYUI_TIMEOUT"
    assert comfyui.history_polls > 1
    assert comfyui.deleted == ["p-1"]
    assert progress
    assert max(progress) < 100


def test_an_unreachable_comfyui_is_comfyui_unavailable() -> None:
    handler = comfyui_handler(client_for(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(HandlerError) as unavailable:
        handler({"prompt": "x"}, no_progress)
    assert unavailable.value.code == "COMFYUI_UNAVAILABLE"


# --- selection --------------------------------------------------------------------------


def test_image_generation_is_procedural_unless_the_engine_is_given_a_comfyui_server(
    comfyui: FakeComfyUI,
) -> None:
    request = {"prompt": "x", "width": 64, "height": 64}
    try:
        register_builtin_handlers()
        handler = get_handler("image_generation")
        assert handler is not None
        assert handler(request, no_progress)["generator"] == "procedural"
        assert comfyui.prompts == []

        comfyui.empty_polls = 0
        register_builtin_handlers(comfyui=ComfyUIConfig(url=comfyui.url, poll_s=0.01))
        handler = get_handler("image_generation")
        assert handler is not None
        assert handler(request, no_progress)["generator"] == "comfyui"
        assert len(comfyui.prompts) == 1
    finally:
        register_builtin_handlers()  # procedural again, as an engine without ComfyUI


def test_run_engine_refuses_a_comfyui_url_that_is_not_http() -> None:
    with pytest.raises(CommandError, match="http"):
        call_command(
            "run_engine",
            "--type", "image_generation",
            "--url", "http://127.0.0.1:1",
            "--key", "k",
            "--comfyui-url", "file:///etc/passwd",
        )  # fmt: skip


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_run_engine_with_comfyui_url_sends_image_generation_events_to_comfyui(
    comfyui: FakeComfyUI, processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> None:
    server = start_daphne(processes, test_database_url, free_port(), tmp_path / "daphne.log")
    _, secret = omniva_services.api_key_create(name="comfy-engine", scopes=[Scope.ENGINES])
    api = EngineClient(server.url, secret)
    api.request(
        "POST", "/event-types", {"name": "image_generation", "engine_type": "image_generation"}
    )
    event = api.request(
        "POST",
        "/events",
        {
            "event_type": "image_generation",
            "data": {"prompt": "a koi", "seed": 7, "width": 64, "height": 64},
        },
    )
    log = tmp_path / "engine.log"
    engine = processes.manage(
        "run_engine",
        "--type", "image_generation",
        "--url", server.url,
        "--wait-s", "5",
        "--comfyui-url", comfyui.url,
        env={"OMNIVA_ENGINE_KEY": secret},
        log=log,
    )  # fmt: skip

    def completed() -> Event | None:
        assert engine.poll() is None, log.read_text()
        row = Event.objects.get(pk=event["id"])
        return row if row.status == EventStatus.COMPLETED else None

    done = wait_for(completed, timeout=30, interval=0.1, what="the event to complete")

    assert done.result["generator"] == "comfyui"
    [sent] = comfyui.prompts
    assert (sent["prompt"]["6"]["inputs"]["text"], sent["prompt"]["3"]["inputs"]["seed"]) == (
        "a koi",
        7,
    )
    assert base64.b64decode(done.result["image_png_base64"]) == comfyui.image
