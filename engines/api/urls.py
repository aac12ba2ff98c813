"""The /v1 routes of engines and events (mounted by omniva/urls.py)."""

from __future__ import annotations

from django.urls import path

from engines.api import views

urlpatterns = [
    path("engine-instances", views.EngineListView.as_view(), name="engine-list"),
    path(
        "engine-instances/<str:engine_id>", views.EngineDetailView.as_view(), name="engine-detail"
    ),
    path(
        "engine-instances/<str:engine_id>/heartbeat",
        views.EngineHeartbeatView.as_view(),
        name="engine-heartbeat",
    ),
    path("event-types", views.EventTypeListView.as_view(), name="event-type-list"),
    path("events", views.EventListView.as_view(), name="event-list"),
    path("events/claim", views.EventClaimView.as_view(), name="event-claim"),
    # Before events/<event_id>: "status" is not an event id.
    path("events/status", views.EventReportBatchView.as_view(), name="event-status-batch"),
    path("events/dead-letter", views.DeadLetterListView.as_view(), name="event-dead-letter"),
    path("events/queue/<str:engine_type>", views.EventQueueView.as_view(), name="event-queue"),
    path("events/<str:event_id>", views.EventDetailView.as_view(), name="event-detail"),
    path("events/<str:event_id>/status", views.EventStatusView.as_view(), name="event-status"),
    path("events/<str:event_id>/requeue", views.EventRequeueView.as_view(), name="event-requeue"),
]
