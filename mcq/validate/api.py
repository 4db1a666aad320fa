"""`mcq validate`: every variant against the reference, each in a fresh process, into one results object.

Checks that need no model run come first (formats, that each variant is a variant of the reference, the eval
data), so bad input fails in a second with exit code 2. Then: the reference run (its outputs become what variants
are scored against), one run per variant (a variant that crashes is reported as failed; the others still run),
and one more reference run that scores each variant's vision path alone. The results format is
`mcq.validate.results`.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcq.errors import McqError
from mcq.models.family import component_or_other
from mcq.models.loading import check_device, check_safetensors, resolve_model_path, weight_files
from mcq.outputs import MANIFEST_NAME, tool_versions

from .evalset import describe_items, encode_items, eval_samples, open_encoder
from .results import FORMAT, METRICS
from .runners import runtime_runner

_OPERATORS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class Threshold:
    """`--fail-if 'kl_mean>0.05'`: a variant fails when the comparison holds."""

    metric: str
    op: str
    value: float

    @property
    def expression(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def fails(self, measured: float) -> bool:
        return _OPERATORS[self.op](measured, self.value)


def parse_threshold(text: str) -> Threshold:
    match = re.fullmatch(r"\s*([a-z0-9_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", text)
    if not match:
        raise McqError(f"--fail-if {text!r}: write METRIC>VALUE (or <, >=, <=), e.g. 'kl_mean>0.05'")
    metric, op, value = match.groups()
    if metric not in METRICS:
        raise McqError(f"--fail-if {text!r}: unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    try:
        number = float(value)
    except ValueError:
        raise McqError(f"--fail-if {text!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise McqError(f"--fail-if {text!r}: the value must be finite")
    return Threshold(metric, op, number)


@dataclass(frozen=True)
class Target:
    name: str
    path: str          # as given (a directory, or a tiny: name)
    format: str
    runner: type
    python: str        # the interpreter of the runner's environment (vLLM's has its own)


def _target(path: str | Path, name: str | None = None, runtime: str = "auto") -> Target:
    text = str(path)
    format_name, runner = runtime_runner(text, runtime)
    default = text if text.startswith("tiny:") else Path(text).name
    if runtime != "auto":
        default = f"{default} ({runner.name})"
    return Target(name or default, text, format_name, runner, runner.environment())


def _check_same_model(reference: Target, variant: Target) -> None:
    """Refuse a variant of another model: different architecture, or quantized from other weights (its manifest's
    source hashes against the reference's files)."""
    ours, theirs = reference.runner.describe(reference.path), variant.runner.describe(variant.path)
    differing = [f"{key} {theirs[key]} vs {ours[key]}" for key in ours if key in theirs and theirs[key] != ours[key]]
    if differing:
        raise McqError(f"{variant.path} is not a variant of the reference {reference.path}: "
                       + ", ".join(differing[:3]))
    manifest = Path(variant.path) / MANIFEST_NAME
    if not manifest.is_file():
        return   # not written by mcq (a GGUF from elsewhere): only the architecture check above applies
    try:
        source = json.loads(manifest.read_text(encoding="utf-8")).get("source") or {}
        files = source.get("files") or {}
        if not isinstance(files, dict):
            raise ValueError("source.files is not a mapping")
    except (OSError, ValueError, AttributeError):
        # mcq writes the manifest last, over every other file: a damaged one may mean a damaged output, and the
        # weights it came from cannot be checked. Measuring it anyway would gate a variant on a check that did not run.
        raise McqError(f"{manifest} is unreadable, so {variant.path} cannot be checked against the reference's "
                       "weights; write the variant again with mcq") from None
    from mcq.outputs import file_sha256

    reference_dir = resolve_model_path(reference.path)
    for name, digest in sorted(files.items()):
        if name.endswith(".safetensors") and (reference_dir / name).is_file():
            if file_sha256(reference_dir / name) != digest:
                raise McqError(f"{variant.path} was quantized from other weights than the reference "
                               f"{reference.path} ({name} differs; see its {MANIFEST_NAME})")
            return   # one shard is enough: weights from another model cannot share a shard's hash


def _recipe_of(path: str) -> str | None:
    manifest = Path(path) / MANIFEST_NAME
    try:
        recipe = json.loads(manifest.read_text()).get("recipe") if manifest.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None
    return recipe.get("name") if isinstance(recipe, dict) else None


def _component_params(path: str) -> dict[str, int]:
    """Parameters per component of the reference (from the safetensors headers): the denominator of bits per
    weight, so every variant of it is measured against the same count."""
    counts: dict[str, int] = {}
    for file in weight_files(resolve_model_path(path)):
        for name, entry in check_safetensors(file).items():
            component = component_or_other(name)
            counts[component] = counts.get(component, 0) + math.prod(entry["shape"])
    return counts


def _sizes(target: Target, params: dict[str, int]) -> tuple[int, dict[str, dict[str, Any]]]:
    per_component = target.runner.weight_bytes(target.path)
    components = {name: {"bytes": size, "params": params.get(name, 0),
                         "bits_per_weight": 8 * size / params[name] if params.get(name) else None}
                  for name, size in per_component.items() if size or params.get(name)}
    return sum(per_component.values()), components


def _run_worker(job: dict[str, Any], workdir: Path, label: str, python: str = sys.executable,
                environment: dict[str, str] | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(result, None) or (None, the error's last line) of one worker process; `environment` (the memory plan's)
    is added to this process's, whose own settings win."""
    job_file, result_file = workdir / f"{label}.job.json", workdir / f"{label}.result.json"
    log_file = workdir / f"{label}.log"
    job_file.write_text(json.dumps(job))
    env = {**(environment or {}), **os.environ, "TQDM_DISABLE": "1"}
    with open(log_file, "w") as log:
        process = subprocess.run([python, "-m", "mcq.validate.worker", str(job_file), str(result_file)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
    if process.returncode == 0 and result_file.is_file():
        return json.loads(result_file.read_text()), None
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    if process.returncode < 0:
        reason = f"killed by signal {-process.returncode}" + (" (out of memory?)" if process.returncode == -9 else "")
    else:
        reason = lines[-1].strip() if lines else f"exit code {process.returncode}"
    return None, reason


def _measured(result: dict[str, Any], reference_ppl: float | None) -> dict[str, Any]:
    """The metrics a worker run measured (accuracy, memory, latency medians)."""
    scores = result["scores"]
    measured = {key: scores[key] for key in ("kl_mean", "kl_p99", "top1_agreement", "ppl", "vision_cosine",
                                             "gen_token_agreement", "gen_exact_match")}
    if scores["ppl"] is not None and reference_ppl is not None:
        measured["ppl_delta"] = scores["ppl"] - reference_ppl
    measured.update(result["memory"])
    measured.update({key: values["median"] for key, values in result["spread"].items()})
    return measured


def validate(reference: str | Path, variants: list[str | Path], *, eval_data: str | Path | None = None,
             num_samples: int | None = None, max_slice_nums: int | None = 2, device: str = "cpu",
             dtype: str = "auto", max_new_tokens: int = 24, latency_runs: int = 5, warmup_runs: int = 1,
             decode_tokens: int = 16, seed: int = 0, thresholds: list[Threshold] = (),
             runtimes: list[str] = ("auto",), reference_runtime: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Validate `variants` against `reference`; returns the results object (`mcq.validate.results`).

    `runtimes` names the runtime of each variant, or one for all: "auto" (the one its format is served by:
    transformers, llama.cpp, onnxruntime, Core ML) or "vllm" (bf16 and compressed-tensors, in vLLM's own
    environment, see `mcq.validate.runners.vllm_runner`). `reference_runtime` serves the reference the same way:
    "vllm" scores every variant against vLLM's own bf16 (what a quantized variant changes in vLLM, apart from where
    vLLM computes otherwise than the official code); every variant is then scored on the samples vLLM serves."""
    check_device(device)
    if dtype == "auto":
        # float32 on CPU: exact arithmetic on bf16 weights (and faster there than emulated bf16 matmuls); bf16 on
        # accelerators, as the variants would be served.
        dtype = "float32" if device == "cpu" else "bfloat16"
    if not variants:
        raise McqError("name at least one --variant")
    ref = _target(reference, name=None, runtime=reference_runtime)
    if ref.format not in ("bf16", "float16", "float32"):
        raise McqError(f"the reference {reference} is {ref.format}; pass the original (unquantized) checkpoint")
    runtimes = list(runtimes)
    if len(runtimes) not in (1, len(variants)):
        raise McqError(f"--runtime: give one runtime for every variant or one for all ({len(variants)} variants, "
                       f"{len(runtimes)} runtimes)")
    targets = [_target(v, runtime=r) for v, r in zip(variants, runtimes * len(variants) if len(runtimes) == 1
                                                      else runtimes)]
    names = [t.name for t in targets]
    targets = [Target(f"{t.name} ({i + 1})" if names.count(t.name) > 1 else t.name, t.path, t.format, t.runner,
                      t.python) for i, t in enumerate(targets)]
    for target in targets:
        _check_same_model(ref, target)
    samples = eval_samples(eval_data, num_samples, seed)
    items = encode_items(open_encoder(reference), samples, max_slice_nums)
    params = _component_params(ref.path)
    plans = memory_plans([ref, *targets], device, dtype, items, max_new_tokens)

    base_job = {"reference": ref.path, "reference_runner": ref.runner.name, "device": device, "dtype": dtype,
                "seed": seed,
                "eval": {"source": None if eval_data is None else str(eval_data), "num_samples": num_samples,
                         "max_slice_nums": max_slice_nums},
                "max_new_tokens": max_new_tokens,
                "latency": {"runs": latency_runs, "warmup": warmup_runs, "decode_tokens": decode_tokens}}
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mcq-validate-") as tmp:
        workdir = Path(tmp)
        base_job["artifacts"] = str(workdir)
        runs = [("reference", 0, ref)] + [("variant", i + 1, t) for i, t in enumerate(targets)]
        bar = _progress(len(runs) + 1, progress)
        reference_ppl, vision_files = None, {}
        for role, index, target in runs:
            bar.set_postfix_str(target.name)
            result, error = _run_worker({**base_job, "role": role, "index": index, "path": target.path,
                                         "format": target.format, "runner": target.runner.name,
                                         "load": plans[index].load},
                                        workdir, f"{role}-{index}", target.python, plans[index].environment)
            bar.update()
            if role == "reference" and result is None:
                raise McqError(f"the reference {reference} failed to run: {error}")
            size, components = _sizes(target, params)
            runtime = target.runner.runtime(target.format)
            # Run otherwise than a user of the runtime would by default (planned, or found while loading): say how.
            hows = (plans[index].how if plans[index].load else "", (result or {}).get("how", ""))
            runtime += "".join(f" ({how})" for how in hows if how)
            row = {"name": target.name, "path": target.path, "format": target.format,
                   "runtime": runtime, "status": "ok" if result is not None else "failed",
                   "error": error, "recipe": _recipe_of(target.path) if role == "variant" else None,
                   "metrics": {key: None for key in METRICS}, "spread": {}, "components": components,
                   "kl_by_kind": {}, "kl_vision_path": None, "skipped_samples": {}, "thresholds": []}
            # Sizes are read from the files, so a variant that failed to run still has them.
            row["metrics"].update(bytes=size, bits_per_weight=8 * size / sum(params.values()))
            if result is not None:
                if role == "reference":
                    reference_ppl = result["scores"]["ppl"]
                row["metrics"].update(_measured(result, reference_ppl))
                row["spread"], row["kl_by_kind"] = result["spread"], result["scores"]["kl_by_kind"]
                # Samples the variant's runtime cannot run (reason → count): its metrics cover the others.
                row["skipped_samples"] = result["skipped_samples"]
                if result.get("vision_file"):
                    vision_files[str(index)] = result["vision_file"]
            rows.append(row)
        bar.set_postfix_str("vision path")
        if vision_files:
            result, error = _run_worker({**base_job, "role": "vision_path", "index": 0, "path": ref.path,
                                         "format": ref.format, "runner": ref.runner.name,
                                         "vision_files": vision_files, "load": plans[0].load},
                                        workdir, "vision-path", ref.python, plans[0].environment)
            if result is None:
                raise McqError(f"the reference failed to score the variants' vision paths: {error}")
            for index, value in result["kl_vision_path"].items():
                rows[int(index)]["kl_vision_path"] = value
        bar.update()
        bar.close()
    for row in rows[1:]:
        row["thresholds"] = check_thresholds(row, thresholds)
    return {
        "format": FORMAT,
        "reference": {"name": ref.name, "path": ref.path, "format": ref.format},
        "eval": describe_items(items, eval_data),
        "settings": {"device": device, "dtype": dtype, "max_new_tokens": max_new_tokens,
                     "latency_runs": latency_runs, "warmup_runs": warmup_runs, "decode_tokens": decode_tokens,
                     "max_slice_nums": max_slice_nums, "seed": seed, "fail_if": [t.expression for t in thresholds]},
        "versions": tool_versions(),
        "seconds": round(time.perf_counter() - started, 1),
        "variants": rows,
    }


def memory_plans(targets: list[Target], device: str, dtype: str, items, max_new_tokens: int) -> list:
    """Each target's memory plan (reference first), or a one-line McqError, before anything is loaded, naming
    the first target that cannot fit in the memory available, what it needs and what to pass."""
    from .probes import available_memory

    available = available_memory()
    tokens = max((item.scored["input_ids"].shape[1] for item in items if item.scored is not None),
                 default=0) + max_new_tokens
    plans = []
    for target in targets:
        plan = target.runner.memory_plan(target.path, device, dtype, available, tokens)
        if plan.bytes is not None and available is not None and plan.bytes > available:
            how = f" ({plan.how})" if plan.how else ""
            raise McqError(f"{target.name} needs about {plan.bytes / 2**30:.1f} GiB to run on {device}{how}, and "
                           f"{available / 2**30:.1f} GiB is available; {plan.hint}")
        plans.append(plan)
    return plans


def check_thresholds(row: dict[str, Any], thresholds: list[Threshold]) -> list[dict[str, Any]]:
    checks = []
    for threshold in thresholds:
        value = row["metrics"].get(threshold.metric)
        # A failed variant fails every threshold; a metric that does not apply (None) passes none and fails none.
        passed = False if row["status"] != "ok" else (None if value is None else not threshold.fails(value))
        checks.append({"expression": threshold.expression, "value": value, "passed": passed})
    return checks


def failed_variants(results: dict[str, Any]) -> list[str]:
    """Names of the variants that failed to run or missed a threshold (what makes `mcq validate` exit 1)."""
    return [row["name"] for row in results["variants"]
            if row["status"] != "ok" or any(check["passed"] is False for check in row["thresholds"])]


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="validate", unit="run", disable=not enabled, file=sys.stderr)


# -- the table `mcq validate` prints ---------------------------------------------------------------------------------
_COLUMNS = (("kl_mean", "KL mean", "{:.5f}"), ("kl_p99", "KL p99", "{:.4f}"), ("top1_agreement", "top-1", "{:.1%}"),
            ("vision_cosine", "vision cos", "{:.4f}"), ("gen_token_agreement", "gen agree", "{:.1%}"),
            ("bits_per_weight", "bits/w", "{:.2f}"), ("bytes", "MiB", None), ("peak_rss_generate", "RSS MiB", None),
            ("decode_tok_s", "decode tok/s", "{:.1f}"))


def format_results(results: dict[str, Any]) -> str:
    header = f"{'variant':<24}{'format':<20}" + "".join(f"{label:>13}" for _, label, _ in _COLUMNS)
    lines = [f"reference {results['reference']['path']} · eval {results['eval']['source']} "
             f"({results['eval']['samples']} samples, {results['eval']['answer_tokens']} answer tokens) · "
             f"{results['settings']['device']} {results['settings']['dtype']}", "", header]
    for row in results["variants"]:
        cells = []
        for key, _, pattern in _COLUMNS:
            value = row["metrics"].get(key)
            if value is None:
                cells.append("–")
            elif pattern is None:
                cells.append(f"{value / 2**20:,.1f}")
            else:
                cells.append(pattern.format(value))
        lines.append(f"{row['name'][:23]:<24}{row['format'][:19]:<20}" + "".join(f"{c:>13}" for c in cells))
        if row["status"] != "ok":
            lines.append(f"  failed: {row['error']}")
            continue
        for reason, count in row.get("skipped_samples", {}).items():
            lines.append(f"  not scored on {count} sample(s): {reason}")
        for check in row["thresholds"]:
            if check["passed"] is False:
                lines.append(f"  threshold missed: {check['expression']} (measured {check['value']})")
    return "\n".join(lines)
