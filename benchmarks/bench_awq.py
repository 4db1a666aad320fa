"""AWQ's scale search: mcq's own (mcq/quantize/awq.py) beside llm-compressor's AWQModifier, on the same inputs.

    python benchmarks/bench_awq.py [--parts blocks whole budget] [--num-samples 8] [--threads N]
                                   [--block-engines mcq] [--loss-tokens N] [--repeats 1] [--whole-engines mcq]
                                   [--out results.json] [--keep]

JSON goes to stdout (and to --out), progress to stderr; every measured run is its own child process (exact peak
RSS from `os.wait4`), with the 1-minute load average before and after it: the machine may be shared, and times
under contention are noisy (ratios measured side by side in one run hold better than absolute seconds).

Parts:
- `blocks`: one real-width vision block and one real-width LLM layer (`make-tiny --real-widths`: MiniCPM-V 4.5 with
  LLM 4096 / 12288 and vision 1152 / 4304, one layer of each, random bf16 weights). A capture run encodes
  --num-samples built-in calibration samples with the default recipe's slicing and records, through mcq's own
  driver, the calls both blocks receive; then each (block, engine) is one child that materializes the block, reads
  the same recorded calls and runs `LlmCompressorBlockQuantizer.quantize` with the built-in awq-w4g128 recipe, its
  engine set to `mcq` or `llm-compressor`. Per run: `search_s` (that call: statistics, grid search, smoothing,
  rounding), `block_s` (plus the forward that gives the next block its inputs, which mcq's engine returns from its
  statistics pass and the driver otherwise runs), the peak RSS of the child and the peak during `block_s` alone
  (VmHWM reset just before), and the block's output error with its weights quantized (relative MSE against the
  float block on the first calls), so speed is not bought with accuracy; for mcq's engine `stages_s` and
  `stages_cpu_s`, where the search's time went, wall and process CPU seconds (statistics forward, candidate
  scales, the parents' float outputs, the grid's rounding and forwards, the clip search). `time_ratio` = mcq / llm-compressor
  `block_s`, per block and the larger of the two.
- `whole`: `mcq quantize --method awq --model tiny:4.5` as a user runs it (the CLI, default recipe: 64 samples),
  once with the built-in recipe (mcq's engine) and once with the same recipe on llm-compressor's engine, in
  alternating order --repeats times (--whole-engines: one of them only).
- `budget`: how many tokens the grid loss needs. On `tiny:4.5-outliers` (activation outliers, where AWQ's choice
  matters) with --budget-samples calibration samples (default 64, the recipe's), for every AWQ pair of every
  block: the loss of each grid candidate on every token (llm-compressor's objective), and the candidate each token
  budget picks (--budget-seeds draws of the token sample); regret = full-token loss of the pick / the best full-token
  loss - 1. A budget is enough when its picks cost (almost) nothing against all tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from measure import emit, log, release, run_child

REPO = Path(__file__).resolve().parents[1]
BLOCKS = {"vision": "vpm.encoder.layers.0", "llm": "llm.model.layers.0"}
ENGINES = ("mcq", "llm-compressor")
BUDGETS = (128, 256, 512, 1024, 2048, 4096, 8192)
RECIPE_NUM_SAMPLES = 64   # awq-w4g128's calibration.num_samples


# ------------------------------------------------------------------------------------------------------------------
# parent: orchestration only (imports nothing heavy)
# ------------------------------------------------------------------------------------------------------------------
def _child(part: str, spec: dict, workdir: Path, label: str, threads: int | None) -> dict:
    result_path = workdir / "results" / f"{label}.json"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", part, "--spec",
               json.dumps({**spec, "result": str(result_path)})]
    log(f"{label}: started")
    measured = run_child(command, workdir / "logs" / f"{label}.log", env=env, cwd=REPO)
    if measured["returncode"] != 0:
        tail = (workdir / "logs" / f"{label}.log").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{label} failed with exit code {measured['returncode']}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["process"] = measured
    log(f"{label}: {measured['wall_seconds']} s, peak RSS {measured['peak_rss_mib']} MiB, load {measured['load_1min']}")
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def part_blocks(args, workdir: Path) -> dict:
    captured = _child("capture", {"dir": str(workdir / "real-widths"), "num_samples": args.num_samples,
                                  "seed": args.seed}, workdir, "capture", args.threads)
    blocks = {}
    for key, name in BLOCKS.items():
        runs = {}
        for engine in args.block_engines:
            runs[engine] = _child("block", {"dir": str(workdir / "real-widths"), "block": name, "engine": engine,
                                            "loss_tokens": args.loss_tokens},
                                  workdir, f"{key}-{engine}", args.threads)
        blocks[key] = {"name": name, "calls": captured["blocks"][name], **runs,
                       "time_ratio": _ratio(*(runs.get(e, {}).get("block_s") for e in ENGINES)),
                       "search_time_ratio": _ratio(*(runs.get(e, {}).get("search_s") for e in ENGINES))}
    return {"num_samples": args.num_samples, "recipe_num_samples": RECIPE_NUM_SAMPLES,
            "calibration": captured["calibration"], "blocks": blocks,
            "time_ratio": max((b["time_ratio"] for b in blocks.values() if b["time_ratio"]), default=None)}


def part_whole(args, workdir: Path) -> dict:
    recipe = workdir / "awq-llm-compressor.yaml"
    engines = args.whole_engines
    runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    # tiny:4.5 built once, outside the timings, and the built-in recipe on llm-compressor's engine written out
    _child("tiny", {"model": "tiny:4.5", "recipe": str(recipe)}, workdir, "build-tiny", args.threads)
    for repeat in range(args.repeats):
        for engine in (engines if repeat % 2 == 0 else engines[::-1]):
            out = workdir / f"whole-{engine}-{repeat}"
            options = ["--method", "awq"] if engine == "mcq" else ["--recipe", str(recipe)]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            if args.threads:
                env["OMP_NUM_THREADS"] = str(args.threads)
            log(f"whole {engine} #{repeat}: started")
            measured = run_child([sys.executable, "-m", "mcq.cli", "quantize", *options, "--model", "tiny:4.5",
                                  "--out", str(out), "--force", "--json"], workdir / "logs" / f"whole-{engine}.log",
                                 env=env, cwd=REPO)
            if measured["returncode"] != 0:
                raise RuntimeError(f"mcq quantize ({engine}) failed: see {workdir / 'logs'}")
            measured["quantize_seconds"] = _last_json(workdir / "logs" / f"whole-{engine}.log")["seconds"]
            runs[engine].append(measured)
            log(f"whole {engine} #{repeat}: {measured['wall_seconds']} s wall, {measured['cpu_seconds']} s CPU, "
                f"load {measured['load_1min']}")
    best = {engine: min(r["wall_seconds"] for r in rs) for engine, rs in runs.items()}
    return {"command": "mcq quantize --method awq --model tiny:4.5 (default recipe: 64 samples, 2 slices)",
            "runs": runs, "best_wall_seconds": best, "time_ratio": _ratio(best.get("mcq"), best.get("llm-compressor"))}


def _last_json(log_file: Path) -> dict:
    """The `--json` document a `mcq quantize` run printed (its stdout went to the log with the progress lines)."""
    text = log_file.read_text()
    return json.loads(text[text.rindex("\n{") + 1 if "\n{" in text else text.index("{"):])


def part_budget(args, workdir: Path) -> dict:
    return _child("budget", {"model": "tiny:4.5-outliers", "num_samples": args.budget_samples,
                             "budgets": list(BUDGETS), "seeds": args.budget_seeds}, workdir, "budget", args.threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["blocks", "whole", "budget"],
                        default=["blocks", "whole", "budget"])
    parser.add_argument("--num-samples", type=int, default=RECIPE_NUM_SAMPLES,
                        help="calibration samples for the real-width blocks (default 64, the recipe's)")
    parser.add_argument("--repeats", type=int, default=1, help="whole-model runs per engine (alternating order)")
    parser.add_argument("--block-engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                        help="the engines of the blocks part (default both; llm-compressor's takes > 30 min)")
    parser.add_argument("--whole-engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                        help="the engines of the whole-model part (default both)")
    parser.add_argument("--budget-samples", type=int, default=64)
    parser.add_argument("--budget-seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-tokens", type=int, help="mcq's grid loss budget in the blocks (default: the recipe's)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads in every run (default: torch's)")
    parser.add_argument("--contention", default="", help="what else ran on the machine (recorded as given)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        CHILDREN[args.child](json.loads(args.spec))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="mcq-bench-awq-"))
    log(f"working in {workdir}")
    report: dict = {"settings": {
        "parts": args.parts, "num_samples": args.num_samples, "seed": args.seed, "loss_tokens": args.loss_tokens,
        "threads": args.threads or "torch default", "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "contention": args.contention, "load_1min_at_start": round(os.getloadavg()[0], 2),
        "started": time.strftime("%Y-%m-%d %H:%M:%S")}}
    try:
        for part in args.parts:
            report[part] = {"blocks": part_blocks, "whole": part_whole, "budget": part_budget}[part](args, workdir)
    finally:
        release(workdir, args.keep)
    report["settings"]["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    if "blocks" in report:
        report["time_ratio"] = report["blocks"]["time_ratio"]
    emit(report, args.out)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# children (one process each; they write their result JSON to spec["result"])
# ------------------------------------------------------------------------------------------------------------------
def _write_result(spec: dict, result: dict) -> None:
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


def _versions() -> dict:
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers

    import mcq
    return {"mcq": mcq.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
            "torch_threads": torch.get_num_threads()}


def child_tiny(spec: dict) -> None:
    import yaml

    from mcq.models.tiny import resolve_tiny

    Path(spec["recipe"]).write_text(yaml.safe_dump(_recipe("llm-compressor").to_dict(), sort_keys=False))
    _write_result(spec, {"path": str(resolve_tiny(spec["model"]))})


def _recipe(engine: str, loss_tokens: int | None = None):
    """The built-in awq-w4g128 on `engine` (mcq's with `loss_tokens` instead of the recipe's, when given)."""
    from mcq.quantize.recipe import AWQ_ENGINE_ARGS, load_recipe, parse_recipe

    data = load_recipe("awq-w4g128").to_dict()
    data["method_args"]["engine"] = engine
    for key, owner in AWQ_ENGINE_ARGS.items():   # loss_tokens, weight_clip: mcq's engine only
        if owner != engine:
            del data["method_args"][key]
    if loss_tokens is not None and engine == "mcq":
        data["method_args"]["loss_tokens"] = loss_tokens
    return parse_recipe(data, f"awq-w4g128 on {engine}")


def child_capture(spec: dict) -> None:
    """The real-width checkpoint, and the calls its first vision layer and first LLM layer receive."""
    import torch

    from mcq.build.calibration import save_encoded
    from mcq.models.loading import model_spec
    from mcq.models.tiny import TinySpec, make_tiny
    from mcq.models.weights import CheckpointReader, shell_model
    from mcq.calibration import calibration_samples
    from mcq.quantize.api import resolve_recipe
    from mcq.quantize.sequential import BlockHandler, SequentialDriver

    root = Path(spec["dir"])
    checkpoint = root / "checkpoint"
    make_tiny(checkpoint, TinySpec(version="4.5", seed=spec["seed"], real_widths=True, llm_layers=1,
                                   vision_layers=1), force=True)
    path, config, _ = model_spec(checkpoint)
    recipe = resolve_recipe("awq", None)
    samples, described = calibration_samples(path, None, spec["num_samples"],
                                             recipe.calibration.max_slice_nums, spec["seed"])
    recorded = {}

    def keep(name, block, calls):
        if name in BLOCKS.values():
            recorded[name] = calls

    log("capture: running the float model block by block")
    SequentialDriver(shell_model(config), CheckpointReader(path), samples, torch.float32, "cpu").run(
        BlockHandler(keep, lambda name, block: None))
    summary = {}
    for name, calls in recorded.items():
        entries = [{"args": list(args), "kwargs": kwargs} for args, kwargs in calls]
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        save_encoded(directory, entries, {"origins": [[list(o) for o in row] for row in calls.origins]})
        summary[name] = {"calls": len(calls), "rows": sum(int(a[0].shape[0]) for a, _ in calls),
                         "tokens": sum(int(a[0].shape[:-1].numel()) for a, _ in calls)}
    _write_result(spec, {"calibration": {**described, "max_slice_nums": recipe.calibration.max_slice_nums},
                         "blocks": summary, "versions": _versions()})


def _plan(path: Path, engine: str, loss_tokens: int | None = None):
    from mcq.models.family import linear_layers
    from mcq.models.loading import meta_skeleton, model_spec
    from mcq.quantize.recipe import plan_quantization

    _, config, _ = model_spec(path)
    return plan_quantization(_recipe(engine, loss_tokens), linear_layers(meta_skeleton(config)))


def child_block(spec: dict) -> None:
    """One block, one engine: time and memory of quantize (+ the forward for the next block), and its error."""
    import torch
    from compressed_tensors.quantization.lifecycle.helpers import enable_quantization

    from mcq.build.calibration import load_encoded
    from mcq.models.family import family_for
    from mcq.models.loading import model_spec
    from mcq.models.weights import CheckpointReader, named_blocks, shell_model
    from mcq.quantize.llmc import LlmCompressorBlockQuantizer
    from mcq.quantize.sequential import Calls
    from mcq.validate.probes import peak_rss, reset_peak_rss

    root, name = Path(spec["dir"]), spec["block"]
    path, config, _ = model_spec(root / "checkpoint")
    entries, described = load_encoded(root / name)
    calls = Calls([(tuple(e["args"]), e["kwargs"]) for e in entries],
                  [tuple((kind, index) for kind, index in row) for row in described["origins"]])
    block = dict(named_blocks(shell_model(config)))[name]
    CheckpointReader(path).materialize(block, name, torch.float32, "cpu")
    plan = _plan(path, spec["engine"], spec.get("loss_tokens"))
    checked = calls[: min(4, len(calls))]
    with torch.no_grad():
        reference = [block(*a, **k) for a, k in checked]
    quantizer = LlmCompressorBlockQuantizer(plan, family_for(config.model_type), scale_dtype=torch.bfloat16)
    log(f"{name} {spec['engine']}: {len(calls)} calls")
    stages = _timed_awq_stages() if spec["engine"] == "mcq" else {}
    resettable = reset_peak_rss()
    started = time.perf_counter()
    outputs = quantizer.quantize(name, block, calls)
    search = time.perf_counter() - started
    if outputs is None:
        with torch.no_grad():
            outputs = [block(*a, **k) for a, k in calls]
    total = time.perf_counter() - started
    peak = peak_rss()
    block.apply(enable_quantization)
    with torch.no_grad():
        error = [float(((block(*a, **k) - r) ** 2).mean() / (r ** 2).mean()) for (a, k), r in zip(checked, reference)]
    stage_seconds = {}
    for clock, seconds in stages.items():
        split = {stage: round(value, 2) for stage, value in seconds.items()}
        if split:   # the grid's rounding is what candidate_losses spends outside the parent's forwards
            split["grid_rounding"] = round(split.pop("candidate_losses") - split["grid_forward"], 2)
        stage_seconds[clock] = split
    _write_result(spec, {
        "search_s": round(search, 2), "block_s": round(total, 2), "stages_s": stage_seconds.get("wall", {}),
        "stages_cpu_s": stage_seconds.get("cpu", {}),
        "peak_rss_during_block_mib": round(peak / 2**20, 1) if resettable else None,
        "output_relative_mse": sum(error) / len(error),
        "pairs": [{"smooth": r.smooth, "parent": r.parent, "tokens": r.tokens, "ratio": r.ratio, "duo": r.duo}
                  for r in quantizer.awq_results.get(name, [])],
        "skipped_pairs": quantizer.skipped_pairs, "versions": _versions()})


def _timed_awq_stages() -> dict[str, dict[str, float]]:
    """Seconds spent in each stage of mcq's AWQ search from now on in this process (its functions wrapped with
    timers), by the wall clock and in process CPU time (which other jobs on a shared machine bend less):
    `collect` (the statistics forward), `pair_scales`, `grid_reference` (each parent's float output),
    `candidate_losses` (the grid: rounding the candidates and `grid_forward`, the parent's forwards that score
    them) and `clip_weight`."""
    from mcq.quantize import awq

    seconds: dict[str, dict[str, float]] = {"wall": {}, "cpu": {}}

    def timed(owner, attribute: str, stage: str) -> None:
        function = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                for clock, now, started in (("wall", time.perf_counter(), wall), ("cpu", time.process_time(), cpu)):
                    seconds[clock][stage] = seconds[clock].get(stage, 0.0) + now - started
        setattr(owner, attribute, wrapper)

    for attribute in ("collect", "pair_scales", "candidate_losses", "clip_weight"):
        timed(awq, attribute, attribute)
    timed(awq.ParentSample, "__init__", "grid_reference")
    timed(awq.ParentSample, "loss", "grid_forward")
    return seconds


def child_budget(spec: dict) -> None:
    """Regret of each token budget against the full-token loss, pair by pair, block by block (see the doc)."""
    import torch

    from mcq.models.family import component_of, family_for
    from mcq.models.loading import model_spec
    from mcq.models.tiny import resolve_tiny
    from mcq.models.weights import CheckpointReader, named_blocks, shell_model
    from mcq.quantize import awq
    from mcq.calibration import calibration_samples
    from mcq.quantize.llmc import quantization_args
    from mcq.quantize.sequential import BlockHandler, SequentialDriver

    path, config, _ = model_spec(resolve_tiny(spec["model"]))
    plan = _plan(path, "mcq")
    samples, described = calibration_samples(path, None, spec["num_samples"], 2, 0)
    recorded = {}
    SequentialDriver(shell_model(config), CheckpointReader(path), samples, torch.float32, "cpu").run(
        BlockHandler(lambda name, block, calls: recorded.__setitem__(name, calls), lambda name, block: None))
    rules = {rule.index: rule for rule in plan.recipe.rules}
    candidates = awq.grid(plan.recipe.method_args["n_grid"], plan.recipe.method_args["duo_scaling"])
    rows, per_budget = [], {b: [] for b in spec["budgets"]}
    family = family_for(config.model_type)
    for name, block in named_blocks(shell_model(config)):
        methods = {layer.name[len(name) + 1:]: rules[layer.rule].method or plan.recipe.method
                   for layer in plan.quantized() if layer.name.startswith(name + ".")}
        component = component_of(name + ".")
        pairs, _ = awq.resolve_pairs(block, family.smoothing_pairs[component], methods) if "awq" in methods.values() \
            else ([], [])
        if not pairs:
            continue
        CheckpointReader(path).materialize(block, name, torch.float32, "cpu")
        calls, mixing = recorded[name], awq.token_mixing(family.token_mixing[component])
        schemes = {layer.name[len(name) + 1:]: layer.scheme for layer in plan.quantized()
                   if layer.name.startswith(name + ".")}
        quant_args = {b: quantization_args(schemes[b], observer="minmax", scale_dtype=torch.bfloat16)
                      for pair in pairs for b in pair.balance}
        log(f"budget: {name}")
        full = awq.collect(block, pairs, calls, calls.origins, 10 ** 12, mixing)
        full.outputs.clear()
        drawn = {}
        for budget in spec["budgets"]:
            for seed in range(spec["seeds"]):
                drawn[budget, seed] = awq.collect(block, pairs, calls, calls.origins, budget, mixing, seed=seed)
                drawn[budget, seed].outputs.clear()
        for pair in pairs:
            scales = awq.pair_scales(block, pair, full.x_means[pair.smooth], candidates, quant_args)
            parent = awq.ParentSample(block, pair.parent, full)
            exact = awq.candidate_losses(block, pair, parent, scales, quant_args)
            best = awq.best_candidate(exact)
            entry = {"block": name, "smooth": pair.smooth, "parent": pair.parent, "mixes_tokens": mixing(pair.parent),
                     "tokens": parent.tokens, "best": list(candidates[best]),
                     "spread": exact[0] / exact[best] - 1, "by_budget": {}}
            for budget in spec["budgets"]:
                picks = []
                for seed in range(spec["seeds"]):
                    sample = awq.ParentSample(block, pair.parent, drawn[budget, seed])
                    losses = awq.candidate_losses(block, pair, sample, scales, quant_args)
                    chosen = awq.best_candidate(losses)
                    picks.append({"tokens": sample.tokens, "pick": list(candidates[chosen]),
                                  "regret": exact[chosen] / exact[best] - 1})
                entry["by_budget"][budget] = picks
                per_budget[budget] += [p["regret"] for p in picks]
            rows.append(entry)
            awq.apply_scales(block, pair, scales[best])
        for module in block.modules():   # release the block before the next one
            for key, param in list(module.named_parameters(recurse=False)):
                setattr(module, key, torch.nn.Parameter(torch.empty(0), requires_grad=False))
    summary = {budget: {"mean_regret": sum(r) / len(r), "max_regret": max(r),
                        "exact_picks": sum(v == 0 for v in r) / len(r)} for budget, r in per_budget.items()}
    _write_result(spec, {"model": spec["model"], "calibration": described, "candidates": len(candidates),
                         "summary": summary, "pairs": rows})


CHILDREN = {"tiny": child_tiny, "capture": child_capture, "block": child_block, "budget": child_budget}

if __name__ == "__main__":
    sys.exit(main())
