"""`mcq build`: one calibration, every variant a plan lists, each validated against the reference, one report.

Layout of the output folder (updated in place by later runs; each variant is itself written atomically):

    OUT/
      variants/<name>/         one `mcq quantize` or `mcq export` output per plan variant
      validation/<name>.json   `mcq validate` results of that variant (the reference and it)
      logs/<name>.log          the traceback of a variant that failed
      results.json             every variant's results together (what `mcq report` reads)
      report/                  report.md, report.html with plots, results.json
      mcq-build.json           the plan, the calibration, and per variant its key, status and time
      README.md                what was built, with the measured table

A variant is rebuilt only when its key changes: a digest of the model's files, the calibration set's (for the
variants that read it), its own plan entry, the variant it exports from, the seed, the tool versions, and mcq's
version and the digest of the mcq code that makes it (`digest.STEP_SOURCES`). Its validation is redone only when
the variant, the validation settings, the eval data or the validation code change. So a second run with nothing
changed reads the state, hashes nothing new (file digests are remembered by stat, `digest.py`) and renders the
report; after an edit to one exporter, only that exporter's variants are rebuilt and validated again.

A variant that fails (to build, to run, or a `fail_if` gate) is reported as failed and the others still finish;
the variants exported from it fail with "needs <name>". `build()` returns the result; the CLI exits 1 when any
variant failed.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mcq.errors import McqError
from mcq.outputs import write_file_atomically

from .plan import Plan, Variant, export_arguments, export_call, load_plan

STATE_FILE = "mcq-build.json"
STATE_FORMAT = "mcq-build/1"


@dataclass
class VariantOutcome:
    name: str
    format: str
    path: str
    status: str                  # "built" | "reused" | "failed" | "not applicable"
    seconds: float = 0.0
    error: str | None = None
    validation: str = "none"     # "validated" | "reused" | "failed" | "skipped" | "none"
    gates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status == "failed" or self.validation == "failed" or any(g["passed"] is False for g in self.gates)


@dataclass
class BuildResult:
    out: str
    plan: str
    model: str
    version: str
    calibration: dict[str, Any]
    variants: list[VariantOutcome]
    report: str | None
    seconds: float

    @property
    def failed(self) -> list[str]:
        return [v.name for v in self.variants if v.failed]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}

    def summary(self) -> str:
        lines = [f"{self.out}: plan {self.plan} on {self.model} (MiniCPM-V {self.version}) in {self.seconds:.1f} s",
                 f"calibration: {self.calibration.get('status', 'not needed')}", "",
                 f"{'variant':<18}{'format':<20}{'build':<16}{'validation':<12}"]
        for v in self.variants:
            build = v.status if v.status != "built" else f"built {v.seconds:.0f} s"
            lines.append(f"{v.name:<18}{v.format:<20}{build:<16}{v.validation:<12}")
            if v.error:
                lines.append(f"  error: {v.error}")
            lines += [f"  gate missed: {g['expression']} (measured {g['value']})" for g in v.gates
                      if g["passed"] is False]
        if self.report:
            lines += ["", f"report: {self.report}"]
        return "\n".join(lines)


def build(model: str | Path, out: str | Path, *, plan: str | Path | Plan | None = None, only: list[str] | tuple = (),
          calib: str | None = None, eval_data: str | None = None, device: str = "cpu", seed: int = 0,
          validate: bool = True, force: bool = False, progress: bool = True) -> BuildResult:
    """Build every variant of `plan` (the built-in default when None) selected by `only` into `out`."""
    from mcq.extras import require_method
    from mcq.models.families import FORMATS, formats_of
    from mcq.models.loading import check_device, open_checkpoint
    from mcq.models.tiny import cache_dir
    from mcq.outputs import tool_versions
    from mcq.quantize.api import resolve_recipe

    from .digest import DigestIndex, code_key, data_digest, key_of, model_digests

    started = time.perf_counter()
    chosen = plan if isinstance(plan, Plan) else load_plan(plan)
    check_device(device)
    checkpoint = open_checkpoint(model)
    path, release = checkpoint.path, checkpoint.release
    if getattr(checkpoint.config, "quantization_config", None):
        raise McqError(f"{path} is already quantized; build from the original bf16 checkpoint")
    if validate and eval_data is not None:
        from mcq.validate.evalset import eval_samples

        eval_samples(eval_data, chosen.validate["num_samples"], seed)   # bad eval data fails before any build
    if calib is not None and calib != "builtin":
        from mcq.calibration import read_user_data

        read_user_data(calib)     # checked, not loaded: bad calibration data fails before any build
    variants = chosen.select(only)
    for name in only:      # asked for by name: a format the release lacks is an error, not a variant passed over
        fmt = name if name in FORMATS else chosen.variant(name).format
        if fmt not in formats_of(release):
            raise McqError(f"--only {name}: mcq writes no {fmt} for MiniCPM-V {release} yet")
    for variant in variants:
        if variant.step == "quantize":
            require_method(resolve_recipe(variant.options.get("method"), variant.options.get("recipe")).method)
    out = Path(out)
    state = _open_state(out, path, force)
    applicable = [v for v in variants if release in v.versions]
    index = DigestIndex(cache_dir())
    digests = model_digests(index, path)
    versions = tool_versions()
    calib_settings = {**chosen.calibration, "data": calib, "data_digest": data_digest(index, calib), "seed": seed}
    calib_key = key_of({"model": digests, "settings": calib_settings, "versions": versions,
                        "code": code_key("calibration")})
    eval_digest = data_digest(index, eval_data) if validate else None
    index.save()

    outcomes: dict[str, VariantOutcome] = {}
    keys: dict[str, str] = {}
    calibration = _LazyCalibration(path, chosen, calib, seed, calib_key)
    for position, variant in enumerate(variants, 1):
        target = out / "variants" / variant.name
        outcome = VariantOutcome(variant.name, variant.format, str(target), status="not applicable")
        outcomes[variant.name] = outcome
        if variant not in applicable:
            outcome.error = (f"not built for MiniCPM-V {release} (plan: versions {', '.join(variant.versions)})"
                             if variant.format in formats_of(release)
                             else f"mcq writes no {variant.format} for MiniCPM-V {release} yet")
            continue
        # What the variant's bytes depend on (its gates and version list do not change them).
        keys[variant.name] = key_of({"model": digests, "step": {variant.step: variant.options}, "seed": seed,
                                     "device": device, "versions": versions, "code": code_key(_maker(variant)),
                                     "calibration": calib_key if _reads_calibration(variant) else None,
                                     "from": keys.get(variant.source) if variant.source else None})
        recorded = state["variants"].get(variant.name, {})
        if recorded.get("key") == keys[variant.name] and recorded.get("status") in ("built", "reused") \
                and (target / "mcq-manifest.json").is_file():
            outcome.status = "reused"
            continue
        source = outcomes.get(variant.source) if variant.source else None
        if source is not None and source.status == "failed":
            outcome.status, outcome.error = "failed", f"needs {variant.source}, which failed"
        else:
            _say(progress, f"[{position}/{len(variants)}] {variant.name}: {variant.step} ({variant.format})")
            _run_step(variant, model, out, target, calibration, device, seed, outcome, progress)
        state["variants"][variant.name] = {"key": keys[variant.name] if outcome.status != "failed" else None,
                                           "status": outcome.status, "seconds": outcome.seconds,
                                           "error": outcome.error}
        _write_state(out, state)

    # Validated and reported: the variants asked for (a source built only for them is not).
    asked = [v for v in chosen.select(only, with_sources=False) if v in applicable]
    built = [outcomes[v.name] for v in asked if outcomes[v.name].status in ("built", "reused")]
    failed = [outcomes[v.name] for v in asked if outcomes[v.name].status == "failed"]
    report = False
    if validate and built:
        report = _validate(chosen, model, out, built, failed, keys, state, eval_data, eval_digest, device, seed,
                           versions, progress)
    for outcome in outcomes.values():
        if outcome.validation == "none" and outcome.status in ("built", "reused"):
            outcome.validation = "skipped"
    if calibration.used:      # a run that reused every variant keeps the record of the calibration they came from
        state["calibration"] = calibration.record()
    state.update(plan=chosen.to_dict(), model={"spec": str(model), "digests": digests}, versions=versions)
    _write_state(out, state)
    result = BuildResult(out=str(out), plan=chosen.name, model=str(model), version=release,
                         calibration=calibration.record(), variants=list(outcomes.values()),
                         report=str(out / "report" / "report.html") if report else None,
                         seconds=round(time.perf_counter() - started, 1))
    _write_card(out, chosen, result)
    return result


# -- calibration -----------------------------------------------------------------------------------------------------

def _maker(variant: Variant) -> str:
    """The STEP_SOURCES entry of the code that makes `variant`: quantize, or its export format."""
    return "quantize" if variant.step == "quantize" else variant.format


def _reads_calibration(variant: Variant) -> bool:
    """Whether a variant's bytes depend on the calibration set: AWQ/GPTQ, and GGUF types weighted by the importance
    matrix (computed from the model itself: an export `from` a variant carries that variant's calibration)."""
    if variant.step == "quantize":
        from mcq.quantize.api import resolve_recipe
        from mcq.quantize.recipe import CALIBRATED_METHODS

        return resolve_recipe(variant.options.get("method"), variant.options.get("recipe")).method \
            in CALIBRATED_METHODS
    return variant.format == "gguf" and _gguf_uses_imatrix(variant)


def _gguf_uses_imatrix(variant: Variant) -> bool:
    from mcq.export.gguf.writer import PYTHON_TYPES

    types = {str(variant.options.get(key, "F16")).upper() for key in ("quant", "mmproj_quant")}
    return variant.options.get("imatrix", "auto") == "auto" and not variant.source and not types <= set(PYTHON_TYPES)


class _LazyCalibration:
    """The build's calibration set, encoded (or read from the cache) on first use only: a run whose variants are
    all reused never touches it."""

    def __init__(self, model_dir: Path, plan: Plan, calib: str | None, seed: int, key: str):
        from .calibration import CalibrationSettings

        self.model_dir, self.key = model_dir, key
        self.settings = CalibrationSettings(calib, plan.calibration["num_samples"],
                                            plan.calibration["max_slice_nums"], seed)
        self._set = None

    def get(self):
        if self._set is None:
            from mcq.models.tiny import cache_dir

            from .calibration import calibration_set

            self._set = calibration_set(self.model_dir, self.settings, self.key,
                                        cache_dir() / "calibration")
        return self._set

    def imatrix(self, model, progress: bool) -> Path:
        from .digest import code_key, key_of

        calibration = self.get()
        target = calibration.imatrix(key_of(code_key("gguf")))   # computed by the GGUF exporter's code
        if not target.is_file():
            from mcq.export.gguf import write_calibration_imatrix

            # Written beside and renamed in: a reader (another build) never sees half a file.
            staged = calibration.directory / f".{target.name}.{os.getpid()}"
            try:
                write_calibration_imatrix(model, staged, calibration.samples, calibration.description, progress)
                os.replace(staged, target)
            finally:
                staged.unlink(missing_ok=True)
        return target

    @property
    def used(self) -> bool:
        return self._set is not None

    def record(self) -> dict[str, Any]:
        if self._set is None:
            return {"key": self.key, "status": "not needed"}
        return {"key": self.key, "status": "reused from cache" if self._set.reused else "encoded",
                "directory": str(self._set.directory), **self._set.description}


# -- one variant -----------------------------------------------------------------------------------------------------

def _run_step(variant: Variant, model, out: Path, target: Path, calibration: _LazyCalibration, device: str,
              seed: int, outcome: VariantOutcome, progress: bool) -> None:
    """Build one variant into `target`; a failure is recorded in `outcome` (traceback in logs/) and not raised."""
    started = time.perf_counter()
    try:
        if variant.step == "quantize":
            from mcq.quantize.api import quantize

            encoded = calibration.get() if _reads_calibration(variant) else None
            quantize(model, target, method=variant.options.get("method"), recipe=variant.options.get("recipe"),
                     device=device, seed=seed, force=True, progress=progress,
                     calibration=(encoded.samples, encoded.description) if encoded else None)
        else:
            arguments = export_arguments(variant.options)
            if arguments.get("from_dir"):
                arguments["from_dir"] = out / "variants" / arguments["from_dir"]
            if variant.format == "gguf":
                arguments["seed"] = seed
                if _gguf_uses_imatrix(variant):
                    arguments["imatrix"] = str(calibration.imatrix(model, progress))
            if variant.format != "onnx":      # the ONNX export prints no progress
                arguments["progress"] = progress
            export_call(variant.format)(model, target, force=True, **arguments)
        outcome.status = "built"
    except KeyboardInterrupt:
        raise
    except Exception as err:   # a failed variant is reported; the plan's other variants still build
        outcome.status = "failed"
        outcome.error = str(err).splitlines()[0] if isinstance(err, McqError) else f"{type(err).__name__}: {err}"
        log = out / "logs" / f"{variant.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(err)), encoding="utf-8")
    outcome.seconds = round(time.perf_counter() - started, 1)


# -- validation and the report ---------------------------------------------------------------------------------------

def _validate(plan: Plan, model, out: Path, built: list[VariantOutcome], failed: list[VariantOutcome],
              keys: dict[str, str], state: dict, eval_data: str | None, eval_digest: str, device: str, seed: int,
              versions: dict, progress: bool) -> bool:
    """Validate the built variants whose results are stale, in one `validate` call (the reference runs once), then
    gate every variant and write results.json and the report. True when a report was written."""
    from mcq.validate.api import validate
    from mcq.validate.runners import detect_format

    from .digest import code_key, key_of

    settings = {**plan.validate, "eval": eval_data, "eval_digest": eval_digest, "device": device, "seed": seed,
                "versions": versions, "code": code_key("validation")}
    settings.pop("fail_if")   # gates are applied to the stored results: changing them re-measures nothing
    validation_key = {o.name: key_of({"variant": keys[o.name], "settings": settings}) for o in built}
    stale = [o for o in built if state["variants"][o.name].get("validation_key") != validation_key[o.name]
             or not (out / "validation" / f"{o.name}.json").is_file()]
    runnable = []
    for outcome in stale:
        try:
            detect_format(outcome.path)
            runnable.append(outcome)
        except McqError as err:      # no runtime here serves this format: the variant cannot be gated
            outcome.validation, outcome.error = "failed", f"validation: {err}"
    if runnable:
        _say(progress, f"validating {', '.join(o.name for o in runnable)} against {model}")
        try:
            results = validate(model, [o.path for o in runnable], eval_data=eval_data,
                               num_samples=plan.validate["num_samples"],
                               max_slice_nums=plan.validate["max_slice_nums"], device=device,
                               max_new_tokens=plan.validate["max_new_tokens"],
                               latency_runs=plan.validate["latency_runs"], seed=seed, progress=progress)
        except McqError as err:      # the run as a whole (the reference, the eval data) failed: no variant is gated
            for outcome in runnable:
                outcome.validation, outcome.error = "failed", f"validation: {err}"
            runnable = []
    if runnable:
        reference, rows = results["variants"][0], results["variants"][1:]
        for outcome, row in zip(runnable, rows):
            row["name"] = outcome.name
            _write_json(out / "validation" / f"{outcome.name}.json", {**results, "variants": [reference, row]})
            # A variant that failed to run is tried again next time (a crash may not be the variant's fault).
            state["variants"][outcome.name]["validation_key"] = validation_key[outcome.name] \
                if row["status"] == "ok" else None
    measured = [o for o in built if o.validation != "failed"]
    if not measured:
        return False
    combined = _combine(plan, out, measured, runnable, [o for o in built if o.validation == "failed"] + failed)
    _write_json(out / "results.json", combined)
    from mcq.reports import write_report

    write_report([out / "results.json"], out / "report", force=True)
    return True


def _combine(plan: Plan, out: Path, measured: list[VariantOutcome], validated_now: list[VariantOutcome],
             failed: list[VariantOutcome]) -> dict[str, Any]:
    """One results object: the reference, every measured variant gated by its plan `fail_if`, and a failed row for
    each variant that could not be built or run (so the report shows it)."""
    from mcq.validate.api import check_thresholds, parse_threshold
    from mcq.validate.results import METRICS

    combined: dict[str, Any] = {}
    rows = []
    for outcome in measured:
        stored = json.loads((out / "validation" / f"{outcome.name}.json").read_text(encoding="utf-8"))
        combined = combined or {**stored, "variants": [stored["variants"][0]]}
        row = stored["variants"][1]
        row["thresholds"] = check_thresholds(row, [parse_threshold(t) for t in plan.variant(outcome.name).fail_if])
        outcome.gates = row["thresholds"]
        if row["status"] != "ok":
            outcome.validation, outcome.error = "failed", f"validation: {row['error']}"
        else:
            outcome.validation = "validated" if outcome in validated_now else "reused"
        rows.append(row)
    for outcome in failed:
        rows.append({"name": outcome.name, "path": outcome.path, "format": outcome.format, "runtime": "-",
                     "status": "failed", "error": outcome.error, "recipe": None,
                     "metrics": dict.fromkeys(METRICS), "spread": {}, "components": {}, "kl_by_kind": {},
                     "kl_vision_path": None, "skipped_samples": {}, "thresholds": []})
    order = [v.name for v in plan.variants]
    combined["variants"] += sorted(rows, key=lambda row: order.index(row["name"]))
    combined["settings"] = {**combined["settings"],
                            "fail_if": sorted({t for o in measured for t in plan.variant(o.name).fail_if})}
    return combined


# -- state -----------------------------------------------------------------------------------------------------------

def _open_state(out: Path, model_dir: Path, force: bool) -> dict[str, Any]:
    """The state of a previous build in `out`, or a fresh one. A folder that is not a build is refused without
    `force`; `force` also forgets what was built (everything is rebuilt)."""
    from mcq.outputs import check_output

    fresh = {"format": STATE_FORMAT, "variants": {}}
    state_file = out / STATE_FILE
    check_output(out, force or state_file.is_file(), source=model_dir)
    if force and out.exists():
        import shutil

        shutil.rmtree(out)
    if not state_file.is_file():
        return fresh
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise McqError(f"{state_file} is unreadable; pass --force to rebuild {out} from scratch") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("variants"),
                                                                                           dict):
        raise McqError(f"{state_file} is not an mcq build state; pass --force to rebuild {out} from scratch")
    return state


