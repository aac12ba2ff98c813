"""The `gpu` suite of `manage.py bench`: the embedding stage per item against batched
across jobs, beside the raw model forward pass, and the upscale's megapixels per
second, on the device `OMNIVA_DEVICE` selects (printed).

It runs in this process, on the platform's database, as a gpu worker would: `embed_texts`
jobs of one text each are submitted, then delivered one at a time through the broker's
claim (`jobs.testing.claim_delivery` / `run_delivery`). With OMNIVA_GPU_MAX_BATCH=1 each
job is its own forward pass (per item); with B, the worker gathers up to B ready jobs
into one forward pass (batched across jobs). Both include every transition of every
job (claim, start, completion). The raw figure is `models.embed` on B texts: the ceiling.
The jobs are deleted afterwards. Targets, on CUDA: batched at least 70% of raw and at
least 5x per item.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.test.utils import override_settings

from jobs import services, testing
from jobs.models import Job
from jobs.pipelines.lib.inference import models
from omniva.bench.harness import BenchError, table_lines

BATCH_SIZES = (1, 8, 32, 128)
TARGET_OF_RAW = 0.70
TARGET_OVER_PER_ITEM = 5.0
WORDS = [
    "the",
    "model",
    "reads",
    "a",
    "sentence",
    "about",
    "cats",
    "dogs",
    "rivers",
    "markets",
    "music",
    "light",
    "weather",
    "engines",
    "pipelines",
    "images",
    "colours",
    "cities",
    "trains",
    "gardens",
    "code",
    "data",
    "clouds",
    "tea",
]


def sentence(n: int) -> str:
    length = 8 + n % 17
    return " ".join(WORDS[(n * 7 + i * 3) % len(WORDS)] for i in range(length)) + f" {n}."


@dataclass
class GpuBench:
    jobs_per_size: int
    say: Callable[[str], None]
    device: str = ""
    per_item: float = 0.0
    rows: list[tuple[int, float, float]] = field(default_factory=list)
    upscale_rows: list[tuple[str, float]] = field(default_factory=list)

    def run(self) -> None:
        self.device = f"{models.device} ({models.status()['name']})"
        models.embedder()  # loading is not measured
        self.say(f"device {self.device}; warming up")
        models.embed([sentence(i) for i in range(8)], batch_size=8)
        self.per_item = self._through_jobs(max_batch=1, jobs=self.jobs_per_size)
        for size in BATCH_SIZES:
            self.say(f"batch {size}: {self.jobs_per_size} jobs, then the raw forward pass")
            batched = self._through_jobs(max_batch=size, jobs=max(self.jobs_per_size, size * 2))
            self.rows.append((size, batched, self._raw(size)))
        self._upscale()

    def _through_jobs(self, *, max_batch: int, jobs: int) -> float:
        ids = [
            services.job_submit(pipeline="embed_texts", params={"texts": [sentence(i)]})[0].pk
            for i in range(jobs)
        ]
        started = time.perf_counter()
        with override_settings(OMNIVA_GPU_MAX_BATCH=max_batch, OMNIVA_GPU_MAX_WAIT_MS=0):
            while (claimed := testing.claim_delivery("gpu")) is not None:
                testing.run_delivery(*claimed)
        elapsed = time.perf_counter() - started
        completed = Job.objects.filter(pk__in=ids, status="completed").count()
        for job_id in ids:
            services.job_delete(job_id=job_id)
        if completed != jobs:
            raise BenchError(f"{jobs - completed} of {jobs} embed jobs did not complete")
        return jobs / elapsed

    @staticmethod
    def _raw(size: int, *, rounds: int = 3) -> float:
        texts = [sentence(i) for i in range(size)]
        best = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            models.embed(texts, batch_size=size)
            best = max(best, size / (time.perf_counter() - started))
        return best

    def _upscale(self) -> None:
        from PIL import Image

        from jobs.pipelines.lib.imaging import upscale  # torch: only this suite loads it

        image = Image.effect_mandelbrot((768, 512), (-2.0, -1.0, 1.0, 1.0), 64).convert("RGB")
        for scale in (2, 4):
            started = time.perf_counter()
            out = upscale(image, scale=scale, device=models.device, half=models.half)
            elapsed = time.perf_counter() - started
            self.upscale_rows.append(
                (
                    f"768x512 x{scale} -> {out.width}x{out.height}",
                    out.width * out.height / 1e6 / elapsed,
                )
            )

    def report(self) -> list[str]:
        lines = ["", f"bench gpu on {self.device}: embed_texts jobs of one text each"]
        rows = []
        for size, batched, raw in self.rows:
            rows.append(
                [
                    str(size),
                    f"{self.per_item:.0f}",
                    f"{batched:.0f}",
                    f"{raw:.0f}",
                    f"{batched / raw:.2f}",
                    f"{batched / self.per_item:.1f}x",
                ]
            )
        lines += table_lines(
            ["batch", "per item/s", "batched/s", "raw/s", "batched/raw", "batched/per item"], rows
        )
        best = max(self.rows, key=lambda row: row[1])
        lines.append(
            f"targets on CUDA: batched/raw >= {TARGET_OF_RAW:.2f} and batched/per item >= "
            f"{TARGET_OVER_PER_ITEM:.0f}x; best batch {best[0]}: {best[1] / best[2]:.2f} and "
            f"{best[1] / self.per_item:.1f}x"
        )
        lines.append("")
        lines += table_lines(
            ["upscale (bicubic + unsharp mask)", "output Mpx/s"],
            [[name, f"{rate:.1f}"] for name, rate in self.upscale_rows],
        )
        return lines
