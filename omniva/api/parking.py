"""Waits that hold nothing: a view parks its answer until a notification wakes it.

A view that would wait (a sync job submission, a long-polling claim) renders the answer
as it stands and hands it to `park` with an `attempt`: a function that reads again and
returns `(status, data)` once there is an answer, or None to keep waiting (with
`last=True`, when the time has run out, it must answer).

Served by omniva.handler (every web process), the parked response is not sent when
the view returns: the handler gives its thread back to the pool (and with it the
database connection), waits on the listener's notification in the event loop, and
runs `attempt` in a pool thread each time it is woken. So a thousand waiting clients
hold a thousand coroutines, not a thousand threads or connections.

Anywhere else (Django's test client, a management command calling a view) `park`
waits in place, in the calling thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rest_framework.request import Request
from rest_framework.response import Response

from omniva.api.exceptions import envelope_exception_handler
from omniva.api.renderers import EnvelopeResponse
from omniva.notifications import Listener

# Set in the ASGI scope by omniva.handler: this request may be parked.
PARKING_SCOPE_KEY = "omniva.parking"

Outcome = tuple[int, Any]
Attempt = Callable[[bool], Outcome | None]


@dataclass
class Parked:
    listener: Listener
    payload: str
    timeout_s: float
    attempt: Attempt

    def attempt_rendered(self, response: Response, *, last: bool) -> bool:
        """Run the attempt (in a pool thread) and, when it answered, render the answer
        into `response` in place: the headers the middleware set (request id, ...) stay.
        A failure is rendered as the API renders any error."""
        try:
            outcome = self.attempt(last)
        except Exception as exc:
            outcome = _error_outcome(exc, response)
        if outcome is None:
            return False
        status, data = outcome
        response.status_code = status
        response.data = data
        response.content = response.accepted_renderer.render(
            data,
            response.accepted_media_type,
            response.renderer_context,  # type: ignore[attr-defined]  # stub gap: set by finalize_response
        )
        if response.has_header("Content-Length"):
            response["Content-Length"] = str(len(response.content))
        return True


def _error_outcome(exc: Exception, response: Response) -> Outcome:
    context = response.renderer_context  # type: ignore[attr-defined]  # stub gap, as above
    handled = envelope_exception_handler(exc, dict(context or {}))
    for name, value in handled.headers.items():
        response[name] = value
    return handled.status_code, handled.data


def can_park(request: Request | Any) -> bool:
    http_request = getattr(request, "_request", request)
    scope = getattr(http_request, "scope", None) or {}
    return bool(scope.get(PARKING_SCOPE_KEY))


def park(
    request: Request,
    response: EnvelopeResponse,
    *,
    listener: Listener,
    payload: str,
    timeout_s: float,
    attempt: Attempt,
) -> EnvelopeResponse:
    """`response` parked until `attempt` answers (see the module's docstring)."""
    parked = Parked(listener=listener, payload=payload, timeout_s=timeout_s, attempt=attempt)
    if can_park(request):
        response.parked = parked  # type: ignore[attr-defined]
        return response
    outcome = listener.wait_until(
        payload,
        read=lambda: attempt(False),
        done=lambda value: value is not None,
        timeout_s=timeout_s,
    )
    if outcome is None:
        outcome = attempt(True)
    assert outcome is not None
    status, data = outcome
    return EnvelopeResponse(data, status=status)
