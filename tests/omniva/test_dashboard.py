"""The operator dashboard: who may open it (Django's test client), and the live page in
headless chromium against a real daphne and a real qcluster worker on the test database.

The browser tests need Debian's chromium (`apt-get install chromium`); without it they
skip, unless OMNIVA_REQUIRE_BROWSER=1 (CI), where they fail.

Playwright's sync API keeps an event loop running in this thread, so Django refuses ORM
calls while a page is open: the data a browser test needs is made before the browser
starts, and what it does meanwhile goes through the API (or plain psycopg).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import Locator, Page, WebSocket, expect, sync_playwright

from omniva import services
from omniva.models import Scope
from tests.conftest import (
    HttpResult,
    ProcessGroup,
    Server,
    free_port,
    start_daphne,
    start_worker,
    wait_for,
)

# Playwright's expectations wait for their condition; on a loaded 2-core machine (the
# whole suite running, workers starting) 5 s is not always enough for a poll to come round.
expect.set_options(timeout=20_000)

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
STAFF_USERNAME = "operator"
STAFF_PASSWORD = "dashboard-pw-123456"
# Playwright's own waits (expect, wait_for_function), in ms.
UI_TIMEOUT_MS = 30_000


# --- Who may open it -------------------------------------------------------------------------


@pytest.mark.django_db
def test_an_anonymous_visitor_is_sent_to_the_admin_login(client: Any) -> None:
    response = client.get("/dashboard")

    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/dashboard"


@pytest.mark.django_db
def test_a_user_who_is_not_staff_is_refused(client: Any) -> None:
    user = get_user_model().objects.create_user("visitor", password="visitor-pw-123456")
    client.force_login(user)

    response = client.get("/dashboard")

    assert response.status_code == 403
    assert b"dashboard.js" not in response.content


@pytest.mark.django_db
def test_a_staff_user_gets_the_page_with_its_assets_and_a_csrf_cookie(client: Any) -> None:
    user = get_user_model().objects.create_user("staff", password="staff-pw-123456", is_staff=True)
    client.force_login(user)

    response = client.get("/dashboard")

    assert response.status_code == 200
    page = response.content.decode()
    for panel in ("Jobs", "Queues", "Throughput", "Workers", "Engines", "GPU", "Recent failures"):
        assert f">{panel}</h2>" in page
    assert "csrftoken" in response.cookies
    for asset in ("/static/dashboard/dashboard.js", "/static/dashboard/dashboard.css"):
        assert asset in page
        assert client.get(asset).status_code == 200


# --- The live page in a browser ---------------------------------------------------------------


@pytest.fixture
def chromium() -> str:
    """Checked first, so that a machine without chromium starts no server for nothing."""
    if CHROMIUM is None:
        reason = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("OMNIVA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason}, and OMNIVA_REQUIRE_BROWSER=1 requires the browser tests")
        pytest.skip(f"{reason}; set OMNIVA_REQUIRE_BROWSER=1 to fail instead of skipping")
    return CHROMIUM


@dataclass
class Site:
    url: str
    port: int
    secret: str
    database_url: str
    processes: ProcessGroup
    logs: Path
    daphne: Server | None = None

    def start_daphne(self) -> None:
        self.daphne = start_daphne(
            self.processes, self.database_url, self.port, self.logs / "daphne.log"
        )

    def stop_daphne(self) -> None:
        assert self.daphne is not None
        self.daphne.managed.kill()

    def post(self, path: str, body: dict[str, Any]) -> HttpResult:
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Authorization": f"Bearer {self.secret}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return HttpResult(response.status, dict(response.headers), response.read())
        except urllib.error.HTTPError as error:
            return HttpResult(error.code, dict(error.headers), error.read())

    def submit(self, pipeline: str, params: dict[str, Any], **extra: Any) -> str:
        response = self.post("/v1/jobs", {"pipeline": pipeline, "params": params, **extra})
        assert response.status == 202, response.body
        return response.json()["data"]["id"]

    def job_status(self, job_id: str) -> str | None:
        """Straight from the database: no ORM while the browser's event loop runs."""
        with psycopg.connect(self.database_url) as conn:
            row = conn.execute("SELECT status FROM jobs_job WHERE id = %s", [job_id]).fetchone()
        return row[0] if row else None

    def save_gpu_report(self, worker: str, data: dict[str, Any]) -> None:
        """What jobs.services.gpu_report_save writes, without the ORM (as job_status)."""
        with psycopg.connect(self.database_url) as conn:
            conn.execute(
                "INSERT INTO jobs_gpuworkerreport (worker, reported_at, data)"
                " VALUES (%s, now(), %s)",
                [worker, json.dumps(data)],
            )

    def output(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(self.logs.glob("*.log"))
        )


