"""What the benchmark scripts share: progress lines on stderr and a process's resident-memory fields.

Imported by the scripts as `from measure import ...` (they run as `python benchmarks/bench_X.py`, which puts this
folder first on sys.path); it imports nothing heavy, so a parent process that only orchestrates stays small.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """RSS fields of /proc/PID/status in KiB (empty when the process is gone or not on Linux)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    fields[key] = int(value.split()[0])
    except OSError:
        pass
    return fields


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def emit(report: dict, out: str | Path | None) -> None:
    """The benchmark's JSON on stdout, and in `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n", encoding="utf-8")


def release(workdir: Path, keep: bool) -> None:
    """Remove a benchmark's scratch folder, or say where it was kept (--keep)."""
    if keep:
        log(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
