"""Startup cost of the light `mcq` commands: `--help`, an argument error, `mcq recipes list`.

    python benchmarks/bench_startup.py [--before REV] [--runs 7] [--out results.json]

Each run is a fresh `python` process running `mcq.cli` as the `mcq` script does (interpreter start included, which
is what a user waits for), timed from the parent. At its end the child reads its own /proc/self/status: the peak
RSS (VmHWM) and the anonymous and file-backed resident memory, and lists which heavy modules it imported.
`python -c pass` is measured beside them: the floor no command can go under.

`--before REV` measures the mcq source of that git revision too (extracted with `git archive`), interleaved run by
run with the working tree, so both see the same machine load; the ratios are before / after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import emit, log, mib

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"--help": ["--help"], "bad argument": ["export", "--format", "bogus"],
            "recipes list": ["recipes", "list"]}
HEAVY = ("torch", "transformers", "llmcompressor", "compressed_tensors", "numpy", "PIL", "onnx", "onnxruntime")

# Runs in the child: the command, then what it cost (written to the file named by argv[1]).
CHILD = """
import json, runpy, sys
report, args = sys.argv[1], sys.argv[2:]
sys.argv = ["mcq", *args]
code = 0
try:
    runpy.run_module("mcq.cli", run_name="__main__")
except SystemExit as exit:
    code = exit.code or 0
sys.path.insert(0, {benchmarks!r})
from measure import proc_status
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r}))
with open(report, "w") as stream:
    json.dump({{"exit": code, "status": proc_status(), "heavy": heavy}}, stream)
"""


def run_once(tree: Path | None, args: list[str] | None, report: Path) -> dict:
    """One child: wall seconds, exit code, memory (None for the `python -c pass` floor)."""
    env = {**os.environ, "PYTHONPATH": str(tree) if tree else ""}
    code = "pass" if args is None else CHILD.format(benchmarks=str(Path(__file__).parent), heavy=HEAVY)
    command = [sys.executable, "-c", code] + ([] if args is None else [str(report), *args])
    started = time.perf_counter()
    # Run from the tree: `python -c` puts the working directory first on sys.path, before PYTHONPATH.
    subprocess.run(command, env=env, cwd=tree or report.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    seconds = time.perf_counter() - started
    if args is None:
        return {"seconds": seconds}
    import json

    measured = json.loads(report.read_text())
    return {"seconds": seconds, **measured}


def summarize(runs: list[dict]) -> dict:
    times = [r["seconds"] for r in runs]
    summary = {"wall_s_median": round(statistics.median(times), 3), "wall_s_min": round(min(times), 3),
               "wall_s_max": round(max(times), 3), "runs": len(runs)}
    if "status" in runs[0]:
        last = runs[-1]
        summary.update(exit_code=last["exit"], heavy_modules=last["heavy"],
                       peak_rss_mib=max(mib(r["status"].get("VmHWM")) for r in runs),
                       rss_anon_mib=mib(last["status"].get("RssAnon")), rss_file_mib=mib(last["status"].get("RssFile")))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="REV", help="also measure this git revision's mcq (e.g. main)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mcq-startup-") as tmp:
        trees = {"after": REPO}
        if args.before:
            before = Path(tmp) / "before"
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.before, "mcq"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
            trees = {"before": before, "after": REPO}
        report = Path(tmp) / "report.json"
        load_start = os.getloadavg()
        samples: dict[str, dict[str, list[dict]]] = {label: {name: [] for name in COMMANDS} for label in trees}
        floor = []
        for run in range(args.runs):
            log(f"run {run + 1}/{args.runs}")
            floor.append(run_once(None, None, report))
            for name, command in COMMANDS.items():
                for label, tree in trees.items():     # interleaved: both trees see the same load
                    samples[label][name].append(run_once(tree, command, report))
        load_end = os.getloadavg()

    result = {
        "benchmark": "startup", "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "load_average_1_5_15": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "before_revision": args.before,
        "python_c_pass": summarize(floor),
        "commands": {label: {name: summarize(runs) for name, runs in by_name.items()}
                     for label, by_name in samples.items()},
    }
    if args.before:
        result["before_over_after"] = {
            name: {"wall_s_median": round(result["commands"]["before"][name]["wall_s_median"]
                                          / result["commands"]["after"][name]["wall_s_median"], 2),
                   "peak_rss": round(result["commands"]["before"][name]["peak_rss_mib"]
                                     / result["commands"]["after"][name]["peak_rss_mib"], 2)}
            for name in COMMANDS}
    emit(result, args.out)


if __name__ == "__main__":
    main()
