"""Files under the media root, served by the web process (pipeline outputs such as
image_upscale's pictures). Behind a reverse proxy, serve the folder from the proxy."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.static import serve


def media_file(request: HttpRequest, path: str) -> HttpResponse:
    # The root is read per request (it is a setting; tests and `serve` change it).
    return serve(request, path, document_root=settings.MEDIA_ROOT)


def media_name(value: str) -> str:
    """A media file's name under the media root, from its served URL path (`/media/…`,
    what pipelines return) or from the name itself."""
    prefix = "/" + settings.MEDIA_URL.strip("/") + "/"
    return value[len(prefix) :] if value.startswith(prefix) else value
