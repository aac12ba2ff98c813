"""The operator dashboard: one page for staff users; everything live is done by its JS
(static/dashboard/dashboard.js) over /ws/events, /ws/jobs/{id} and the /v1 API."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render, resolve_url
from django.views.decorators.csrf import ensure_csrf_cookie


@ensure_csrf_cookie  # the page's writes to /v1 send the cookie's token back
def dashboard(request: HttpRequest) -> HttpResponse:
    if not request.user.is_authenticated:
        return redirect_to_login(request.get_full_path(), resolve_url(settings.LOGIN_URL))
    if not request.user.is_staff:
        raise PermissionDenied("The dashboard is for staff users.")
    return render(request, "dashboard/index.html")
