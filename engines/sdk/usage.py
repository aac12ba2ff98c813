"""What this engine process uses (resident memory, CPU, threads), sent with each
heartbeat as the engine's `resource_utilization`."""

from __future__ import annotations

import os
import threading
from typing import Any


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
