"""The engine process: register, heartbeat, long-poll claims, run handlers, report.

Threads: the caller's thread (`run`) waits for a stop and then drains; one heartbeat
thread; one claim thread; one thread per claimed batch, which confirms the batch's
leases in one request (`processing` at 0 %), runs each event in a thread of its own, and
reports all their outcomes in one request (`PUT /v1/events/status`) once the last has
ended. Events are claimed only into free slots (`concurrency` minus the events held),
and a batch's events hold their slots until the batch is reported, so every event this
engine holds is running or being reported, and a drain finishes exactly those.

Stopping (`request_stop`, wired to SIGTERM and SIGINT): the first request stops
claiming and waits for the running events to be reported; a second one stops at
once. Either way the engine then deregisters, which puts any event it still holds
back in the queue. A claim that returns while stopping is left to that: its events
are never started. Connection failures and 429/5xx answers are retried with backoff,
so a server restart only pauses the engine.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from engines.sdk.client import EngineApiError, EngineClient, EngineUnavailable
from engines.sdk.handlers import HandlerError, get_handler
from engines.sdk.usage import resource_utilization
from omniva.errors import FailureCode

logger = logging.getLogger("omniva.engines.runner")

LEASE_LOST = "EVENT_LEASE_LOST"
EVENT_NOT_FOUND = "EVENT_NOT_FOUND"
ENGINE_NOT_FOUND = "ENGINE_NOT_FOUND"
# A batch's answer for one report that the server failed on: worth sending again.
SERVER_FAILED_CODES = {"INTERNAL_ERROR", "SERVICE_UNAVAILABLE"}
# Answers that refuse a batch's body itself (a malformed item, too large).
BODY_REFUSED_STATUSES = {400, 413}
# Answers that no retry will change: the key is wrong, revoked or lacks the scope.
FATAL_CODES = {"UNAUTHENTICATED", "PERMISSION_DENIED"}
PROGRESS_MIN_INTERVAL_S = 0.5
# A final report is retried this long; by then the lease has long been given up.
REPORT_GIVE_UP_S = 600.0
DEREGISTER_TRIES = 5


class LeaseLost(Exception):
    """The server no longer lets this engine report on the event; its work is dropped."""


class FatalEngineError(Exception):
    """The engine cannot go on (registration refused, key rejected)."""


@dataclass
class RunnerConfig:
    url: str
    api_key: str
    engine_type: str
    name: str | None = None
    batch_size: int = 3
    concurrency: int = 1
    heartbeat_s: float = 10.0
    wait_s: float = 20.0
    capabilities: tuple[str, ...] = ()
    request_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 10.0


@dataclass
class Backoff:
    initial_s: float
    max_s: float
    _next: float = field(default=0.0, init=False)

    def next_delay(self, at_least: float | None = None) -> float:
        self._next = min(self.max_s, self._next * 2 if self._next else self.initial_s)
        return max(self._next, at_least or 0.0)

    def reset(self) -> None:
        self._next = 0.0


class EngineRunner:
    def __init__(self, config: RunnerConfig, client: EngineClient | None = None) -> None:
        if config.concurrency < 1 or config.batch_size < 1:
            raise ValueError("concurrency and batch_size must be 1 or more")
        self.config = config
        self.client = client or EngineClient(
            config.url, config.api_key, timeout=config.request_timeout_s
        )
        self.name = config.name
        self.exit_code = 0
        self._stop = threading.Event()  # stop claiming, drain
        self._force = threading.Event()  # stop at once
        self._done = threading.Event()  # deregistered: the heartbeat ends
        self._slot_freed = threading.Event()
        self._lock = threading.Lock()
        self._register_lock = threading.Lock()
        self._running: dict[int, threading.Thread] = {}
        self._signals = 0

    # --- control ---------------------------------------------------------------------

    @property
    def running_count(self) -> int:
        with self._lock:
            return len(self._running)

    def request_stop(self, *, force: bool = False) -> None:
        """Stop claiming and drain; a second request (or force) stops at once. Only sets
        events, so it is safe in a signal handler."""
        if force or self._stop.is_set():
            self._force.set()
        self._stop.set()
        self._slot_freed.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT: the first drains, the second stops at once (main thread)."""

        def handle(signum: int, frame: Any) -> None:
            self._signals += 1
            if self._signals == 1:
                logger.info(
                    "%s: stopping after the running events (signal again to stop at once)",
                    signal.Signals(signum).name,
                )
            else:
                logger.warning("%s again: stopping at once", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    # --- the process -----------------------------------------------------------------

    def run(self) -> int:
        """Register, work until asked to stop, drain, deregister. The exit code."""
        try:
            self._register()
        except FatalEngineError as error:
            logger.error("%s", error)
            return 1
        if self.client.engine_id is None:  # stopped while the server was unreachable
            return self.exit_code
        threads = [
            threading.Thread(target=self._heartbeat_loop, name="engine-heartbeat", daemon=True),
            threading.Thread(target=self._claim_loop, name="engine-claim", daemon=True),
        ]
        for thread in threads:
            thread.start()
        while not self._stop.wait(0.5):
            pass
        self._drain()
        self._deregister()
        self._done.set()
        return self.exit_code

    def _drain(self) -> None:
        running = self.running_count
        if running and not self._force.is_set():
            logger.info("draining: waiting for %d running event(s)", running)
            self._heartbeat(quiet=True)
        while self.running_count and not self._force.wait(0.1):
            pass
        left = self.running_count
        if left:
            logger.warning("stopped at once: %d event(s) go back to the queue", left)

    def _register(self) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        limits = {"max_concurrent_events": self.config.concurrency}
        # An attempt whose answer was lost may have registered the name on the server:
        # then a 409 is our own orphan, which goes offline (and is replaced) soon.
        lost_attempt = False
        while not self._stop.is_set():
            try:
                engine = self.client.register(
                    self.config.engine_type,
                    name=self.name,
                    capabilities=self.config.capabilities,
                    resource_limits=limits,
                )
            except EngineUnavailable as error:
                lost_attempt = True
                delay = backoff.next_delay()
                logger.warning("cannot register yet (%s); retrying in %.1f s", error, delay)
            except EngineApiError as error:
                orphan = lost_attempt and error.code == "ENGINE_ALREADY_REGISTERED"
                if not (error.transient or orphan):
                    raise FatalEngineError(f"registration refused: {error}") from error
                delay = backoff.next_delay(error.retry_after_s)
                logger.warning("cannot register yet (%s); retrying in %.1f s", error, delay)
            else:
                # Kept, so that a registration lost with the server's data comes back
                # under the same name.
                self.name = engine["name"]
                logger.info(
                    "registered %s engine %s (id %s)",
                    self.config.engine_type,
                    engine["name"],
                    engine["id"],
                )
                return
            self._stop.wait(delay)

    def _reregister(self, stale_id: str | None) -> None:
        """The server no longer knows this engine (its row was removed): register again."""
        with self._register_lock:
            if self._stop.is_set() or self.client.engine_id != stale_id:
                return
            logger.warning("the server lost engine %s; registering again", stale_id)
            self.client.engine_id = None
            try:
                self._register()
            except FatalEngineError as error:
                logger.error("%s", error)
                self._fatal()

    def _fatal(self) -> None:
        self.exit_code = 1
        self.request_stop()

    def _deregister(self) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s / 2)
        for attempt in range(1, DEREGISTER_TRIES + 1):
            engine_id = self.client.engine_id
            if engine_id is None:
                return
            try:
                released = self.client.deregister().get("released_events", 0)
            except EngineUnavailable as error:
                if attempt == DEREGISTER_TRIES or self._force.is_set():
                    logger.error("could not deregister (%s); the server marks it offline", error)
                    return
                self._force.wait(backoff.next_delay())
                continue
            except EngineApiError as error:
                if error.transient and attempt < DEREGISTER_TRIES and not self._force.is_set():
                    self._force.wait(backoff.next_delay(error.retry_after_s))
                    continue
                if error.code != ENGINE_NOT_FOUND:
                    logger.error("could not deregister: %s", error)
                return
            logger.info(
                "deregistered engine %s (%d event(s) back to the queue)", self.name, released
            )
            return

    # --- heartbeat -------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._done.wait(self.config.heartbeat_s):
            self._heartbeat()

    def _heartbeat(self, *, quiet: bool = False) -> None:
        engine_id = self.client.engine_id
        if engine_id is None:
            return
        running = self.running_count
        status = "draining" if self._stop.is_set() else "processing" if running else "idle"
        try:
            self.client.heartbeat(
                status=status,
                current_workload=running,
                resource_utilization=resource_utilization(),
            )
        except EngineUnavailable as error:
            if not quiet:
                logger.warning("heartbeat failed: %s", error)
        except EngineApiError as error:
            if error.code == ENGINE_NOT_FOUND:
                self._reregister(engine_id)
            elif error.code in FATAL_CODES:
                logger.error("heartbeat refused: %s", error)
                self._fatal()
            elif not quiet:
                logger.warning("heartbeat failed: %s", error)

    # --- claims ----------------------------------------------------------------------

    def _claim_loop(self) -> None:
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        while not self._stop.is_set():
            free = self.config.concurrency - self.running_count
            if free <= 0:
                self._slot_freed.wait(1.0)
                self._slot_freed.clear()
                continue
            engine_id = self.client.engine_id
            if engine_id is None:  # registering again: never claim without an engine id
                self._stop.wait(0.2)
                continue
            try:
                events = self.client.claim(
                    batch_size=min(self.config.batch_size, free), wait_s=self.config.wait_s
                )
            except EngineUnavailable as error:
                delay = backoff.next_delay()
                logger.warning("claim failed (%s); retrying in %.1f s", error, delay)
                self._stop.wait(delay)
                continue
            except EngineApiError as error:
                if error.code == ENGINE_NOT_FOUND:
                    self._reregister(engine_id)
                    continue
                if error.code in FATAL_CODES:
                    logger.error("claim refused: %s", error)
                    self._fatal()
                    return
                delay = backoff.next_delay(error.retry_after_s)
                logger.warning("claim failed (%s); retrying in %.1f s", error, delay)
                self._stop.wait(delay)
                continue
            backoff.reset()
            with self._lock:
                if self._stop.is_set():
                    if events:
                        logger.info(
                            "stopping: %d event(s) claimed just now are left to the queue",
                            len(events),
                        )
                    return
                if not events:
                    continue
                thread = threading.Thread(
                    target=self._run_batch,
                    args=(events,),
                    name=f"batch-{events[0]['id']}",
                    daemon=True,
                )
                for event in events:
                    self._running[event["id"]] = thread
                thread.start()

    # --- events ----------------------------------------------------------------------

    def _run_batch(self, events: list[dict[str, Any]]) -> None:
        """One claimed batch: confirm its leases, run its events side by side, report
        their outcomes in one request; only then do its events free their slots."""
        try:
            started = self._start_batch(events)
            outcomes: dict[int, dict[str, Any] | None] = {}
            threads = [
                threading.Thread(
                    target=self._run_event,
                    args=(event, outcomes),
                    name=f"event-{event['id']}",
                    daemon=True,
                )
                for event in started
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            reports = [
                report for event in started if (report := outcomes.get(event["id"])) is not None
            ]
            if reports:
                self._report_batch(reports)
        finally:
            with self._lock:
                for event in events:
                    self._running.pop(event["id"], None)
            self._slot_freed.set()

    def _start_batch(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A `processing` report at 0 % for each event, in one request: the server checks
        and extends each lease. The events it refuses (lease lost: the job was cancelled
        meanwhile) are not run; if the request fails, every event runs (its final report
        is fenced anyway)."""
        for event in events:
            logger.info("event %s (%s): started", event["id"], event.get("event_type") or "")
        reports = [
            {
                "id": event["id"],
                "status": "processing",
                "lease_token": event.get("lease_token"),
                "progress": 0.0,
            }
            for event in events
        ]
        try:
            answers = self.client.report_batch(reports)
        except EngineUnavailable as error:
            logger.debug("batch of %d: start not reported (%s)", len(events), error)
            return events
        except EngineApiError as error:
            logger.warning("batch of %d: start not reported (%s)", len(events), error)
            return events
        lost: dict[Any, str] = {}
        for answer in answers if isinstance(answers, list) else []:
            refusal = answer.get("error") or {}
            if not answer.get("ok") and refusal.get("code") in (LEASE_LOST, EVENT_NOT_FOUND):
                lost[answer.get("id")] = str(refusal.get("message") or refusal.get("code"))
        for event_id, message in lost.items():
            logger.warning("event %s: %s; not run", event_id, message)
        return [event for event in events if event["id"] not in lost]

    def _run_event(self, event: dict[str, Any], outcomes: dict[int, dict[str, Any] | None]) -> None:
        outcomes[event["id"]] = self._outcome(event)

    def _outcome(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """Run the event's handler: the report to send, or None when the lease was lost."""
        event_id = event["id"]
        event_type = event.get("event_type") or ""
        handler = get_handler(event_type)
        if handler is None:
            return _report(
                event,
                "failed",
                error={
                    "code": FailureCode.UNKNOWN_EVENT_TYPE,
                    "message": f"This engine has no handler for {event_type!r} events.",
                },
            )
        try:
            result = handler(event.get("data") or {}, self._progress_fn(event))
        except LeaseLost as error:
            logger.warning("event %s: %s; its work is dropped", event_id, error)
            return None
        except HandlerError as error:
            return _report(event, "failed", error={"code": error.code, "message": error.message})
        except Exception as error:
            logger.exception("event %s: the handler raised", event_id)
            message = f"{type(error).__name__}: {error}"
            return _report(
                event, "failed", error={"code": FailureCode.HANDLER_ERROR, "message": message}
            )
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as error:
            message = f"The handler's result is not JSON: {error}"
            return _report(
                event, "failed", error={"code": FailureCode.INVALID_RESULT, "message": message}
            )
        return _report(event, "completed", result=result)

    def _progress_fn(self, event: dict[str, Any]) -> Any:
        last = [0.0]

        def report_progress(percent: float) -> None:
            now = time.monotonic()
            if now - last[0] < PROGRESS_MIN_INTERVAL_S:
                return
            last[0] = now
            self._report_progress(event, percent)

        return report_progress

    def _report_progress(self, event: dict[str, Any], percent: float) -> None:
        """A `processing` report (it extends the lease); raises LeaseLost when refused."""
        try:
            self.client.report(
                event["id"], "processing", event.get("lease_token"), progress=percent
            )
        except EngineUnavailable as error:
            logger.debug("event %s: progress not reported (%s)", event["id"], error)
        except EngineApiError as error:
            if error.code in (LEASE_LOST, EVENT_NOT_FOUND):
                raise LeaseLost(error.message) from error
            logger.warning("event %s: progress not reported (%s)", event["id"], error)

    def _report_batch(self, reports: list[dict[str, Any]]) -> None:
        """A batch's outcomes in one request. Retried while the server is unreachable or
        answers 429/5xx (until a forced stop or REPORT_GIVE_UP_S): the leases outlive a
        short outage, and heartbeats extend them; so are the reports the server failed
        on. A body refused as a whole (400, 413) is split in halves down to the report
        it refuses; a completed report refused alone is sent as failed (RESULT_REJECTED)."""
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        give_up_at = time.monotonic() + REPORT_GIVE_UP_S
        pending = [reports]
        while pending:
            chunk = pending.pop()
            try:
                answers = self.client.report_batch(chunk)
            except EngineUnavailable as failure:
                reason, delay = str(failure), backoff.next_delay()
            except EngineApiError as failure:
                if failure.code in FATAL_CODES:
                    logger.error("%d report(s) not sent: %s", len(chunk), failure)
                    self._fatal()
                    return
                if not failure.transient:
                    pending.extend(self._refused(chunk, failure))
                    continue
                reason, delay = str(failure), backoff.next_delay(failure.retry_after_s)
            else:
                if not isinstance(answers, list) or len(answers) != len(chunk):
                    logger.error("%d report(s): the answer is not one per report", len(chunk))
                    continue
                chunk = [r for r, a in zip(chunk, answers, strict=True) if not _answered(r, a)]
                if not chunk:
                    continue
                reason, delay = "the server failed on them", backoff.next_delay()
            if self._force.is_set() or time.monotonic() > give_up_at:
                for report in chunk:
                    logger.error(
                        "event %s: %s not reported (%s)", report["id"], report["status"], reason
                    )
                continue
            logger.warning(
                "%d report(s) not sent (%s); retrying in %.1f s", len(chunk), reason, delay
            )
            self._force.wait(delay)
            pending.append(chunk)

    def _refused(
        self, chunk: list[dict[str, Any]], failure: EngineApiError
    ) -> list[list[dict[str, Any]]]:
        """What to send instead of a batch the server refused as a whole: its halves, or a
        completed report as failed; nothing when no change would help."""
        if failure.status in BODY_REFUSED_STATUSES:
            if len(chunk) > 1:
                half = len(chunk) // 2
                return [chunk[half:], chunk[:half]]  # the first half goes first (a stack)
            [report] = chunk
            if report["status"] == "completed":
                # The server refused the result itself (too large, not valid).
                logger.error("event %s: result refused: %s", report["id"], failure)
                error = {"code": FailureCode.RESULT_REJECTED, "message": str(failure)}
                return [[{**report, "status": "failed", "result": None, "error": error}]]
        for report in chunk:
            logger.error("event %s: %s not reported: %s", report["id"], report["status"], failure)
        return []


def _report(
    event: dict[str, Any], status: str, *, result: Any = None, error: Any = None
) -> dict[str, Any]:
    return {
        "id": event["id"],
        "status": status,
        "lease_token": event.get("lease_token"),
        "result": result,
        "error": error,
    }


def _answered(report: dict[str, Any], answer: dict[str, Any]) -> bool:
    """Log the server's answer to one report of a batch; False when the server failed on
    it (worth sending again)."""
    event_id, status = report["id"], report["status"]
    if answer.get("ok"):
        if status == "completed":
            logger.info("event %s: completed", event_id)
        else:
            logger.warning("event %s: failed: %s", event_id, _error_text(report.get("error")))
        return True
    error = answer.get("error") or {}
    code = error.get("code")
    if code in (LEASE_LOST, EVENT_NOT_FOUND):
        message = error.get("message")
        logger.warning(
            "event %s: lease lost (%s); the %s result is dropped", event_id, message, status
        )
        return True
    if code in SERVER_FAILED_CODES:
        return False
    logger.error("event %s: %s not reported: %s", event_id, status, _error_text(error))
    return True


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return f"{error.get('code')}: {error.get('message')}"
    return str(error)


def run_engine(config: RunnerConfig, *, handle_signals: bool = True) -> int:
    """Build a runner, wire SIGTERM/SIGINT (from the main thread) and run it."""
    runner = EngineRunner(config)
    if handle_signals:
        runner.install_signal_handlers()
    return runner.run()
