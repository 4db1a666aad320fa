"""Memory and latency probes for the validation worker (one fresh process per variant).

Peak memory is the kernel's own high-water mark of this process's resident set (`VmHWM` in /proc/self/status),
not a sampled reading, so a short spike is never missed. Unlike `getrusage().ru_maxrss` it belongs to the
process's current address space, so the parent's memory at fork does not leak into it; and writing "5" to
/proc/self/clear_refs resets it, which splits the peak of loading from the peak of generating. Where /proc is not
there (macOS), `ru_maxrss` is the fallback and the generate peak is the peak so far.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss() -> int:
    """Bytes: the high-water mark of resident memory since the process started or since `reset_peak_rss`."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024   # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current resident size; False where the platform cannot."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def available_memory() -> int | None:
    """Bytes a new process may still use: the kernel's MemAvailable, or less when this process is in a memory
    cgroup with a limit (v1 or v2) whose headroom is smaller (its page cache counted as free, as MemAvailable
    counts it). None where neither can be read (macOS)."""
    values = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                values.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    values += [v for v in (_cgroup_headroom(),) if v is not None]
    return min(values) if values else None


def _cgroup_headroom() -> int | None:
    try:
        groups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in groups:
        _, controllers, group = line.split(":", 2)
        if controllers == "":                                    # v2: one unified hierarchy
            root, limit, usage, stat = Path("/sys/fs/cgroup") / group.lstrip("/"), "memory.max", "memory.current", \
                "memory.stat"
            cache_key = "file"
        elif "memory" in controllers.split(","):
            root, limit, usage, stat = Path("/sys/fs/cgroup/memory") / group.lstrip("/"), "memory.limit_in_bytes", \
                "memory.usage_in_bytes", "memory.stat"
            cache_key = "cache"
        else:
            continue
        try:
            cap = (root / limit).read_text().strip()
            if cap == "max" or int(cap) >= 1 << 60:
                continue
            used = int((root / usage).read_text())
            cache = next((int(v) for k, v in (l.split() for l in (root / stat).read_text().splitlines())
                          if k == cache_key), 0)
            return max(int(cap) - used + cache, 0)
        except (OSError, ValueError):
            continue
    return None


def reset_peak_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def measure(run: Callable[[], float], *, warmup: int, runs: int) -> dict[str, float | int]:
    """Call `run` (which returns the seconds of the work it timed) `warmup` times unrecorded, then `runs` times;
    the median with the spread."""
    for _ in range(warmup):
        run()
    seconds = [run() for _ in range(runs)]
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "runs": runs}


class Stopwatch:
    """Wall time of a block, synchronizing the accelerator first and last so queued kernels are counted."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start
