"""`manage.py grpcserver`: seed 004's gRPC OrchestratorService on GRPC_PORT (docs/grpc.md).

`make run` starts it beside daphne (omniva/management/commands/serve.py). SIGTERM or
SIGINT stops it: new calls are refused, open streams end with UNAVAILABLE (clients
resume after their last sequence), and unary calls get `--grace-s` to finish.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from jobs.grpc.service import build_server

DEFAULT_WORKERS = 32
DEFAULT_GRACE_S = 5.0


class Command(BaseCommand):
    help = "Serve seed 004's gRPC OrchestratorService (SubmitTask, GetTaskStatus, …)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=settings.HOST)
        parser.add_argument("--port", type=int, default=settings.GRPC_PORT)
        parser.add_argument(
            "--workers",
            type=int,
            default=DEFAULT_WORKERS,
            help="Calls served at once (an open stream holds one); more are refused "
            "with RESOURCE_EXHAUSTED.",
        )
        parser.add_argument("--grace-s", type=float, default=DEFAULT_GRACE_S)

    def handle(self, *args: Any, **options: Any) -> None:
        if options["workers"] < 1:
            raise CommandError("--workers is at least 1.")
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
        signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        try:
            server = build_server(
                host=options["host"], port=options["port"], workers=options["workers"]
            )
        except RuntimeError as exc:
            raise CommandError(f"gRPC: {exc}") from None
        server.start()
        self.stdout.write(f"[omniva] gRPC OrchestratorService on {options['host']}:{server.port}")
        self.stdout.flush()
        # A timed wait, so that the main thread runs the signal handlers promptly.
        while not stop.wait(1.0):
            pass
        self.stdout.write("[omniva] gRPC server stopping…")
        self.stdout.flush()
        server.stop(options["grace_s"])
