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


def run_child(command: list[str], log_path: Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> dict:
    """Run `command` as a child process, its stdout and stderr into `log_path` (stderr lines starting with
    "[bench" also to ours), and measure it: wall seconds, its own CPU seconds and exact peak RSS (`os.wait4`'s
    rusage is the child's alone), the anonymous / file-backed split of the peak (polled every 0.2 s,
    approximate), and the 1-minute load average before and after (the machine may be shared)."""
    import os
    import subprocess
    import threading

    peaks = {"RssAnon": 0, "RssFile": 0}
    load_before = os.getloadavg()[0]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True,
                                errors="replace")
        done = threading.Event()

        def tee() -> None:
            for line in proc.stderr:
                log_file.write(line)
                log_file.flush()
                if line.startswith("[bench"):
                    sys.stderr.write(line)

        def poll() -> None:
            while not done.wait(0.2):
                status = proc_status(proc.pid)
                for key in peaks:
                    peaks[key] = max(peaks[key], status.get(key, 0))

        workers = [threading.Thread(target=poll, daemon=True), threading.Thread(target=tee, daemon=True)]
        for worker in workers:
            worker.start()
        _, wait_status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        for worker in workers:
            worker.join()
    return {
        "returncode": os.waitstatus_to_exitcode(wait_status),
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),          # Linux: KiB
        "polled_peak_rss_anon_mib": mib(peaks["RssAnon"]),
        "polled_peak_rss_file_mib": mib(peaks["RssFile"]),
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
