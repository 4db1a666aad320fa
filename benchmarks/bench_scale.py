"""Peak memory of every mcq stage at two depths of a real-width MiniCPM-V 4.5: does it grow with the layers?

    python benchmarks/bench_scale.py [--version 4.5] [--layers 2 6] [--vision-layers 2] [--stages ...] [--num-samples 4]
                                     [--eval-samples 2] [--cap 20G] [--workdir DIR] [--keep] [--out results.json]

JSON goes to stdout (and to --out), progress to stderr.

The model, for each value of --layers: `mcq make-tiny --real-widths --real-vocab --llm-layers N --vision-layers M`
(the true 4.5 widths: LLM 4096 / 12288, 32 + 8 heads of 128; vision 1152 / 4304; the official 151,748-row
embedding table and lm_head, 2 x 1.2 GB in bf16; random weights). Each stage is the real command (`python -m
mcq.cli ...`) in a child process; every process it starts (validation workers) is measured with it.

What is measured: RssAnon and RssFile of the child and all its descendants, sampled every 10 ms (Linux keeps an
exact high-water mark of the total only; see measure.TreePoller), their peaks (the sum over the processes alive at
the same moment) and each process's own; the exact kernel high-water mark of the child (`ru_maxrss` from wait4,
anonymous + file-backed together); wall and CPU seconds; the 1-minute load before and after. Anonymous memory is
what a stage holds; file-backed pages are the mapped safetensors shards and output files, which the kernel
reclaims under pressure (under a memory cgroup they are charged, and reclaimed before anything is killed).

`summary[stage]` gives, between the smallest and the largest depth, the growth per added LLM layer of the peak
anonymous and file-backed memory, and the anonymous peak projected to the real 36 layers. The goal (issue 16):
anonymous growth <= 40 MiB per layer (a real-width layer is 386 MB in bf16). `before` repeats the total peaks
measured before the streaming work (research note runtimes_and_versions.md §2: small vocabulary, /usr/bin/time).

--cap SIZE runs every stage in its own cgroup-v1 memory group limited to SIZE (root, /sys/fs/cgroup/memory
writable); `cgroup` in each result gives the group's peak charge (page cache included), its failcnt (times the
limit was hit and pages were reclaimed) and whether the kernel killed anything. This is how the full-depth run is
made: `--layers 36 --vision-layers 27 --cap 20G`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from measure import TreePoller, emit, log, mib

REPO = Path(__file__).resolve().parents[1]
GOAL_MIB_PER_LAYER = 40
REAL_LAYERS = {"4.5": 36, "4.6": 24}     # the release's LLM layers, which the summary projects to

# Research note §2 (before this work): total peak RSS (anonymous + file-backed), small vocabulary, 2 and 6 layers.
BEFORE_MIB = {
    "quantize-rtn": (2291, 2522), "onnx-fp16": (3677, 3275), "onnx-int4": (3936, 10256),
    "onnx-int4-from": (1358, 2947), "gguf-q4_k_m": (1851, 3303), "coreml-int4": (5412, 14274),
    "validate": (3441, 7858), "make-tiny": (2366, 5310),
}


@dataclass(frozen=True)
class Stage:
    name: str
    args: tuple[str, ...]           # mcq arguments; {model}, {work}, {samples}, {eval} are filled in
    output: str | None = None       # the folder it writes under {work} (removed after the depth unless kept)
    keep_for: tuple[str, ...] = ()  # stages that read this output (it is removed once they have run)


PLAN = """\
name: scale
calibration: {{num_samples: {samples}, max_slice_nums: 1}}
validate: {{num_samples: {eval}, max_new_tokens: 4, latency_runs: 1}}
variants:
  rtn:
    quantize: {{method: rtn}}
  gguf-q4_k_m:
    export: {{format: gguf, quant: Q4_K_M, mmproj_quant: Q8_0}}
  onnx-int4:
    export: {{format: onnx, precision: int4, from: rtn}}
  coreml:
    export: {{format: coreml, vision: int8, llm: int4-block32, from: rtn}}
