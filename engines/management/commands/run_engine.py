"""`manage.py run_engine --type T --url URL [--key KEY]`: an engine process (engines/sdk/runner.py).

The key may come from OMNIVA_ENGINE_KEY instead of --key (a key on the command line is
visible to every user of the machine). SIGTERM or Ctrl-C drains, a second one stops at
once; either way the engine deregisters and exits 0.

`--comfyui-url` (or OMNIVA_COMFYUI_URL) makes `image_generation` events go to that
ComfyUI server instead of the procedural generator (engines/sdk/image_generation.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from engines.sdk.builtin import register_builtin_handlers
from engines.sdk.handlers import handler_names
from engines.sdk.image_generation import COMFYUI_URL_ENV, ComfyUIConfig
from engines.sdk.runner import RunnerConfig, run_engine

KEY_ENV = "OMNIVA_ENGINE_KEY"


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = "Run an engine: register, claim events of its type, run their handlers, report."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--type", dest="engine_type", required=True, help="Engine type.")
        parser.add_argument("--url", required=True, help="The server's base URL.")
        parser.add_argument("--key", help=f"API key with the engines scope (or ${KEY_ENV}).")
        parser.add_argument("--name", help="Engine name (default: made by the server).")
        parser.add_argument("--batch-size", type=_positive_int, default=3)
        parser.add_argument("--concurrency", type=_positive_int, default=1)
        parser.add_argument("--heartbeat-s", type=_positive_float, default=10.0)
        parser.add_argument(
            "--wait-s", type=float, default=20.0, help="Long-poll wait of each claim (0-30)."
        )
        parser.add_argument(
            "--capability", action="append", dest="capabilities", default=[], metavar="C"
        )
        parser.add_argument(
            "--comfyui-url",
            help=f"ComfyUI server for image_generation events (or ${COMFYUI_URL_ENV}; "
            "default: the procedural generator).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        key = options["key"] or os.environ.get(KEY_ENV, "")
        if not key:
            raise CommandError(f"Give an API key with --key or ${KEY_ENV}.")
        if not 0 <= options["wait_s"] <= 30:
            raise CommandError("--wait-s must be between 0 and 30.")
        if options["batch_size"] > 10:
            raise CommandError("--batch-size must be 10 at most.")
        comfyui_url = options["comfyui_url"] or os.environ.get(COMFYUI_URL_ENV, "")
        comfyui = self._comfyui_config(comfyui_url) if comfyui_url.strip() else None
        register_builtin_handlers(comfyui=comfyui)
        config = RunnerConfig(
            url=options["url"],
            api_key=key,
            engine_type=options["engine_type"],
            name=options["name"],
            batch_size=options["batch_size"],
            concurrency=options["concurrency"],
            heartbeat_s=options["heartbeat_s"],
            wait_s=options["wait_s"],
            capabilities=tuple(options["capabilities"]),
        )
        self.stderr.write(
            f"{config.engine_type} engine for {config.url}; handlers: {', '.join(handler_names())}"
        )
        code = run_engine(config)
        if code:
            sys.exit(code)

    def _comfyui_config(self, url: str) -> ComfyUIConfig:
        try:
            comfyui = ComfyUIConfig.from_environment(url)
        except ValueError as error:
            raise CommandError(str(error)) from error
        self.stderr.write(
            f"image_generation: ComfyUI at {comfyui.url} (checkpoint {comfyui.checkpoint})"
        )
        return comfyui
