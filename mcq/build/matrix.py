"""The CI matrix over formats × MiniCPM-V versions: one job builds a format's variants of a tiny model and gates
them with `mcq validate --fail-if`; a last job merges each version's results into one report.

`matrix_entries(plan)` is the single source: `mcq matrix --emit-github` prints it for a workflow's
`strategy.matrix` (this repository's `.github/workflows/ci.yml` holds it, and a test checks the two agree), and
`mcq matrix --run` runs the same jobs locally, one after another.

An entry:

    {"job": "4.5-gguf", "version": "4.5", "format": "gguf", "variants": "build/variants/gguf-q4_k_m",
     "fail_if": "kl_mean>0.1", "validate": "--max-slice-nums 2 --max-new-tokens 24 --latency-runs 3"}

`job` names the entry's results file and artifact, `variants` are paths under the job's build folder `build`
(space-separated, for the shell), `fail_if` the gates as one comma-separated `--fail-if` argument, `validate` the
plan's other `mcq validate` settings as options. Variants of one format with different gates get an entry each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcq.errors import McqError
from mcq.models.families import FORMATS, RELEASES

from .plan import Plan

BUILD_DIR = "build"


def matrix_entries(plan: Plan, versions: tuple[str, ...] | list[str] = RELEASES) -> list[dict[str, str]]:
    options = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in plan.validate.items()
                       if key != "fail_if" and value is not None)
    entries = []
    for version in versions:
        if version not in RELEASES:
            raise McqError(f"--versions {version}: choose among {', '.join(RELEASES)}")
        for fmt in FORMATS:
            groups: dict[tuple[str, ...], list[str]] = {}
            for variant in plan.variants:
                if variant.format == fmt and version in variant.versions:
                    if not variant.fail_if:
                        raise McqError(f"plan {plan.name}: variant {variant.name} has no fail_if gate; every "
                                       "variant of a CI matrix is gated")
                    groups.setdefault(variant.fail_if, []).append(variant.name)
            for number, (gates, names) in enumerate(groups.items()):
                entries.append({"job": f"{version}-{fmt}" + (f"-{number + 1}" if number else ""),
                                "version": version, "format": fmt,
                                "variants": " ".join(f"{BUILD_DIR}/variants/{name}" for name in names),
                                "fail_if": ",".join(gates), "validate": options})
    return entries


def github_matrix(plan: Plan, versions=RELEASES) -> str:
    """The `strategy.matrix` value for a GitHub Actions job, as JSON (valid YAML too)."""
    return json.dumps({"include": matrix_entries(plan, versions)}, indent=2)


@dataclass
class MatrixRun:
    entries: list[dict[str, Any]]      # each entry with "status" and "error"
    reports: dict[str, str]            # version → report.html

    @property
    def failed(self) -> list[str]:
        return [e["job"] for e in self.entries if e["status"] != "ok"]

    def to_dict(self) -> dict[str, Any]:
        return {"entries": self.entries, "reports": self.reports, "failed": self.failed}

    def summary(self) -> str:
        lines = [f"{'job':<26}{'status':<8}variants"]
        for e in self.entries:
            lines.append(f"{e['job']:<26}{e['status']:<8}{e['variants']}")
            if e["error"]:
                lines.append(f"  {e['error']}")
        lines += [f"report {version}: {path}" for version, path in self.reports.items()]
        return "\n".join(lines)


def run_matrix(plan_source: str | Path | None, out: str | Path, versions=RELEASES, formats=(),
               force: bool = False, progress: bool = True) -> MatrixRun:
    """Run every matrix entry here, as the CI jobs do: for each version a build folder `OUT/<version>` (shared by
    its entries, so a variant two formats export from is built once), the gate, then one report per version."""
    from mcq.outputs import write_file_atomically
    from mcq.reports import write_report
    from mcq.validate.api import failed_variants, parse_threshold, validate

    from .api import build
    from .plan import load_plan

    plan = load_plan(plan_source)
    entries = [e for e in matrix_entries(plan, versions) if not formats or e["format"] in formats]
    if not entries:
        raise McqError("no matrix entry matches --versions / --only")
    out = Path(out)
    results: dict[str, list[Path]] = {}
    ran, cleared = [], set()
    for entry in entries:
        version, model = entry["version"], f"tiny:{entry['version']}"
        build_dir = out / version
        # --force empties a version's build folder once, before its first entry; later entries add to it.
        built = build(model, build_dir, plan=plan, only=[entry["format"]], validate=False,
                      force=force and version not in cleared, progress=progress)
        cleared.add(version)
        paths = [build_dir / Path(p).relative_to(BUILD_DIR) for p in entry["variants"].split()]
        entry = {**entry, "status": "ok", "error": None}
        failed_builds = [v.name for v in built.variants if v.failed and Path(v.path) in paths]
        if failed_builds:
            entry.update(status="failed", error=f"build failed: {', '.join(failed_builds)}")
        else:
            checked = validate(model, paths, thresholds=[parse_threshold(t) for t in entry["fail_if"].split(",")],
                               num_samples=plan.validate["num_samples"],
                               max_slice_nums=plan.validate["max_slice_nums"],
                               max_new_tokens=plan.validate["max_new_tokens"],
                               latency_runs=plan.validate["latency_runs"], progress=progress)
            file = out / "results" / f"{entry['job']}.json"
            # As `mcq validate --json` writes it: atomically, and a NaN is a bug, not JSON.
            write_file_atomically(file, json.dumps(checked, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                                  force=True)
            results.setdefault(version, []).append(file)
            missed = failed_variants(checked)
            if missed:
                entry.update(status="failed", error=f"gate missed: {', '.join(missed)}")
        ran.append(entry)
    reports = {version: str(write_report(files, out / f"report-{version}", force=True).out / "report.html")
               for version, files in results.items()}
    return MatrixRun(ran, reports)
