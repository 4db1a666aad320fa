"""`write_report`: results files → a directory with report.md, report.html and the combined results.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mcq.outputs import check_output, staged_output
from mcq.reports.content import build_sections
from mcq.reports.inputs import combine_results, reference_row
from mcq.reports.plots import draw_plots
from mcq.reports.ranking import rank
from mcq.reports.render import render_html, render_markdown

REPORT_FILES = ("report.md", "report.html", "results.json")


@dataclass(frozen=True)
class ReportResult:
    out: Path
    files: tuple[str, ...]           # names written into `out`
    variants: int                    # variants reported, the reference included
    failed: int
    pick: str | None                 # name of the smallest variant passing every threshold (None: see `reason`)
    reason: str                      # one sentence on the pick (or why there is none)
    pareto_front: tuple[str, ...]    # names on the size / mean-KL Pareto front, smallest first

    def summary(self) -> str:
        """One line for the CLI."""
        failed = f" ({self.failed} failed)" if self.failed else ""
        return f"wrote {', '.join(self.files)} to {self.out}: {self.variants} variants{failed}; {self.reason}"

    def to_dict(self) -> dict:
        """What `mcq report --json` prints."""
        return {"out": str(self.out), "files": list(self.files), "variants": self.variants, "failed": self.failed,
                "pick": self.pick, "reason": self.reason, "pareto_front": list(self.pareto_front)}


def write_report(results: list[Path], out: Path, force: bool = False) -> ReportResult:
    """Combine the `mcq validate` results files `results` (in order) and write the report directory `out`.
    Bad input (a missing or malformed file, files that disagree on the reference, eval set or settings, a variant
    in two files, `out` existing without `force`) raises McqError before anything is written."""
    out = Path(out)
    check_output(out, force)
    combined = combine_results([Path(p) for p in results])
    variants = combined.results["variants"]
    ranking = rank(variants)
    reference = combined.results["reference"]
    title = f"mcq validation report: {reference['name']}"
    sections = build_sections(combined.results, ranking, combined.sources, combined.notes)
    plots = draw_plots(variants, ranking, reference_row(combined.results))
    texts = {
        "report.md": render_markdown(title, sections),
        "report.html": render_html(title, sections, plots),
        # Key order is the input's (the format's order), so the combined file reads like one validate run wrote it.
        "results.json": json.dumps(combined.results, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
    }
    with staged_output(out, force) as staging:
        for name in REPORT_FILES:
            (staging / name).write_text(texts[name], encoding="utf-8")
    if not ranking.expressions:
        reason = "no thresholds given, no pick"
    elif ranking.pick is None:
        reason = "no variant passes every threshold"
    else:
        reason = f"ship {ranking.pick} (smallest passing every threshold)"
    return ReportResult(out=out, files=REPORT_FILES, variants=len(variants),
                        failed=sum(v["status"] == "failed" for v in variants),
                        pick=ranking.pick, reason=reason,
                        pareto_front=ranking.front)
