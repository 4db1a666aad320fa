"""`mcq build` on a tiny model, twice: the first build and a second run with nothing changed, side by side.

    python benchmarks/bench_build.py [--model tiny:4.5] [--plan PLAN.yaml] [--out results.json] [--keep]

JSON goes to stdout (and to --out), progress to stderr.

Each run is the real command (`mcq build --model M --out DIR --json`) in a child process, timed whole (imports,
calibration, every variant, validation, report) with the child's peak RSS (wait4's ru_maxrss; the validation
workers are grandchildren and not in it). The calibration cache (`MCQ_CACHE`) starts empty in a temp dir, so the
first run pays for the tiny model's generation and the calibration too, as on a fresh machine. Reported: both wall
times, their ratio, and per variant its build time, status, and KL from the first run's results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import emit, log, mib, release  # noqa: E402


def run_build(model: str, out: Path, plan: str | None, env: dict[str, str]) -> dict:
    command = ["mcq", "build", "--model", model, "--out", str(out), "--json"] + (["--plan", plan] if plan else [])
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):      # 1: a variant failed or missed a gate; the run itself still counts
        raise SystemExit(f"mcq build exited {code}")
    return {"seconds": round(seconds, 1), "exit_code": code, "peak_rss_mib": mib(usage.ru_maxrss),
            "result": json.loads(stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:4.5")
    parser.add_argument("--plan", help="default: the built-in plan (every format)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the build folder and cache (printed on stderr)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="mcq-bench-build-"))
    env = {**os.environ, "MCQ_CACHE": str(root / "cache"), "TQDM_DISABLE": "1"}
    try:
        log(f"first build of {args.model} into {root / 'build'}")
        first = run_build(args.model, root / "build", args.plan, env)
        log(f"first build: {first['seconds']} s; second run with nothing changed")
        second = run_build(args.model, root / "build", args.plan, env)
        results = json.loads((root / "build" / "results.json").read_text())
        kl = {row["name"]: row["metrics"]["kl_mean"] for row in results["variants"][1:]}
        report = {
            "benchmark": "mcq-build",
            "model": args.model,
            "plan": first["result"]["plan"],
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "first_run_s": first["seconds"],
            "second_run_s": second["seconds"],
            "second_over_first": round(second["seconds"] / first["seconds"], 4),
            "first_peak_rss_mib": first["peak_rss_mib"],
            "second_peak_rss_mib": second["peak_rss_mib"],
            "failed": first["result"]["failed"],
            "second_run_statuses": sorted({(v["status"], v["validation"]) for v in second["result"]["variants"]}),
            "variants": [{"name": v["name"], "format": v["format"], "status": v["status"], "build_s": v["seconds"],
                          "validation": v["validation"], "kl_mean": kl.get(v["name"]),
                          "gates": [g["expression"] + (" missed" if g["passed"] is False else " ok")
                                    for g in v["gates"]], "error": v["error"]}
                         for v in first["result"]["variants"]],
        }
    finally:
        release(root, args.keep)
    emit(report, args.out)


if __name__ == "__main__":
    main()