"""

STAGES = (
    Stage("quantize-rtn", ("quantize", "--model", "{model}", "--method", "rtn", "--out", "{work}/rtn"), "rtn",
          ("gguf-q4_k_m-from", "onnx-int4-from", "onnx-fp16-from", "coreml-int4-from", "validate", "validate-rtn")),
    Stage("quantize-rtn-w8", ("quantize", "--model", "{model}", "--recipe", "rtn-w8", "--out", "{work}/rtn8"),
          "rtn8", ("onnx-int8-from",)),
    Stage("quantize-gptq", ("quantize", "--model", "{model}", "--method", "gptq", "--num-samples", "{samples}",
                            "--out", "{work}/gptq"), "gptq"),
    Stage("quantize-awq", ("quantize", "--model", "{model}", "--method", "awq", "--num-samples", "{samples}",
                           "--out", "{work}/awq"), "awq"),
    Stage("gguf-f16", ("export", "--format", "gguf", "--model", "{model}", "--quant", "F16", "--out",
                       "{work}/gguf-f16"), "gguf-f16"),
    Stage("gguf-q8_0", ("export", "--format", "gguf", "--model", "{model}", "--quant", "Q8_0", "--mmproj-quant",
                        "Q8_0", "--out", "{work}/gguf-q8_0"), "gguf-q8_0"),
    Stage("gguf-q4_k_m", ("export", "--format", "gguf", "--model", "{model}", "--quant", "Q4_K_M", "--mmproj-quant",
                          "Q4_K_M", "--imatrix", "auto", "--num-samples", "{samples}", "--out", "{work}/gguf-q4_k_m"),
          "gguf-q4_k_m", ("validate", "validate-gguf")),
    Stage("gguf-q4_k_m-from", ("export", "--format", "gguf", "--model", "{model}", "--from", "{work}/rtn", "--quant",
                               "Q4_K_M", "--out", "{work}/gguf-from"), "gguf-from"),
    Stage("onnx-fp32", ("export", "--format", "onnx", "--model", "{model}", "--precision", "fp32", "--out",
                        "{work}/onnx-fp32"), "onnx-fp32"),
    Stage("onnx-fp16", ("export", "--format", "onnx", "--model", "{model}", "--precision", "fp16", "--out",
                        "{work}/onnx-fp16"), "onnx-fp16"),
    Stage("onnx-int8", ("export", "--format", "onnx", "--model", "{model}", "--precision", "int8", "--out",
                        "{work}/onnx-int8"), "onnx-int8"),
    Stage("onnx-int4", ("export", "--format", "onnx", "--model", "{model}", "--precision", "int4", "--out",
                        "{work}/onnx-int4"), "onnx-int4", ("validate-onnx-int4",)),
    Stage("onnx-int4-from", ("export", "--format", "onnx", "--model", "{model}", "--from", "{work}/rtn",
                             "--precision", "int4", "--out", "{work}/onnx-int4-from"), "onnx-int4-from", ("validate",)),
    Stage("onnx-int8-from", ("export", "--format", "onnx", "--model", "{model}", "--from", "{work}/rtn8",
                             "--precision", "int8", "--out", "{work}/onnx-int8-from"), "onnx-int8-from"),
    Stage("onnx-fp16-from", ("export", "--format", "onnx", "--model", "{model}", "--from", "{work}/rtn",
                             "--precision", "fp16", "--out", "{work}/onnx-fp16-from"), "onnx-fp16-from"),
    Stage("coreml-int4", ("export", "--format", "coreml", "--model", "{model}", "--vision", "int8", "--llm",
                          "int4-block32", "--out", "{work}/coreml-int4"), "coreml-int4", ("validate",)),
    Stage("coreml-palettize4", ("export", "--format", "coreml", "--model", "{model}", "--vision", "palettize4",
                                "--llm", "palettize4", "--out", "{work}/coreml-pal4"), "coreml-pal4"),
    Stage("coreml-int8", ("export", "--format", "coreml", "--model", "{model}", "--vision", "palettize6", "--llm",
                          "int8", "--out", "{work}/coreml-int8"), "coreml-int8"),
    Stage("coreml-fp16", ("export", "--format", "coreml", "--model", "{model}", "--vision", "fp16", "--llm", "fp16",
                          "--out", "{work}/coreml-fp16"), "coreml-fp16"),
    Stage("coreml-int4-from", ("export", "--format", "coreml", "--model", "{model}", "--from", "{work}/rtn",
                               "--out", "{work}/coreml-from"), "coreml-from"),
    Stage("validate", ("validate", "--reference", "{model}", "--variant", "{work}/rtn", "{work}/gguf-q4_k_m",
                       "{work}/onnx-int4-from", "{work}/coreml-int4", "--num-samples", "{eval}", "--latency-runs",
                       "1", "--max-new-tokens", "4", "--json", "{work}/validate.json")),
    Stage("validate-rtn", ("validate", "--reference", "{model}", "--variant", "{work}/rtn", "--num-samples", "{eval}",
                           "--latency-runs", "1", "--max-new-tokens", "4", "--json", "{work}/validate-rtn.json")),
    Stage("validate-gguf", ("validate", "--reference", "{model}", "--variant", "{work}/gguf-q4_k_m", "--num-samples",
                            "{eval}", "--latency-runs", "1", "--max-new-tokens", "4", "--json",
                            "{work}/validate-gguf.json")),
    Stage("validate-onnx-int4", ("validate", "--reference", "{model}", "--variant", "{work}/onnx-int4",
                                 "--num-samples", "{eval}", "--latency-runs", "1", "--max-new-tokens", "4", "--json",
                                 "{work}/validate-onnx-int4.json")),
    Stage("build", ("build", "--model", "{model}", "--out", "{work}/build", "--plan", "{work}/plan.yaml"), "build"),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)
# GPTQ / AWQ take minutes per real-width layer on 2 cores and were measured flat (bench_quantize.py): opt in.
DEFAULT_STAGES = tuple(name for name in STAGE_NAMES if name not in ("quantize-gptq", "quantize-awq", "validate-gguf",
                                                                           "validate-onnx-int4", "validate-rtn"))


# -- cgroup v1 memory cap ------------------------------------------------------------------------------------------
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def _cgroup(name: str, limit: str | None) -> Path | None:
    if not limit:
        return None
    group = CGROUP_ROOT / name
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(limit)
    return group


def _cgroup_result(group: Path | None) -> dict | None:
    if group is None:
        return None
    oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    result = {"limit_mib": mib(int((group / "memory.limit_in_bytes").read_text()) // 1024),
              "max_usage_mib": mib(int((group / "memory.max_usage_in_bytes").read_text()) // 1024),
              "failcnt": int((group / "memory.failcnt").read_text()), "oom_kill": int(oom.get("oom_kill", 0))}
    if (group / "memory.memsw.max_usage_in_bytes").exists():  # memory + swap (equal to the above without swap)
        result["memsw_max_usage_mib"] = mib(int((group / "memory.memsw.max_usage_in_bytes").read_text()) // 1024)
    group.rmdir()
    return result


# -- one measured command ------------------------------------------------------------------------------------------
def run_stage(label: str, command: list[str], log_path: Path, cap: str | None, code: Path = REPO) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(code), os.environ.get("PYTHONPATH"))))}
    group = _cgroup(f"mcq-bench-{os.getpid()}-{label}", cap)

    def enter_group() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    log(f"{label}: started (log {log_path})")
    load_before = os.getloadavg()[0]
    with open(log_path, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        started = time.perf_counter()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=code, preexec_fn=enter_group)
        with TreePoller(process.pid) as poller:
            _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    result = {"exit_code": code, "wall_s": round(seconds, 1), "user_cpu_s": round(usage.ru_utime, 1),
              "system_cpu_s": round(usage.ru_stime, 1), "ru_maxrss_mib": round(usage.ru_maxrss / 1024, 1),
              **poller.summary(), "cgroup": _cgroup_result(group),
              "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2)}
    if code != 0:
        result["error"] = log_path.read_text(errors="replace")[-3000:]
        log(f"{label}: FAILED with exit code {code} (see {log_path})")
    else:
        log(f"{label}: {result['wall_s']} s, peak anon {result['peak_rss_anon_mib']} MiB, file "
            f"{result['peak_rss_file_mib']} MiB")
    return result


def mcq(*args: str) -> list[str]:
    return [sys.executable, "-m", "mcq.cli", *args]


def run_depth(layers: int, args, work: Path, stages: list[Stage], results: dict) -> dict:
    """Runs the stages at one depth into `results` (the report is rewritten after each stage: a run can be cut)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    model = work / "model"
    if args.reuse_model and (model / "config.json").is_file():
        log(f"{layers}L: reusing {model}")
    else:
        results["make-tiny"] = run_stage(f"{layers}L-make-tiny", mcq(
            "make-tiny", str(model), "--version", args.version, "--real-widths",
            *(["--real-vocab"] if args.real_vocab else []),
            "--llm-layers", str(layers), "--vision-layers", str(args.vision_layers), "--force"),
            work / "logs" / "make-tiny.log", args.cap, args.code)
        args.checkpoint()
    fill = {"model": str(model), "work": str(work), "samples": str(args.num_samples), "eval": str(args.eval_samples)}
    (work / "plan.yaml").write_text(PLAN.format(samples=args.num_samples, eval=args.eval_samples))
    selected = {stage.name for stage in stages}
    for position, stage in enumerate(stages):
        missing = [s.name for s in STAGES if s.name not in selected and stage.name in s.keep_for
                   and not (s.output and (work / s.output).is_dir())]
        if missing:
            results[stage.name] = {"skipped": f"needs {', '.join(missing)}"}
            continue
        command = mcq(*(part.format(**fill) for part in stage.args))
        results[stage.name] = run_stage(f"{layers}L-{stage.name}", command, work / "logs" / f"{stage.name}.log",
                                        args.cap, args.code)
        args.checkpoint()
        if args.keep:
            continue
        later = {s.name for s in stages[position + 1:]}
        for done in stages[: position + 1]:
            if done.output and not (set(done.keep_for) & later):
                shutil.rmtree(work / done.output, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(model, ignore_errors=True)
    return results


def summarize(by_depth: dict[int, dict], layers: list[int], real_layers: int) -> dict:
    low, high = min(layers), max(layers)
    summary = {}
    for stage in by_depth[low]:
        a, b = by_depth[low].get(stage, {}), by_depth[high].get(stage, {})
        if "peak_rss_anon_mib" not in a or "peak_rss_anon_mib" not in b or a.get("exit_code") or b.get("exit_code"):
            summary[stage] = {"error": "not measured at both depths"}
            continue
        anon = (b["peak_rss_anon_mib"] - a["peak_rss_anon_mib"]) / (high - low)
        file = (b["peak_rss_file_mib"] - a["peak_rss_file_mib"]) / (high - low)
        wall = (b["wall_s"] - a["wall_s"]) / (high - low)
        entry = {"anon_mib": {low: a["peak_rss_anon_mib"], high: b["peak_rss_anon_mib"]},
                 "file_mib": {low: a["peak_rss_file_mib"], high: b["peak_rss_file_mib"]},
                 "anon_mib_per_layer": round(anon, 1), "file_mib_per_layer": round(file, 1),
                 f"anon_mib_at_{real_layers}_layers": round(a["peak_rss_anon_mib"] + anon * (real_layers - low)),
                 "wall_s_per_layer": round(wall, 1), "goal_met": anon <= GOAL_MIB_PER_LAYER}
        if stage in BEFORE_MIB:
            before = BEFORE_MIB[stage]
            entry["before_total_mib"] = {2: before[0], 6: before[1],
                                         "per_layer": round((before[1] - before[0]) / 4, 1)}
        summary[stage] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default="4.5", help="the release (4.6: --layers 4 8, whole groups of its 3:1 "
                        "linear / full attention layers; the stages whose commands apply to it)")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--no-real-vocab", dest="real_vocab", action="store_false")
    parser.add_argument("--stages", nargs="+", choices=STAGE_NAMES, default=list(DEFAULT_STAGES))
    parser.add_argument("--num-samples", type=int, default=4, help="calibration samples (imatrix, GPTQ, AWQ, build)")
    parser.add_argument("--eval-samples", type=int, default=2, help="validation samples")
    parser.add_argument("--cap", metavar="SIZE", help="cgroup-v1 memory limit per stage, e.g. 20G")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mcq-bench-scale"))
    parser.add_argument("--contention", default="", help="what else ran on the machine (recorded)")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--code", type=Path, default=REPO,
                        help="the mcq source tree to run (another checkout: times side by side with this one)")
    parser.add_argument("--reuse-model", action="store_true",
                        help="use the model already in WORKDIR/<N>L/model (and outputs there) instead of making it: "
                             "a full-depth run one stage per invocation")
    parser.add_argument("--out")
    args = parser.parse_args()
    stages = [stage for stage in STAGES if stage.name in args.stages]
    by_depth = {}

    def checkpoint() -> None:  # the results so far, in --out only (stdout gets the final report)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"partial": True, "results": by_depth}, indent=2) + "\n")

    args.checkpoint = checkpoint
    for layers in args.layers:
        run_depth(layers, args, args.workdir / f"{layers}L", stages, by_depth.setdefault(layers, {}))
        args.checkpoint()
    if not args.keep:
        for layers in args.layers:
            shutil.rmtree(args.workdir / f"{layers}L", ignore_errors=True)
    report = {
        "benchmark": "bench_scale", "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "contention": args.contention, "code": str(args.code),
        "model": {"version": args.version, "real_widths": True, "real_vocab": args.real_vocab,
                  "vision_layers": args.vision_layers,
                  "llm_layers": args.layers},
        "settings": {"num_samples": args.num_samples, "eval_samples": args.eval_samples, "cap": args.cap,
                     "poll_interval_s": 0.01},
        "goal_anon_mib_per_layer": GOAL_MIB_PER_LAYER,
        "summary": summarize(by_depth, args.layers, REAL_LAYERS[args.version]) if len(args.layers) > 1 else None,
        "results": by_depth,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
