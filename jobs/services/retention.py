"""Cleanup and retention: old jobs pruned in batches, Prometheus figures tallied."""

from __future__ import annotations

import functools
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count
from django.utils import timezone

from engines import services as engines
from jobs import broker, selectors
from jobs.models import (
    FINISHED_STATUSES,
    Job,
    MetricCursor,
    MetricTally,
    StageRun,
)
from jobs.services.lifecycle import jobs_files_delete
from omniva import services as core_services
from omniva.errors import ErrorCode, OmnivaError

# A century: older than that is before any job, and further back the cutoff overflows.
CLEANUP_MAX_AGE_S = 100 * 365 * 86400


def _cleanup_cutoff(max_age_s: int, statuses: list[str] | None) -> tuple[datetime, list[str]]:
    if not 0 <= max_age_s <= CLEANUP_MAX_AGE_S:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            f"max_age_s is between 0 and {CLEANUP_MAX_AGE_S}.",
            details={"max_age_s": [f"between 0 and {CLEANUP_MAX_AGE_S}"]},
        )
    wanted = list(statuses or FINISHED_STATUSES)
    unknown = sorted(set(wanted) - set(FINISHED_STATUSES))
    if unknown:
        raise OmnivaError(
            ErrorCode.VALIDATION_ERROR,
            f"Only finished jobs are cleaned up; not {', '.join(unknown)}.",
            details={"statuses": [f"not a finished status: {s}" for s in unknown]},
        )
    return timezone.now() - timedelta(seconds=max_age_s), wanted


def jobs_cleanup(*, max_age_s: int = 86400, statuses: list[str] | None = None) -> int:
    """Delete finished jobs (top-level, with their children) that ended over max_age_s
    ago, in batches (jobs_prune); how many jobs, children included."""
    before, wanted = _cleanup_cutoff(max_age_s, statuses)
    return jobs_prune(before=before, statuses=wanted)


# Top-level jobs deleted per transaction, each with its children (a batch job has up to
# 1,000), their stage runs, logs, queue rows and, once committed, their files.
JOB_PRUNE_BATCH = 200


def jobs_prune(
    *,
    before: datetime,
    statuses: list[str] | tuple[str, ...] = FINISHED_STATUSES,
    deadline: float | None = None,
) -> int:
    """Delete the top-level jobs of `statuses` that finished before `before`, with their
    children, in batches of JOB_PRUNE_BATCH, each its own transaction, until none is
    left or the monotonic clock passes `deadline`; how many jobs, children included."""
    deleted = 0
    after: datetime | None = None
    while deadline is None or time.monotonic() < deadline:
        with transaction.atomic():
            seen, ids, after = _jobs_prune_batch(before=before, after=after, statuses=statuses)
        deleted += len(ids)
        if seen < JOB_PRUNE_BATCH or not ids:
            break
    return deleted


def _jobs_prune_batch(
    *, before: datetime, after: datetime | None, statuses: list[str] | tuple[str, ...]
) -> tuple[int, list[Any], datetime | None]:
    """(top-level jobs looked at, ids deleted, the last one's finished_at) of one batch,
    in the caller's transaction. It starts at `after`, where the last batch ended (see
    omniva.services.prune_in_batches)."""
    finished = Job.objects.filter(parent__isnull=True, status__in=statuses, finished_at__lt=before)
    if after is not None:
        finished = finished.filter(finished_at__gte=after)
    picked = list(
        finished.order_by("finished_at").values_list("pk", "finished_at")[:JOB_PRUNE_BATCH]
    )
    if not picked:
        return 0, [], after
    candidates = [pk for pk, _finished_at in picked]
    # Children before their batch: the lock order of every child transition (a retried
    # child reopens its batch). A family one of whose children someone holds, or is not
    # finished, is left for a later pass; so is a job someone holds.
    family_sizes = dict(
        Job.objects.filter(parent_id__in=candidates)
        .order_by()
        .values_list("parent_id")
        .annotate(n=Count("pk"))
    )
    children = list(
        Job.objects.select_for_update(skip_locked=True)
        .filter(parent_id__in=candidates, status__in=FINISHED_STATUSES)
        .order_by()
        .values_list("pk", "parent_id")
    )
    locked = Counter(parent for _child, parent in children)
    whole = [pk for pk in candidates if locked[pk] == family_sizes.get(pk, 0)]
    parents = set(
        Job.objects.select_for_update(skip_locked=True)
        .filter(pk__in=whole, status__in=statuses, finished_at__lt=before)
        .order_by()
        .values_list("pk", flat=True)
    )
    ids = [*parents, *(child for child, parent in children if parent in parents)]
    if not ids:
        return len(candidates), [], picked[-1][1]
    broker.drop_stage_tasks(
        stage_run_ids=list(
            StageRun.objects.filter(job_id__in=ids).order_by().values_list("pk", flat=True)
        )
    )
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM jobs_joblog WHERE job_id = ANY(%s)", [ids])
        cursor.execute("DELETE FROM jobs_stagerun WHERE job_id = ANY(%s)", [ids])
        cursor.execute("DELETE FROM jobs_job WHERE id = ANY(%s)", [ids])
    transaction.on_commit(functools.partial(jobs_files_delete, ids))
    return len(candidates), ids, picked[-1][1]


