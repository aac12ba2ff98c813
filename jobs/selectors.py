"""Reads of the job engine: job lists, queue statistics, job metrics, estimates."""

from __future__ import annotations

import statistics
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import django_filters
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.models import Avg, Max, Prefetch, QuerySet
from django.utils import timezone

from jobs.models import (
    ACTIVE_STATUSES,
    GpuWorkerReport,
    Job,
    JobStatus,
    MetricCursor,
    MetricTally,
    QueueTask,
    StageRun,
)
from jobs.pipelines import registry as pipelines
from jobs.pipelines.lib.inference import REPORT_STALE_S
from omniva.api.filters import ValidatedFilterSet
from omniva.models import Project
from omniva.rows import ModelRows
from omniva.selectors import counts_bounded

# Histogram buckets (seconds) of job and stage durations in /metrics.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class JobFilter(ValidatedFilterSet):
    """GET /v1/jobs's filters (jobs.api.serializers.JobFilterSerializer validates them)."""

    status = django_filters.MultipleChoiceFilter(choices=JobStatus.choices)
    pipeline = django_filters.CharFilter()
    project = django_filters.UUIDFilter(field_name="project_id")
    parent = django_filters.UUIDFilter(field_name="parent_id")
    priority_min = django_filters.NumberFilter(field_name="priority", lookup_expr="gte")
    created_after = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = django_filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")


def job_list(*, project: Project | None = None, filters: dict[str, Any] | None = None) -> QuerySet:
    jobs = Job.objects.select_related("project").order_by("-created_at", "-id")
    if project is not None:
        jobs = jobs.filter(project=project)
    return JobFilter.apply(jobs, filters or {})


# A job's stages in their pipeline's order. (StageRun's own ordering starts with `job`,
# which orders by the job's ordering: a join that one job's stages do not need.)
STAGES_IN_ORDER = Prefetch("stages", queryset=StageRun.objects.order_by("position", "id"))


def job_for_caller(
    *, job_id: Any, project: Project | None, with_stages: bool = False
) -> Job | None:
    """The job (of `project`, when the caller is bound to one), or None. With
    `with_stages`, its stages are read too, into `job.stage_list` in pipeline order:
    the API's most frequent read, so it is one fixed statement, a join (compiling the
    ORM's two queries was half of its CPU, and each statement is a round trip)."""
    try:
        job_id = uuid.UUID(str(job_id))
    except (ValueError, TypeError, AttributeError):
        return None
    if with_stages:
        sql, params = _JOB_WITH_STAGES_SQL, [job_id]
        if project is not None:
            sql, params = _JOB_OF_PROJECT_WITH_STAGES_SQL, [job_id, project.pk]
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall()
        if not rows:
            return None
        (job,) = _JOB_ROWS.load(rows[:1])
        # A job has at least one stage; the LEFT JOIN keeps it readable if not.
        width = _JOB_ROWS.width
        job.stage_list = _STAGE_ROWS.load([r for r in rows if r[width] is not None], start=width)
        return job
    jobs = Job.objects.select_related("project")
    if project is not None:
        jobs = jobs.filter(project=project)
    # Unordered: first() would order by the model's ordering, for one row.
    found = list(jobs.filter(pk=job_id).order_by()[:1])
    return found[0] if found else None


_JOB_ROWS = ModelRows(Job)
_STAGE_ROWS = ModelRows(StageRun)
# The job and its stages in one statement: the job's columns, then a stage's, on each
# row (one row per stage).
_JOB_WITH_STAGES_SQL = (
    f"SELECT {_JOB_ROWS.columns_of('j')}, {_STAGE_ROWS.columns_of('s')} "  # noqa: S608
    f"FROM {_JOB_ROWS.table} j LEFT JOIN {_STAGE_ROWS.table} s ON s.job_id = j.id "
    "WHERE j.id = %s{project} ORDER BY s.position, s.id"
)
_JOB_OF_PROJECT_WITH_STAGES_SQL = _JOB_WITH_STAGES_SQL.format(project=" AND j.project_id = %s")
_JOB_WITH_STAGES_SQL = _JOB_WITH_STAGES_SQL.format(project="")


