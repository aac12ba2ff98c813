"""ASGI entry point for daphne: HTTP through Django's sync stack in a pool of threads
(omniva/handler.py), websockets through Channels."""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omniva.settings")
django.setup(set_prefix=False)

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import path  # noqa: E402

from jobs.consumers import ActivityConsumer  # noqa: E402
from omniva.handler import PooledHTTPHandler  # noqa: E402
from omniva.live import FlowControlMiddleware  # noqa: E402

# Channels routes ASGI apps with Django's path(), whose stubs expect a view.
websocket_urlpatterns: list = [
    path("ws/events", ActivityConsumer.as_asgi()),  # type: ignore[arg-type]
    path("ws/jobs/<str:job_id>", ActivityConsumer.as_asgi()),  # type: ignore[arg-type]
]

application = ProtocolTypeRouter(
    {
        "http": PooledHTTPHandler(threads=settings.OMNIVA_WEB_THREADS),
        # Origins are checked by the consumers for session callers only; API-key
        # callers (engines, scripts) send none.
        "websocket": FlowControlMiddleware(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