# The django-q2 schedule (made by jobs/migrations/0003_retention_schedule.py) that runs a
# retention pass in the default cluster every RETENTION_EVERY_MIN minutes.
RETENTION_SCHEDULE = "omniva:retention"


RETENTION_TASK = "jobs.tasks.retention_run"


RETENTION_EVERY_MIN = 10


def metric_tallies_advance(*, now: datetime | None = None) -> bool:
    """Fold the Prometheus figures of the rows finished (or created) up to
    METRIC_SETTLE_S ago into MetricTally and move its cursor there, so that a scrape
    reads only the rows since. False when another process is at it, or a reader holds
    the tallies (the next scrape folds them)."""
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_try_advisory_xact_lock(hashtext(%s))", [selectors.METRIC_TALLY_LOCK]
            )
            if not cursor.fetchone()[0]:
                return False
        held = MetricCursor.objects.first()
        until = (now or timezone.now()) - timedelta(seconds=selectors.METRIC_SETTLE_S)
        if held is not None and until <= held.through:
            return True
        window = selectors.metric_window(after=held.through if held else None, until=until)
        tallies = {(t.kind, tuple(t.labels)): t for t in MetricTally.objects.all()}
        for key, figure in window.items():
            tally = tallies.get(key) or MetricTally(kind=key[0], labels=list(key[1]))
            folded = {key: selectors.tally_figure(tally)}
            selectors.add_figures(folded, {key: figure})
            tally.count = folded[key]["count"]
            tally.total_s = folded[key]["sum"]
            tally.buckets = folded[key]["buckets"]
            tally.save()
        if held is None:
            MetricCursor.objects.create(through=until)
        else:
            held.through = until
            held.save(update_fields=["through"])
    return True


def retention_run(
    *,
    job_max_age_s: int | None = None,
    statuses: list[str] | None = None,
    budget_s: float | None = None,
) -> dict[str, int]:
    """One retention pass: take the events past their deadline out of the queue (their
    jobs time out) and dead-letter those whose last lease ran out, then delete,
    in batches, what is past its retention: activity rows, audit records, finished
    events, and finished jobs (OMNIVA_JOB_RETENTION_DAYS, or `job_max_age_s`). A pass
    that runs out of `budget_s` leaves the rest to the next one. How many of each."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    if job_max_age_s is None:
        job_max_age_s = settings.OMNIVA_JOB_RETENTION_DAYS * 86400
    before, wanted = _cleanup_cutoff(job_max_age_s, statuses)
    days = timedelta(days=1)
    # Past their deadline first: those jobs time out rather than fail (as at a claim).
    report = {"timed_out": engines.events_expire_overdue()}
    report["dead_lettered"] = engines.events_dead_letter_exhausted()
    report["activity"] = core_services.activity_prune(
        older_than=days * settings.OMNIVA_ACTIVITY_RETENTION_DAYS, deadline=deadline
    )
    report["audit_records"] = core_services.audit_records_prune(
        older_than=days * settings.OMNIVA_AUDIT_RETENTION_DAYS, deadline=deadline
    )
    report["events"] = engines.events_prune(
        older_than=days * settings.OMNIVA_EVENT_RETENTION_DAYS, deadline=deadline
    )
    report["jobs"] = jobs_prune(before=before, statuses=wanted, deadline=deadline)
    return report