def batch_progress(job: Job) -> float:
    """A batch's progress: its children's together, counting running ones where they are."""
    average = job.children.aggregate(p=Avg("progress"))["p"]
    return round(float(average or 0.0), 2)


def queue_stats() -> dict[str, dict[str, Any]]:
    """Depth, ready and leased counts, and lag (age of the oldest ready task) per queue."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT queue, count(*), count(*) FILTER (WHERE visible_at <= now), "
            "EXTRACT(EPOCH FROM now - min(visible_at) FILTER (WHERE visible_at <= now)) "
            "FROM jobs_queuetask, (SELECT statement_timestamp() AS now) AS clock "
            "GROUP BY queue, now"
        )
        rows = {queue: (depth, ready, lag) for queue, depth, ready, lag in cursor.fetchall()}
    queues = list(dict.fromkeys([*settings.OMNIVA_QUEUES, *rows]))
    stats: dict[str, dict[str, Any]] = {}
    for queue in queues:
        depth, ready, lag = rows.get(queue, (0, 0, None))
        stats[queue] = {
            "depth": depth,
            "ready": ready,
            "leased": depth - ready,
            "lag_ms": round(float(lag) * 1000) if lag is not None else 0,
            "limit": settings.OMNIVA_QUEUE_LIMIT,
        }
    return stats


# /v1/metrics's average job time is that of this many latest completed jobs.
AVERAGE_OVER_JOBS = 1000

# The latest completed jobs, newest first along the finished_at index.
_AVERAGE_SQL = """
SELECT avg(finished_at - started_at) FROM (
    SELECT started_at, finished_at FROM jobs_job
    WHERE finished_at IS NOT NULL AND status = 'completed' AND started_at IS NOT NULL
    ORDER BY finished_at DESC LIMIT %s
) latest
"""


def job_counts() -> dict[str, Any]:
    """Jobs by status (bounded counts over the status index), the average run time of the
    latest completed ones, and when a job was last submitted or ended: the live feed
    reads these every 5 s, so none of them reads every job."""
    by_status = counts_bounded("jobs_job", {s: ("status = %s", [s]) for s in JobStatus.values})
    total = sum(by_status.values())
    completed = by_status.get(JobStatus.COMPLETED, 0)
    ended_badly = sum(
        by_status.get(s, 0) for s in (JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED)
    )
    with connection.cursor() as cursor:
        cursor.execute(_AVERAGE_SQL, [AVERAGE_OVER_JOBS])
        average = cursor.fetchone()[0]
    # Both maxima are one step down an index each (updated_at has none: an index there
    # would cost every progress update its HOT update).
    newest = Job.objects.aggregate(created=Max("created_at"), finished=Max("finished_at"))
    last = max((at for at in newest.values() if at is not None), default=None)
    return {
        "total": total,
        "pending": by_status.get(JobStatus.PENDING, 0),
        "running": by_status.get(JobStatus.RUNNING, 0),
        "retrying": by_status.get(JobStatus.RETRYING, 0),
        "completed": completed,
        "failed": by_status.get(JobStatus.FAILED, 0),
        "cancelled": by_status.get(JobStatus.CANCELLED, 0),
        "timed_out": by_status.get(JobStatus.TIMED_OUT, 0),
        "average_job_time_ms": round(average.total_seconds() * 1000, 1) if average else None,
        "success_rate": round(completed / (completed + ended_badly), 4)
        if completed + ended_badly
        else None,
        "last_activity": _iso(last),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


# A pipeline's recent median run time changes slowly; every unfinished job's read asks
# for it, so a process keeps it for a few seconds.
MEDIAN_RUN_KEPT_S = 5.0
_median_runs: dict[str, tuple[float, float | None]] = {}


def recent_median_run_ms(pipeline: str, *, sample: int = 50) -> float | None:
    now = time.monotonic()
    kept = _median_runs.get(pipeline)
    if kept is not None and kept[0] > now:
        return kept[1]
    median = _median_run_ms(pipeline, sample=sample)
    _median_runs[pipeline] = (now + MEDIAN_RUN_KEPT_S, median)
    return median


def _median_run_ms(pipeline: str, *, sample: int) -> float | None:
    durations = [
        (finished - started).total_seconds() * 1000
        for started, finished in Job.objects.filter(
            pipeline=pipeline, status=JobStatus.COMPLETED, started_at__isnull=False
        )
        .order_by("-finished_at")
        .values_list("started_at", "finished_at")[:sample]
        if started is not None and finished is not None
    ]
    return statistics.median(durations) if durations else None


# Counting a deep backlog for every read of a pending job would add to the load it
# estimates: a process counts each (queues, priority) at most once a second.
WORK_AHEAD_KEPT_S = 1.0
_work_ahead_counts: dict[tuple[frozenset[str], int], tuple[float, int]] = {}


def _work_ahead(queues: frozenset[str], priority: int) -> int:
    now = time.monotonic()
    kept = _work_ahead_counts.get((queues, priority))
    if kept is not None and kept[0] > now:
        return kept[1]
    ahead = QueueTask.objects.filter(
        queue__in=queues, priority__gte=priority, visible_at__lte=timezone.now()
    ).count()
    _work_ahead_counts[(queues, priority)] = (now + WORK_AHEAD_KEPT_S, ahead)
    return ahead


def estimated_completion_ms(job: Job) -> int | None:
    """Seed 004's estimate: the pipeline's recent median run time, plus, for a job not yet
    started, the queued work of at least its priority spread over the queue's workers."""
    if job.status not in ACTIVE_STATUSES:
        return None
    median = recent_median_run_ms(job.pipeline)
    if median is None:
        return None
    if job.started_at is not None:
        elapsed = (timezone.now() - job.started_at).total_seconds() * 1000
        return max(0, round(median - elapsed))
    stages = getattr(job, "stage_list", None)  # read with the job (job_for_caller)
    if stages is None:
        stages = job.stages.all()
    queues = {run.queue for run in stages if run.queue} or {"default"}
    ahead = _work_ahead(frozenset(queues), job.priority)
    workers = settings.OMNIVA_GPU_WORKERS if queues == {"gpu"} else settings.OMNIVA_WORKERS
    return round(median * (1 + ahead / max(1, workers)))


