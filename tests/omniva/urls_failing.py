"""The real URLconf plus two /v1 endpoints that fail, to see how failures are answered."""

from __future__ import annotations

from django.db import OperationalError
from django.urls import path
from rest_framework.views import APIView

from omniva.models import Scope
from omniva.urls import urlpatterns as real_urlpatterns


class FailingView(APIView):
    read_scope = Scope.JOBS_READ

    def get(self, request):
        raise RuntimeError("boom-secret-detail")


class DatabaseDownView(APIView):
    read_scope = Scope.JOBS_READ

    def get(self, request):
        raise OperationalError("connection to server failed")


urlpatterns = [
    path("v1/test-failure", FailingView.as_view()),
    path("v1/test-database-down", DatabaseDownView.as_view()),
    *real_urlpatterns,
]
handler400 = "omniva.api.views.bad_request"
handler403 = "omniva.api.views.permission_denied"
handler404 = "omniva.api.views.page_not_found"
handler500 = "omniva.api.views.server_error"
