"""A small client of the Engines API (API.md, "Engines and events") for engine processes.

Standard library only, so that an engine written in Python can copy or import it
without Django. Every call unwraps the `/v1` envelope: it returns `data`, or raises
`EngineApiError` for an error envelope, or `EngineUnavailable` when the server could
not be reached (or answered 502-504 without an envelope), which is worth retrying.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

DEFAULT_TIMEOUT_S = 10.0
# A long poll is held by the server for up to wait_s; the read waits that much longer.
LONG_POLL_MARGIN_S = 10.0


class EngineClientError(Exception):
    """Base of the errors this client raises."""


class EngineUnavailable(EngineClientError):
    """The server could not be reached or did not answer: back off and retry."""


class EngineApiError(EngineClientError):
    """The server answered with an error envelope (or a response that is not one)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: Any = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after_s = retry_after_s

    @property
    def transient(self) -> bool:
        """Rate limited, saturated, or a server error (its database down, a restart):
        retrying may succeed."""
        return self.status == 429 or self.status >= 500


def _report_body(
    status: str, lease_token: Any, result: Any, error: Any, progress: float | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"status": status}
    if lease_token is not None:
        body["lease_token"] = str(lease_token)
    if result is not None:
        body["result"] = result
    if error is not None:
        body["error"] = error
    if progress is not None:
        body["progress"] = max(0.0, min(100.0, float(progress)))
    return body


class EngineClient:
    """One engine's view of the API. `engine_id` is set by `register` (or by hand, to
    act for an engine registered earlier)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        engine_id: str | None = None,
        engine_type: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.api_key = api_key
        self.timeout = timeout
        self.engine_id = engine_id
        self.engine_type = engine_type
        # The HTTP status of the last answer (201 for a registration), None before one.
        self.last_status: int | None = None

    # --- the calls -------------------------------------------------------------------

    def register(
        self,
        engine_type: str,
        name: str | None = None,
        capabilities: Iterable[str] = (),
        resource_limits: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"engine_type": engine_type, "capabilities": list(capabilities)}
        if name:
            body["name"] = name
        if resource_limits:
            body["resource_limits"] = resource_limits
        engine = self.request("POST", "/engine-instances", body)
        self.engine_id = str(engine["id"])
        self.engine_type = engine_type
        return engine

    def heartbeat(
        self,
        status: str | None = None,
        current_workload: int | None = None,
        resource_utilization: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if status is not None:
            body["status"] = status
        if current_workload is not None:
            body["current_workload"] = current_workload
        if resource_utilization is not None:
            body["resource_utilization"] = resource_utilization
        return self.request("PUT", f"/engine-instances/{self._engine_id()}/heartbeat", body)

    def claim(
        self, batch_size: int = 3, wait_s: float = 0, *, engine_type: str | None = None
    ) -> list[dict[str, Any]]:
        """Lease up to `batch_size` events; waits up to `wait_s` (30 at most) for one."""
        engine_type = engine_type or self.engine_type
        if not engine_type:
            raise ValueError("claim needs an engine type: register first or pass engine_type")
        body: dict[str, Any] = {
            "engine_type": engine_type,
            "batch_size": batch_size,
            "wait_s": wait_s,
        }
        if self.engine_id:
            body["engine_id"] = self.engine_id
        return self.request(
            "POST", "/events/claim", body, timeout=max(self.timeout, wait_s + LONG_POLL_MARGIN_S)
        )

    def report(
        self,
        event_id: int | str,
        status: str,
        lease_token: str | None,
        result: Any = None,
        error: str | dict[str, Any] | None = None,
        progress: float | None = None,
    ) -> dict[str, Any]:
        """`processing` (with progress), `completed` (with result) or `failed` (with
        error); 409 EVENT_LEASE_LOST when the lease is no longer this engine's."""
        body = _report_body(status, lease_token, result, error, progress)
        return self.request("PUT", f"/events/{event_id}/status", body)

    def report_batch(self, reports: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Several reports in one request (`PUT /v1/events/status`), each a dict with
        `report`'s arguments: `id`, `status`, `lease_token` (required here), and
        `result`, `error` or `progress`. Answers one entry per report, in order:
        `{"id", "ok": True, "event"}` or `{"id", "ok": False, "error": {"code",
        "message"}}`; a refused report (EVENT_LEASE_LOST, EVENT_NOT_FOUND) changed nothing
        and the others were applied. A malformed batch raises EngineApiError (400)."""
        body = [
            {
                "id": report["id"],
                **_report_body(
                    report["status"],
                    report.get("lease_token"),
                    report.get("result"),
                    report.get("error"),
                    report.get("progress"),
                ),
            }
            for report in reports
        ]
        return self.request("PUT", "/events/status", body)

    def deregister(self) -> dict[str, Any]:
        """Remove this engine; the events it still holds go back to the queue."""
        data = self.request("DELETE", f"/engine-instances/{self._engine_id()}")
        self.engine_id = None
        return data

    # --- transport -------------------------------------------------------------------

    def _engine_id(self) -> str:
        if not self.engine_id:
            raise ValueError("this client has no engine id: register first")
        return self.engine_id

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> Any:
        """One call: the envelope's `data`, or EngineApiError / EngineUnavailable."""
        url = self.base_url + path
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http(s) URL: {url}")
        payload = None if body is None else json.dumps(body, allow_nan=False).encode()
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(  # noqa: S310 (the scheme is checked above)
            url, data=payload, headers=headers, method=method
        )
        wait_s = timeout or self.timeout
        try:
            with urllib.request.urlopen(request, timeout=wait_s) as response:  # noqa: S310
                return self._unwrap(response.status, response.read(), response.headers)
        except urllib.error.HTTPError as error:
            with error:
                return self._unwrap(error.code, error.read(), error.headers)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise EngineUnavailable(f"{method} {url}: {reason}") from error
        except OSError as error:  # e.g. a connection reset while reading the body
            raise EngineUnavailable(f"{method} {url}: {error}") from error

    def _unwrap(self, status: int, raw: bytes, headers: Any) -> Any:
        self.last_status = status
        try:
            envelope = json.loads(raw) if raw else None
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict) or "status" not in envelope:
            if status in (502, 503, 504):  # a proxy in front of a server that is down
                raise EngineUnavailable(f"HTTP {status} without an envelope")
            raise EngineApiError(
                status, "BAD_RESPONSE", f"HTTP {status}, not an envelope: {raw[:200]!r}"
            )
        if envelope["status"] == "success" and status < 400:
            return envelope.get("data")
        error = envelope.get("error") or {}
        retry_after = headers.get("Retry-After") if headers is not None else None
        try:
            retry_after_s = float(retry_after) if retry_after else None
        except ValueError:
            retry_after_s = None
        raise EngineApiError(
            status,
            str(error.get("code") or "UNKNOWN_ERROR"),
            str(error.get("message") or ""),
            details=error.get("details"),
            retry_after_s=retry_after_s,
        )