# Rows finished (or created) this recently are read at each scrape and not tallied yet:
# a transition's timestamp is taken before it commits, and a tally must miss no row.
METRIC_SETTLE_S = 60
# The advisory lock between folding rows into MetricTally (exclusive) and reading the
# tallies with the rows after their cursor (shared): a read sees both or neither.
METRIC_TALLY_LOCK = "omniva.metric_tallies"

Figure = dict[str, Any]  # {"count", "sum", "buckets"}
FigureKey = tuple[str, tuple[str, ...]]  # (kind, labels)


def _window(column: str, after: datetime | None, until: datetime | None) -> tuple[str, list]:
    """`column` in (after, until], as SQL conditions (each bound only when given, so the
    column's index drives the scan) and their parameters."""
    conditions, params = [], []
    if after is not None:
        conditions.append(f"{column} > %s")
        params.append(after)
    if until is not None:
        conditions.append(f"{column} <= %s")
        params.append(until)
    return "".join(f" AND {condition}" for condition in conditions), params


def metric_window(*, after: datetime | None, until: datetime | None) -> dict[FigureKey, Figure]:
    """The Prometheus figures of the jobs and stage runs finished (for `submitted`:
    created) in (after, until]: counts, and duration sums with cumulative buckets."""
    buckets = ", ".join(f"count(*) FILTER (WHERE d <= {bound})" for bound in DURATION_BUCKETS)
    figures: dict[FigureKey, Figure] = {}

    def add(kind: str, labels: tuple, count: int, total: float = 0.0, counts: Any = ()) -> None:
        figures[(kind, tuple(labels))] = {
            "count": count,
            "sum": float(total or 0),
            "buckets": list(counts),
        }

    created, created_params = _window("created_at", after, until)
    finished, finished_params = _window("finished_at", after, until)
    stage_finished, stage_params = _window("s.finished_at", after, until)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT pipeline, count(*) FROM jobs_job WHERE TRUE{created} GROUP BY pipeline",  # noqa: S608
            created_params,
        )
        for pipeline, count in cursor.fetchall():
            add("submitted", (pipeline,), count)
        cursor.execute(
            "SELECT pipeline, status, count(*) FROM jobs_job "  # noqa: S608 (constants only)
            f"WHERE finished_at IS NOT NULL{finished} GROUP BY pipeline, status",
            finished_params,
        )
        for pipeline, status, count in cursor.fetchall():
            add("finished", (pipeline, status), count)
        cursor.execute(
            f"SELECT pipeline, count(*), sum(d), {buckets} FROM ("  # noqa: S608 (constants only)
            "  SELECT pipeline, EXTRACT(EPOCH FROM finished_at - started_at) AS d"
            "  FROM jobs_job WHERE status = 'completed' AND started_at IS NOT NULL"
            f"  {finished}) t GROUP BY pipeline",
            finished_params,
        )
        for pipeline, count, total, *counts in cursor.fetchall():
            add("job_duration", (pipeline,), count, total, counts)
        cursor.execute(
            f"SELECT pipeline, name, queue, count(*), sum(d), {buckets} FROM ("  # noqa: S608
            "  SELECT j.pipeline, s.name, COALESCE(NULLIF(s.queue, ''), s.engine_type) AS queue,"
            "  EXTRACT(EPOCH FROM s.finished_at - s.started_at) AS d"
            "  FROM jobs_stagerun s JOIN jobs_job j ON j.id = s.job_id"
            f"  WHERE s.status = 'completed' AND s.started_at IS NOT NULL{stage_finished}"
            ") t GROUP BY pipeline, name, queue",
            stage_params,
        )
        for pipeline, name, queue, count, total, *counts in cursor.fetchall():
            add("stage_duration", (pipeline, name, queue), count, total, counts)
    return figures


