"""The /v1 routes of the job engine (mounted by omniva/urls.py)."""

from __future__ import annotations

from django.urls import path

from jobs.api import views

urlpatterns = [
    path("jobs", views.JobListView.as_view(), name="job-list"),
    path("jobs/batch", views.JobBatchView.as_view(), name="job-batch"),
    path("jobs/cleanup", views.JobCleanupView.as_view(), name="job-cleanup"),
    path("jobs/<str:job_id>", views.JobDetailView.as_view(), name="job-detail"),
    path("jobs/<str:job_id>/logs", views.JobLogsView.as_view(), name="job-logs"),
    path("jobs/<str:job_id>/cancel", views.JobCancelView.as_view(), name="job-cancel"),
    path("jobs/<str:job_id>/retry", views.JobRetryView.as_view(), name="job-retry"),
    path("pipelines", views.PipelineListView.as_view(), name="pipeline-list"),
    path("clips/search", views.ClipSearchView.as_view(), name="clip-search"),
]