def _write_state(out: Path, state: dict[str, Any]) -> None:
    _write_json(out / STATE_FILE, state)


def _write_json(path: Path, value: Any) -> None:
    # Written beside and renamed in: the build folder is updated in place, so no file of it is ever half-written.
    write_file_atomically(path, json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n", force=True)


def _write_card(out: Path, plan: Plan, result: BuildResult) -> None:
    rows = ["| variant | format | build | validation | gates |", "| --- | --- | --- | --- | --- |"]
    for v in result.variants:
        gates = ", ".join(f"{g['expression']}: {'missed' if g['passed'] is False else 'ok'}" for g in v.gates) or "-"
        build = v.status + (f" ({v.error})" if v.error else "")
        rows.append(f"| `{v.name}` | {v.format} | {build} | {v.validation} | {gates} |")
    text = (f"# mcq build: {Path(result.model).name if not result.model.startswith('tiny:') else result.model}\n\n"
            f"Plan `{plan.name}`: {plan.description}\n\n" + "\n".join(rows) + "\n\n"
            "Each folder under `variants/` has its own model card and manifest. "
            + ("The measurements are in `report/report.html` (and `results.json`)." if result.report else "")
            + "\n")
    write_file_atomically(out / "README.md", text, force=True)


def _say(progress: bool, text: str) -> None:
    if progress:
        import sys

        print(f"[build] {text}", file=sys.stderr, flush=True)