def add_figures(into: dict[FigureKey, Figure], more: dict[FigureKey, Figure]) -> None:
    for key, figure in more.items():
        held = into.setdefault(key, {"count": 0, "sum": 0.0, "buckets": []})
        held["count"] += figure["count"]
        held["sum"] += figure["sum"]
        if figure["buckets"]:
            known = held["buckets"] or [0] * len(figure["buckets"])
            held["buckets"] = [a + b for a, b in zip(known, figure["buckets"], strict=True)]


def tally_figure(tally: Any) -> Figure:
    return {"count": tally.count, "sum": tally.total_s, "buckets": tally.buckets}


def metric_figures() -> dict[FigureKey, Figure]:
    """Every Prometheus job figure: the tallies, and the rows since their cursor."""
    from django.db import transaction

    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock_shared(hashtext(%s))", [METRIC_TALLY_LOCK])
        cursor_row = MetricCursor.objects.first()
        figures: dict[FigureKey, Figure] = {}
        add_figures(
            figures,
            {
                (tally.kind, tuple(tally.labels)): tally_figure(tally)
                for tally in MetricTally.objects.all()
            },
        )
        add_figures(
            figures, metric_window(after=cursor_row.through if cursor_row else None, until=None)
        )
    return figures


def duration_histograms(figures: dict[FigureKey, Figure]) -> dict[str, list[dict[str, Any]]]:
    """Cumulative bucket counts of job and stage durations, for the Prometheus collector."""
    out: dict[str, list[dict[str, Any]]] = {"jobs": [], "stages": []}
    for (kind, labels), figure in sorted(figures.items()):
        if kind in ("job_duration", "stage_duration"):
            out["jobs" if kind == "job_duration" else "stages"].append({"labels": labels, **figure})
    return out


