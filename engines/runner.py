"""The engine process: register, heartbeat, long-poll claims, run handlers, report.

Threads: the caller's thread (`run`) waits for a stop and then drains; one heartbeat
thread; one claim thread; one thread per running event. Events are claimed only into
free slots (`concurrency` minus the events running), so every event this engine holds
is running, and a drain finishes exactly those.

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
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from engines.client import EngineApiError, EngineClient, EngineUnavailable
from engines.handlers import HandlerError, get_handler

logger = logging.getLogger("omniva.engines.runner")

LEASE_LOST = "EVENT_LEASE_LOST"
EVENT_NOT_FOUND = "EVENT_NOT_FOUND"
ENGINE_NOT_FOUND = "ENGINE_NOT_FOUND"
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


def resource_utilization() -> dict[str, Any]:
    """This process's resident memory (MB), CPU and threads, as far as they are known."""
    usage: dict[str, Any] = {"pid": os.getpid(), "threads": threading.active_count()}
    try:
        import psutil

        process = psutil.Process()
        usage["rss_mb"] = round(process.memory_info().rss / 2**20, 1)
        usage["cpu_percent"] = process.cpu_percent(interval=None)
        return usage
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        usage["rss_mb"] = round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        import resource

        # Peak, not current, resident memory (kilobytes on Linux).
        usage["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return usage


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
                for event in events:
                    thread = threading.Thread(
                        target=self._run_event,
                        args=(event,),
                        name=f"event-{event['id']}",
                        daemon=True,
                    )
                    self._running[event["id"]] = thread
                    thread.start()

    # --- events ----------------------------------------------------------------------

    def _run_event(self, event: dict[str, Any]) -> None:
        event_id = event["id"]
        event_type = event.get("event_type") or ""
        try:
            logger.info("event %s (%s): started", event_id, event_type)
            try:
                self._report_progress(event, 0.0)
            except LeaseLost as error:
                logger.warning("event %s: %s; not run", event_id, error)
                return
            handler = get_handler(event_type)
            if handler is None:
                self._finish(
                    event,
                    "failed",
                    error={
                        "code": "UNKNOWN_EVENT_TYPE",
                        "message": f"This engine has no handler for {event_type!r} events.",
                    },
                )
                return
            try:
                result = handler(event.get("data") or {}, self._progress_fn(event))
            except LeaseLost as error:
                logger.warning("event %s: %s; its work is dropped", event_id, error)
                return
            except HandlerError as error:
                self._finish(event, "failed", error={"code": error.code, "message": error.message})
                return
            except Exception as error:
                logger.exception("event %s: the handler raised", event_id)
                message = f"{type(error).__name__}: {error}"
                self._finish(event, "failed", error={"code": "HANDLER_ERROR", "message": message})
                return
            try:
                json.dumps(result, allow_nan=False)
            except (TypeError, ValueError) as error:
                message = f"The handler's result is not JSON: {error}"
                self._finish(event, "failed", error={"code": "INVALID_RESULT", "message": message})
                return
            self._finish(event, "completed", result=result)
        finally:
            with self._lock:
                self._running.pop(event_id, None)
            self._slot_freed.set()

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

    def _finish(
        self, event: dict[str, Any], status: str, *, result: Any = None, error: Any = None
    ) -> None:
        """Report the outcome, retrying while the server is unreachable (until a forced
        stop): the lease outlives a short outage, and heartbeats extend it."""
        event_id = event["id"]
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        give_up_at = time.monotonic() + REPORT_GIVE_UP_S
        while True:
            try:
                self.client.report(
                    event_id, status, event.get("lease_token"), result=result, error=error
                )
            except EngineUnavailable as failure:
                if self._force.is_set() or time.monotonic() > give_up_at:
                    logger.error("event %s: %s not reported (%s)", event_id, status, failure)
                    return
                delay = backoff.next_delay()
                logger.warning(
                    "event %s: report failed (%s); retrying in %.1f s", event_id, failure, delay
                )
                self._force.wait(delay)
                continue
            except EngineApiError as failure:
                if failure.code in (LEASE_LOST, EVENT_NOT_FOUND):
                    logger.warning(
                        "event %s: lease lost (%s); the %s result is dropped",
                        event_id,
                        failure.message,
                        status,
                    )
                    return
                if failure.transient and not self._force.is_set() and time.monotonic() < give_up_at:
                    delay = backoff.next_delay(failure.retry_after_s)
                    logger.warning(
                        "event %s: report failed (%s); retrying in %.1f s", event_id, failure, delay
                    )
                    self._force.wait(delay)
                    continue
                if failure.code in FATAL_CODES:
                    logger.error("event %s: %s not reported: %s", event_id, status, failure)
                    self._fatal()
                    return
                if status == "completed" and 400 <= failure.status < 500:
                    # The server refused the result itself (too large, not valid).
                    logger.error("event %s: result refused: %s", event_id, failure)
                    status, result = "failed", None
                    error = {"code": "RESULT_REJECTED", "message": str(failure)}
                    continue
                logger.error("event %s: %s not reported: %s", event_id, status, failure)
                return
            if status == "completed":
                logger.info("event %s: completed", event_id)
            else:
                logger.warning("event %s: failed: %s", event_id, _error_text(error))
            return


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
