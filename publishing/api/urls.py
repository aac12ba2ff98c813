"""The /v1 routes of publishing (mounted by omniva/urls.py)."""

from __future__ import annotations

from django.urls import path

from publishing.api import views

urlpatterns = [
    path("destinations", views.DestinationListView.as_view(), name="destination-list"),
    path(
        "destinations/<uuid:pk>", views.DestinationDetailView.as_view(), name="destination-detail"
    ),
    path("publications", views.PublicationListView.as_view(), name="publication-list"),
    path(
        "publications/<uuid:pk>", views.PublicationDetailView.as_view(), name="publication-detail"
    ),
    path("schedules", views.ScheduleListView.as_view(), name="schedule-list"),
    path("schedules/<uuid:pk>", views.ScheduleDetailView.as_view(), name="schedule-detail"),
]
