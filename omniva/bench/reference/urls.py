"""The reference's one path, `GET /ref`: a DRF view that runs one query."""

from __future__ import annotations

from django.db import connection
from django.urls import path
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

PATH = "/ref"


class OneQueryView(APIView):
    # Named here, not only in settings, so the view is the same under any settings (tests).
    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = []
    renderer_classes = [JSONRenderer]

    def get(self, request: Request) -> Response:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            (value,) = cursor.fetchone()
        return Response({"ok": value == 1})


urlpatterns = [path(PATH.lstrip("/"), OneQueryView.as_view(), name="reference")]
