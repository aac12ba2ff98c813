"""What a worker of the gpu cluster does beside running stages: it gathers the ready
attempts of a batchable stage across jobs into one forward pass (`gather_batch`), and
warms its models up and reports its device every few seconds (`start_reporter`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from jobs import broker, services
from jobs.broker import channel_for
from jobs.pipelines.lib.inference import GPU_QUEUE, REPORT_INTERVAL_S, models
from jobs.services import StageClaim
from omniva.notifications import Listener

logger = logging.getLogger("omniva.jobs.inference")


# --- micro-batches ----------------------------------------------------------------------


class _Overflow(Exception):
    """The attempts started in a gathering round hold more items than the batch has room
    for, from the claimed task at `cut` (in claim order) on."""

    def __init__(self, cut: int) -> None:
        super().__init__()
        self.cut = cut


def gather_batch(
    first: StageClaim,
    *,
    items: Callable[[StageClaim], int],
    worker: str,
    max_items: int,
    max_wait_s: float,
) -> list[StageClaim]:
    """More granted attempts of `first`'s stage, for one forward pass with it.

    Claims ready queue tasks of the same pipeline stage and starts each (a task whose
    stage must not run is acknowledged and skipped), while the batch, `first` included,
    holds at most `max_items` items (`items(claim)` counts one claim's) and until
    `max_wait_s` passed; woken by the queue's NOTIFY while it waits. The attempts join in
    the queue's order: the first one that does not fit, and those after it, go back to
    the queue, ready at once, and the batch is closed.
    """
    key = f"{first.pipeline}.{first.stage}"
    claims: list[StageClaim] = []
    total = items(first)
    closed = False

    def start(ack_ids: dict[int, str | None]) -> list[StageClaim]:
        # The common starts in one statement; the rest under stage_start's full rules.
        started = services.stages_start_granted(ack_ids=ack_ids, worker=worker)
        rest = dict(ack_ids)
        for claim in started:
            del rest[claim.stage_run_id]
        for stage_run_id, ack_id in rest.items():
            one = services.stage_start(stage_run_id=stage_run_id, worker=worker, ack_id=ack_id)
            if one is not None:
                started.append(one)
            elif ack_id:
                broker.acknowledge_delivery(ack_id=ack_id)
        return started

    def claim_more() -> int:
        nonlocal total, closed
        if closed or total >= max_items:
            return total
        # A task's size is known only once it is started; how many to claim is guessed
        # from the sizes seen so far, and the batch's bound is kept below whatever.
        per_task = max(1, total // (1 + len(claims)))
        # One transaction for the claim and every start: one commit for the round, and
        # should a start fail, the claimed rows are back in the queue with it.
        with transaction.atomic():
            claimed = broker.claim_stage_tasks(
                queue=GPU_QUEUE, stages=[key], limit=max(1, (max_items - total) // per_task)
            )
            order = {stage_run_id: n for n, (_ack_id, stage_run_id) in enumerate(claimed)}
            cut = len(claimed)
            while True:
                try:
                    # A savepoint: when the started ones do not fit, their starts (and
                    # the acknowledgements of those that must not run) are undone, the
                    # tasks from the first that does not fit on go back to the queue,
                    # and those before it are started again.
                    with transaction.atomic():
                        started = start(
                            {stage_run_id: ack_id for ack_id, stage_run_id in claimed[:cut]}
                        )
                        started.sort(key=lambda claim: order[claim.stage_run_id])
                        room = max_items - total
                        for claim in started:
                            room -= items(claim)
                            if room < 0:
                                raise _Overflow(order[claim.stage_run_id])
                    break
                except _Overflow as overflow:
                    for ack_id, _stage_run_id in claimed[overflow.cut : cut]:
                        broker.defer_delivery(ack_id=ack_id, until=timezone.now())
                    cut = overflow.cut
                    closed = True
            if cut < len(claimed):
                with connection.cursor() as cursor:  # ready again: wake an idle worker
                    cursor.execute("SELECT pg_notify(%s, '')", [channel_for(GPU_QUEUE)])
        claims.extend(started)
        total += sum(items(claim) for claim in started)
        return total

    if max_wait_s <= 0:
        claim_more()
        return claims
    listener.wait_until(
        "",
        read=claim_more,
        done=lambda count: closed or count >= max_items,
        timeout_s=max_wait_s,
    )
    return claims


# Woken by enqueues on the gpu queue while a batch gathers.
listener = Listener(channel_for(GPU_QUEUE))


# --- status reports ---------------------------------------------------------------------


def report_status(worker: str) -> None:
    services.gpu_report_save(worker=worker, data=models.status())


def start_reporter(worker: str) -> threading.Thread:
    """In a gpu worker process: warm the models up, then report every REPORT_INTERVAL_S."""

    def run() -> None:
        try:
            models.embedder()
        except Exception:
            logger.exception("the embedding model did not load")
        while True:
            try:
                report_status(worker)
            except DatabaseError as exc:
                logger.warning("gpu status report failed: %s", type(exc).__name__)
                connection.close()
            except Exception:
                logger.exception("gpu status report failed")
            time.sleep(REPORT_INTERVAL_S)

    thread = threading.Thread(target=run, name="gpu-status", daemon=True)
    thread.start()
    return thread
