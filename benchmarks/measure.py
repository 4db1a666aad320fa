"""What the benchmark scripts share: progress lines on stderr and a process's resident-memory fields.

Imported by the scripts as `from measure import ...` (they run as `python benchmarks/bench_X.py`, which puts this
folder first on sys.path); it imports nothing heavy, so a parent process that only orchestrates stays small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
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


def runtime_parser(doc: str, export_help: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark that runs one export in a runtime, one setting per child process: the export
    directory, --runs, --out, and the hidden --child SETTING SCRATCH its children are started with."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("export", type=Path, help=export_help)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser


def release(workdir: Path, keep: bool) -> None:
    """Remove a benchmark's scratch folder, or say where it was kept (--keep)."""
    if keep:
        log(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class TreePoller:
    """Samples RssAnon / RssFile of a process and all its descendants every `interval` seconds (from a thread).

    Linux keeps an exact high-water mark only of the total resident set (VmHWM, ru_maxrss), not of its anonymous
    part, so the split is sampled. Faulting in memory runs at a few GB/s at most, so a 10 ms interval misses at
    most a few tens of MiB of a short spike; the exact totals (`ru_maxrss` of the reaped child and each process's
    last VmHWM) are reported beside the samples as a check.
    """

    def __init__(self, pid: int, interval: float = 0.01):
        self.root, self.interval = pid, interval
        self.processes: dict[int, dict] = {}
        self.peak_anon = self.peak_file = self.peak_total = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            pending, seen = [self.root], []
            while pending:
                pid = pending.pop()
                seen.append(pid)
                pending += _children(pid)
            anon = file = 0
            for pid in seen:
                status = proc_status(pid)
                if not status:
                    continue
                entry = self.processes.get(pid)
                if entry is None:
                    entry = self.processes[pid] = {"command": _cmdline(pid), "anon": 0, "file": 0, "hwm": 0}
                entry["anon"] = max(entry["anon"], status.get("RssAnon", 0))
                entry["file"] = max(entry["file"], status.get("RssFile", 0))
                entry["hwm"] = max(entry["hwm"], status.get("VmHWM", 0))
                anon += status.get("RssAnon", 0)
                file += status.get("RssFile", 0)
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_file = max(self.peak_file, file)
            self.peak_total = max(self.peak_total, anon + file)

    def summary(self) -> dict:
        """MiB: the tree's peak anonymous and file-backed sums (sampled apart) and each process's own peaks."""
        return {"peak_rss_anon_mib": mib(self.peak_anon), "peak_rss_file_mib": mib(self.peak_file),
                "peak_rss_sampled_mib": mib(self.peak_total),
                "processes": [{"command": p["command"][:200], "peak_rss_anon_mib": mib(p["anon"]),
                               "peak_rss_file_mib": mib(p["file"]), "vm_hwm_mib": mib(p["hwm"])}
                              for p in self.processes.values()]}


def run_child(command: list[str], log_path: Path, env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> dict:
    """Run `command` as a child process, its stdout and stderr into `log_path` (stderr lines starting with
    "[bench" also to ours), and measure it: wall seconds, its own CPU seconds and exact peak RSS (`os.wait4`'s
    rusage is the child's alone), the anonymous / file-backed split of the peak (sampled every 0.2 s over the
    child and its descendants by `TreePoller`, approximate), and the 1-minute load average before and after (the
    machine may be shared)."""
    import subprocess

    load_before = os.getloadavg()[0]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True,
                                errors="replace")

        def tee() -> None:
            for line in proc.stderr:
                log_file.write(line)
                log_file.flush()
                if line.startswith("[bench"):
                    sys.stderr.write(line)

        teeing = threading.Thread(target=tee, daemon=True)
        teeing.start()
        with TreePoller(proc.pid, interval=0.2) as poller:
            _, wait_status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        teeing.join()
    return {
        "returncode": os.waitstatus_to_exitcode(wait_status),
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),          # Linux: KiB
        "polled_peak_rss_anon_mib": mib(poller.peak_anon),
        "polled_peak_rss_file_mib": mib(poller.peak_file),
        "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
