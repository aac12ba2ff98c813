"""Scopes: each view names the scope its reads and its writes need.

A view sets `read_scope` and `write_scope` (safe and unsafe methods); a view that
names neither needs `admin`; a scope of None admits any valid key. Staff users
logged in to the admin have every scope; other logged-in users have none.

A view that spans every project (engines and their events, the audit trail) sets
`unbound_only`: a key bound to a project is refused there whatever its scopes, since
nothing there is narrowed to one project.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from omniva.models import ApiKey, Project, Scope


def required_scope(request: Request, view: Any) -> str | None:
    if request.method in SAFE_METHODS:
        return getattr(view, "read_scope", Scope.ADMIN)
    return getattr(view, "write_scope", Scope.ADMIN)


def bound_project(request: Request) -> Project | None:
    """The project the caller's key is bound to, or None for an unbound caller."""
    key = request.auth
    if isinstance(key, ApiKey):
        return key.project
    return None


class HasScope(BasePermission):
    message = "This key does not have the scope this request needs."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        scope = required_scope(request, view)
        if isinstance(request.auth, ApiKey):
            if request.auth.project_id is not None and getattr(view, "unbound_only", False):
                self.message = "A key bound to a project cannot use this endpoint."
                return False
            if scope is None or request.auth.has_scope(scope):
                return True
            self.message = f"This key lacks the scope {scope!s}."
            return False
        if user.is_staff:
            return True
        self.message = "Only staff users may use the API with a session."
        return False