@pytest.fixture
def site(
    chromium: str, processes: ProcessGroup, test_database_url: str, tmp_path: Path
) -> Iterator[Site]:
    get_user_model().objects.create_user(STAFF_USERNAME, password=STAFF_PASSWORD, is_staff=True)
    _, secret = services.api_key_create(
        name="dashboard-test", scopes=[Scope.JOBS_READ, Scope.JOBS_WRITE, Scope.ENGINES]
    )
    port = free_port()
    site = Site(f"http://127.0.0.1:{port}", port, secret, test_database_url, processes, tmp_path)
    start_worker(processes, test_database_url, tmp_path / "qcluster.log")
    site.start_daphne()
    yield site
    print(site.output())  # shown by pytest when the test failed


@dataclass
class Browser:
    page: Page
    errors: list[str] = field(default_factory=list)
    # Each message the page's websockets received, with the socket's URL.
    frames: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def record(self, socket: WebSocket) -> None:
        socket.on(
            "framereceived", lambda payload: self.frames.append((socket.url, json.loads(payload)))
        )


@pytest.fixture
def dashboard(chromium: str, site: Site) -> Iterator[Browser]:
    """A staff user logged in through the admin's form, on the dashboard, its stream live."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            seen = Browser(page)
            page.on("pageerror", lambda error: seen.errors.append(str(error)))
            page.on("websocket", seen.record)

            page.goto(f"{site.url}/dashboard")
            expect(page).to_have_url(re.compile(r"/admin/login/\?next=/dashboard$"))
            page.get_by_label("Username").fill(STAFF_USERNAME)
            page.get_by_label("Password").fill(STAFF_PASSWORD)
            page.get_by_role("button", name="Log in").click()
            expect(page).to_have_url(f"{site.url}/dashboard")
            expect(page.locator("#connection")).to_have_text("live")

            yield seen
            assert not seen.errors, f"the page raised: {seen.errors}"
        finally:
            browser.close()


def job_row(page: Page, job_id: str) -> Locator:
    return page.locator(f'#jobs-body tr[data-job-id="{job_id}"]')


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_dashboard_shows_its_panels(dashboard: Browser, site: Site) -> None:
    page = dashboard.page
    response = site.post(
        "/v1/engine-instances", {"engine_type": "render", "name": "render-dashboard-1"}
    )
    assert response.status == 201, response.body

    for panel in ("Jobs", "Queues", "Throughput", "Workers", "Engines", "GPU", "Recent failures"):
        expect(page.get_by_role("heading", name=panel, exact=True)).to_be_visible()
    expect(page.locator("#health-status")).to_have_text(re.compile(r"^(healthy|degraded)$"))
    # Queues from /v1/metrics, the worker from /v1/health, the engine from the API.
    expect(page.locator('#queues-body tr[data-queue="default"] .depth')).to_have_text("0")
    expect(page.locator("#workers-list li[data-cluster]")).to_have_count(1)
    engine = page.locator("#engines-body tr", has_text="render-dashboard-1")
    expect(engine).to_contain_text("active")
    expect(engine.locator("time")).to_have_text(re.compile(r"ago$"))
    expect(page.locator("#gpu-body")).to_have_text("no GPU worker reporting")
    expect(page.locator("#throughput-chart svg rect.bar")).to_have_count(60)
    expect(page.locator("#throughput-total")).to_have_text("0")
    expect(page.locator("#failures-empty")).to_be_visible()
    expect(page.get_by_label("Status", exact=True)).to_be_visible()
    expect(page.get_by_label("Pipeline", exact=True)).to_contain_text("sleep")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_gpu_panel_shows_what_a_gpu_worker_reports(dashboard: Browser, site: Site) -> None:
    page = dashboard.page
    expect(page.locator("#gpu-body")).to_have_text("no GPU worker reporting")
    site.save_gpu_report(
        "gpu-box:7",
        {
            "device": "cuda:0",
            "name": "Test Accelerator 80GB",
            "half_precision": True,
            "memory_used_mb": 2048,
            "memory_total_mb": 81920,
            "utilization_pct": 37,
            "models": ["all-MiniLM-L6-v2"],
            "batches": {
                "embed": {
                    "forward_passes": 3,
                    "mean_batch": 21.5,
                    "last_batch": 32,
                    "last_batch_ms": 4.2,
                }
            },
        },
    )
    # The page polls /v1/health: the report shows without a reload.
    gpu = page.locator("#gpu-body")
    expect(gpu).to_contain_text("Test Accelerator 80GB (cuda:0, fp16)")
    expect(gpu).to_contain_text("2048 / 81920 MiB (3%)")
    expect(gpu).to_contain_text("37%")
    expect(gpu).to_contain_text("all-MiniLM-L6-v2")
    expect(gpu).to_contain_text("3 passes, mean 21.5, last 32 in 4.2 ms")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_submitted_job_appears_and_progresses_to_completed_without_a_reload(
    dashboard: Browser, site: Site
) -> None:
    page = dashboard.page
    # Every value a progress bar takes, and a mark that a reload would wipe.
    page.evaluate(
        """() => {
            window.progressSeen = [];
            new MutationObserver((changes) => {
                for (const change of changes) {
                    window.progressSeen.push(Number(change.target.getAttribute("aria-valuenow")));
                }
            }).observe(document.getElementById("jobs-body"), {
                subtree: true, attributes: true, attributeFilter: ["aria-valuenow"],
            });
        }"""
    )

    job_id = site.submit("sleep", {"seconds": 4})

    row = job_row(page, job_id)
    expect(row.locator(".pipeline")).to_have_text("sleep")
    expect(row.locator(".status")).to_have_text("running")
    expect(row.locator(".status")).to_have_text("completed")
    expect(row.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    seen = page.evaluate("window.progressSeen")
    assert any(0 < value < 100 for value in seen), f"no progress between 0 and 100: {seen}"
    expect(page.locator("#throughput-total")).to_have_text("1")
    expect(page.locator("#throughput-chart rect.bar[data-count='1']")).to_have_count(1)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_cancel_button_cancels_a_running_job(dashboard: Browser, site: Site) -> None:
    page = dashboard.page
    job_id = site.submit("sleep", {"seconds": 60})
    row = job_row(page, job_id)
    expect(row.locator(".status")).to_have_text("running")

    row.locator(".pipeline").click()  # opens the detail pane, streaming /ws/jobs/{id}
    detail = page.locator("#detail")
    expect(detail).to_be_visible()
    stage = detail.locator('#stages-body tr[data-stage="sleep"]')
    expect(stage).to_contain_text("running")
    page.wait_for_function(
        "Number(document.querySelector('#stages-body tr[data-stage=sleep] [role=progressbar]')"
        ".getAttribute('aria-valuenow')) > 0"
    )

    row.get_by_role("button", name=f"Cancel job {job_id[:8]}").click()

    expect(row.locator(".status")).to_have_text("cancelled")
    expect(detail.locator("#detail-status")).to_have_text("cancelled")
    expect(stage).to_contain_text("cancelled")
    expect(detail.locator("#logs")).to_contain_text("cancel requested")
    expect(detail.locator("#logs")).to_contain_text("job cancelled")
    expect(page.get_by_role("button", name="Retry job", exact=True)).to_be_enabled()
    expect(page.get_by_role("button", name="Cancel job", exact=True)).to_be_disabled()
    expect(page.locator("#notice")).to_contain_text(f"Cancel requested for job {job_id[:8]}")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_failed_job_is_listed_with_its_error_and_the_retry_button_reruns_it(
    dashboard: Browser, site: Site
) -> None:
    page = dashboard.page
    job_id = site.submit("fail_n_times", {"n": 1}, max_retries=0)

    failure = page.locator(f'#failures-list li[data-job-id="{job_id}"]')
    expect(failure.locator(".error-code")).to_have_text("TRANSIENT_FAILURE")
    expect(failure.locator(".error-message")).to_contain_text("fails on purpose")
    page.get_by_label("Status", exact=True).select_option("failed")
    row = job_row(page, job_id)
    expect(row.locator(".status")).to_have_text("failed")

    page.get_by_label("Status", exact=True).select_option("")
    row.get_by_role("button", name=f"Retry job {job_id[:8]}").click()

    expect(row.locator(".status")).to_have_text("completed")
    expect(failure).to_have_count(0)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_the_page_reconnects_after_the_server_restarts_and_resumes_from_its_cursor(
    dashboard: Browser, site: Site
) -> None:
    page = dashboard.page
    job_id = site.submit("sleep", {"seconds": 3})
    row = job_row(page, job_id)
    expect(row.locator(".status")).to_have_text("running")

    site.stop_daphne()
    expect(page.locator("#connection")).to_have_text(re.compile(r"^(reconnecting|connecting)"))
    # The job completes while no server streams it: the page learns of it on resuming.
    wait_for(lambda: site.job_status(job_id) == "completed", timeout=30, what="the job to end")
    site.start_daphne()

    expect(page.locator("#connection")).to_have_text("live")
    expect(row.locator(".status")).to_have_text("completed")
    resumed = [message for url, message in dashboard.frames if "/ws/events?after=" in url]
    assert resumed, "the page did not reconnect with ?after=<cursor>"
    assert all(message["type"] != "snapshot" for message in resumed)
    assert any(
        message["type"] == "job:update"
        and message["job_id"] == job_id
        and message["data"]["status"] == "completed"
        for message in resumed
    ), "the completion was not among the rows replayed after the cursor"
