"""The composition root: every app's routes meet here (DESIGN.md, "Imports point one way")."""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path

from omniva import dashboard, media
from omniva.api import views as api_views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health", api_views.RootHealthView.as_view(), name="health-root"),
    path("dashboard", dashboard.dashboard, name="dashboard"),
    path("v1/", include("omniva.api.urls")),
    path("v1/", include("jobs.api.urls")),
    path("v1/", include("engines.api.urls")),
    path("v1/", include("publishing.api.urls")),
    # Last under /v1: every unknown path answers an enveloped 404.
    re_path(r"^v1(?:/.*)?$", api_views.NotFoundView.as_view(), name="v1-not-found"),
    # Pipeline outputs under the media root; their names are under the job's id.
    re_path(r"^" + settings.MEDIA_URL.strip("/") + r"/(?P<path>.+)$", media.media_file),
    path("", include("django_prometheus.urls")),
]

handler400 = "omniva.api.views.bad_request"
handler403 = "omniva.api.views.permission_denied"
handler404 = "omniva.api.views.page_not_found"
handler500 = "omniva.api.views.server_error"
