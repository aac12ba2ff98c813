"""The /v1 routes of the core. omniva/urls.py mounts these and every app's under /v1."""

from __future__ import annotations

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.response import Response
from rest_framework.views import APIView

from omniva.api import views
from omniva.api.renderers import EnvelopeJSONRenderer


class EnvelopedErrors(APIView):
    """The schema and docs render YAML or HTML; their errors are enveloped JSON all the same."""

    def handle_exception(self, exc: Exception) -> Response:
        response = super().handle_exception(exc)
        self.request.accepted_renderer = EnvelopeJSONRenderer()
        self.request.accepted_media_type = EnvelopeJSONRenderer.media_type
        return response


class SchemaView(EnvelopedErrors, SpectacularAPIView):
    read_scope = None  # any valid key


class SwaggerView(EnvelopedErrors, SpectacularSwaggerView):
    read_scope = None  # any valid key


class RedocView(EnvelopedErrors, SpectacularRedocView):
    read_scope = None  # any valid key


urlpatterns = [
    path("health", views.HealthView.as_view(), name="health"),
    path("info", views.InfoView.as_view(), name="info"),
    path("metrics", views.MetricsView.as_view(), name="metrics"),
    path("projects", views.ProjectListView.as_view(), name="project-list"),
    path("projects/<uuid:pk>", views.ProjectDetailView.as_view(), name="project-detail"),
    path("creators", views.CreatorListView.as_view(), name="creator-list"),
    path("creators/<uuid:pk>", views.CreatorDetailView.as_view(), name="creator-detail"),
    path("clips", views.ClipListView.as_view(), name="clip-list"),
    path("clips/<uuid:pk>", views.ClipDetailView.as_view(), name="clip-detail"),
    path("clips/<uuid:pk>/similar", views.ClipSimilarView.as_view(), name="clip-similar"),
    path("audit", views.AuditListView.as_view(), name="audit-list"),
    path("schema", SchemaView.as_view(), name="schema"),
    path("docs", SwaggerView.as_view(url_name="schema"), name="docs"),
    path("redoc", RedocView.as_view(url_name="schema"), name="redoc"),
]