def job_totals_by_pipeline(figures: dict[FigureKey, Figure]) -> dict[str, Any]:
    return {
        "submitted": {
            labels[0]: figure["count"]
            for (kind, labels), figure in figures.items()
            if kind == "submitted"
        },
        "finished": {
            labels: figure["count"]
            for (kind, labels), figure in figures.items()
            if kind == "finished"
        },
    }


def contribute_info(info: dict[str, Any]) -> None:
    info["config"]["pipelines"] = [p.name for p in pipelines.all_pipelines()]
    info["config"]["task_lease_s"] = settings.OMNIVA_TASK_LEASE_S
    info["config"]["cancel_grace_s"] = settings.OMNIVA_CANCEL_GRACE_S
    info["config"]["job_timeout_s"] = settings.OMNIVA_JOB_TIMEOUT_S
    info["config"]["queue_timeout_s"] = settings.OMNIVA_QUEUE_TIMEOUT_S
    info["config"]["gpu"] = {
        "max_batch": settings.OMNIVA_GPU_MAX_BATCH,
        "max_wait_ms": settings.OMNIVA_GPU_MAX_WAIT_MS,
        "upscale_tile": settings.OMNIVA_UPSCALE_TILE,
        "image_max_pixels": settings.OMNIVA_IMAGE_MAX_PIXELS,
        "workers": _gpu_reports_or_none(),
    }


def _gpu_reports_or_none() -> list[dict[str, Any]] | None:
    """/v1/info answers with the database down too (its reports are then unknown)."""
    try:
        return gpu_reports()
    except DatabaseError:
        connection.close_if_unusable_or_obsolete()
        return None


def contribute_metrics(metrics: dict[str, Any]) -> None:
    metrics["jobs"] = job_counts()
    metrics["queues"] = queue_stats()
    last = metrics.get("last_activity")
    jobs_last = metrics["jobs"]["last_activity"]
    if jobs_last and (last is None or jobs_last > last):
        metrics["last_activity"] = jobs_last


def gpu_reports() -> list[dict[str, Any]]:
    """The status of every gpu worker that reported lately (jobs/pipelines/lib/inference.py)."""
    since = timezone.now() - timedelta(seconds=REPORT_STALE_S)
    return [
        {"worker": report.worker, "reported_at": report.reported_at, **report.data}
        for report in GpuWorkerReport.objects.filter(reported_at__gte=since).order_by("worker")
    ]


def check_gpu() -> dict[str, Any]:
    """The gpu workers' devices, memory and batches; degraded when gpu work waits and no
    gpu worker reports."""
    reports = gpu_reports()
    if reports:
        # The first worker's figures at the top level (the dashboard's panel), all below.
        return {"status": "ok", **reports[0], "workers": reports}
    waiting = queue_stats().get("gpu", {}).get("depth", 0)
    return {
        "status": "degraded" if waiting else "ok",
        "workers": [],
        "detail": "no GPU worker reporting" + (f"; {waiting} gpu tasks waiting" if waiting else ""),
    }


def check_queues() -> dict[str, Any]:
    queues = queue_stats()
    saturated = [name for name, q in queues.items() if q["depth"] >= settings.OMNIVA_QUEUE_LIMIT]
    result: dict[str, Any] = {"status": "degraded" if saturated else "ok", "queues": queues}
    if saturated:
        result["detail"] = f"backlog over the limit: {', '.join(saturated)}"
    return result


def format_duration(ms: int | None) -> str:
    """`350 ms`, `12.3 s`, `5 min 3 s`, `2 h 5 min`; `-` when there is none."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def run_time_ms(job: Job) -> int | None:
    """The run time of a finished job, or how long a started one has been running."""
    if job.run_time_ms is not None:
        return job.run_time_ms
    if job.started_at is not None and not job.is_finished:
        return round((timezone.now() - job.started_at).total_seconds() * 1000)
    return None
