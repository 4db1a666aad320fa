"""What a report says, independent of how it is drawn: sections of plain-text paragraphs, bullet lists, tables and
plot slots, built from combined results. report.md and report.html render the same sections, so they cannot
disagree; the renderers do all escaping (nothing here is markup)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mcq.reports.inputs import reference_row
from mcq.reports.ranking import Ranking
from mcq.validate.results import COMPONENTS, METRICS

MISSING = "–"  # a metric that does not apply (or was not measured) prints as an en dash

# Fractions shown as percentages; the other unit-less metrics are not fractions (cosine, perplexity, bits).
_PERCENT = {"top1_agreement", "gen_token_agreement", "gen_exact_match"}


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    numeric: tuple[bool, ...]      # right-aligned columns


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Plot:
    name: str                      # key into the plots passed to the HTML renderer
    caption: str


Block = str | Table | Bullets | Plot


@dataclass(frozen=True)
class Section:
    title: str
    blocks: tuple[Block, ...] = field(default_factory=tuple)


# -- values --------------------------------------------------------------------------------------------------------

def format_bytes(value: float | None) -> str:
    if value is None:
        return MISSING
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def format_metric(key: str, value: float | None) -> str:
    if value is None:
        return MISSING
    metric = METRICS.get(key)
    unit = metric.unit if metric else ""
    if key in _PERCENT:
        return f"{value * 100:.2f}%"
    if key == "bytes":
        return format_bytes(value)
    if unit == "bytes":  # resident and device memory: MiB keeps runs of one model comparable at a glance
        return f"{value / (1 << 20):,.0f} MiB"
    if key == "vision_cosine":
        return f"{value:.5f}"  # near 1: the differences between variants are in the 4th and 5th decimals
    if key == "ppl_delta":
        return f"{value:+.4g}"
    if key == "bits_per_weight":
        return f"{value:.2f}"
    if unit in ("ms", "tok/s"):
        return f"{value:,.1f} {unit}"
    return f"{value:.4g}"  # KL (nats), perplexity, and any metric added later: 4 significant digits


def format_latency(key: str, value: float | None, spread: dict | None) -> str:
    text = format_metric(key, value)
    if value is None or not spread or spread.get("min") is None or spread.get("max") is None:
        return text
    runs = f", {spread['runs']} runs" if spread.get("runs") is not None else ""
    return f"{text} ({spread['min']:,.1f}–{spread['max']:,.1f}{runs})"


def format_count(value) -> str:
    if value is None:
        return MISSING
    return f"{value:,}" if isinstance(value, int) else str(value)


def _format_params(value) -> str:
    if value is None:
        return MISSING
    return f"{value / 1e9:.2f} B" if value >= 1e9 else f"{value / 1e6:.1f} M"


def _threshold_value(expression: str, value: float | None) -> str:
    # Expressions name a metric first (`kl_mean>0.05`): its value prints the way the metric's column does.
    match = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", expression)
    return format_metric(match.group(1) if match else "", value)


def _setting(value) -> str:
    if isinstance(value, list):
        return "; ".join(str(item) for item in value) if value else "none"
    return MISSING if value is None else str(value)


# -- sections ------------------------------------------------------------------------------------------------------

def build_sections(results: dict, ranking: Ranking, sources: tuple[str, ...], notes: tuple[str, ...]) -> list[Section]:
    variants = results["variants"]
    ok = [v for v in variants if v["status"] == "ok"]
    reference = reference_row(results)
    sections = [_run_section(results, sources, notes), _ship_section(variants, reference, ranking),
                _variants_section(variants),
                _metric_section("accuracy", "Accuracy", ok), _kl_breakdown_section(results, ok),
                _metric_section("memory", "Memory", ok), _components_section(ok),
                _metric_section("latency", "Latency", ok),
                _thresholds_section(variants, ranking)]
    failed = [v for v in variants if v["status"] == "failed"]
    if failed:
        sections.append(Section("Failed variants", (Bullets(tuple(
            f"{v['name']} ({v['path']}): {v.get('error') or 'no error recorded'}" for v in failed)),)))
    return sections


def _run_section(results: dict, sources: tuple[str, ...], notes: tuple[str, ...]) -> Section:
    ref, ev, settings = results["reference"], results["eval"], results["settings"]
    kinds = ev.get("kinds") or {}
    kind_text = ", ".join(f"{kind} {format_count(count)}" for kind, count in kinds.items()) or MISSING
    items = [
        f"reference: {ref['name']} ({ref['path']}, {ref.get('format') or MISSING})",
        f"eval set: {ev.get('source') or MISSING}, {format_count(ev.get('samples'))} samples ({kind_text}), "
        f"{format_count(ev.get('answer_tokens'))} answer tokens, {format_count(ev.get('images'))} images, "
        f"{format_count(ev.get('video_frames'))} video frames",
        "settings: " + ", ".join(f"{key} {_setting(value)}" for key, value in settings.items()),
        "versions: " + (", ".join(f"{name} {version}" for name, version in results["versions"].items()) or MISSING),
        "results files: " + ", ".join(sources),
        *notes,
    ]
    return Section("Run", (Bullets(tuple(items)),))


def _ship_section(variants: list[dict], reference: dict | None, ranking: Ranking) -> Section:
    by_name = {v["name"]: v for v in variants}
    blocks: list[Block] = []
    if not ranking.expressions:
        blocks.append("No thresholds were given, so no variant is picked: compare the Pareto front below "
                      "(mcq validate --fail-if adds threshold checks).")
    elif ranking.pick is None:
        blocks.append(f"No variant passes every threshold (fail if {_any_of(ranking.expressions)}).")
    else:
        pick = by_name[ranking.pick]
        text = (f"Ship {pick['name']}: the smallest variant that passes every threshold "
                f"(fail if {_any_of(ranking.expressions)}), at "
                f"{format_metric('bytes', pick['metrics'].get('bytes'))}")
        ref_bytes = reference["metrics"].get("bytes") if reference else None
        if reference is not None and pick is not reference and ref_bytes:
            text += f" ({pick['metrics']['bytes'] / ref_bytes * 100:.1f}% of {reference['name']})"
        text += f" with mean KL {format_metric('kl_mean', pick['metrics'].get('kl_mean'))}."
        blocks.append(text)
        passing = sorted((by_name[p] for p in ranking.eligible if p != ranking.pick),
                         key=lambda v: v["metrics"]["bytes"])
        if passing:
            blocks.append("Also passing every threshold, larger: " + ", ".join(v["name"] for v in passing) + ".")
    if ranking.front:
        blocks.append("Pareto front of size against mean KL (no other variant is both smaller and closer to the "
                      "reference), smallest first:")
        blocks.append(Bullets(tuple(
            f"{by_name[p]['name']}: {format_metric('bytes', by_name[p]['metrics'].get('bytes'))}, mean KL "
            f"{format_metric('kl_mean', by_name[p]['metrics'].get('kl_mean'))}" for p in ranking.front)))
    if ranking.dominated_by:
        blocks.append("Off the front: " + "; ".join(
            f"{by_name[p]['name']} (beaten by {by_name[w]['name']})" for p, w in ranking.dominated_by.items()) + ".")
    blocks.append(Plot("accuracy_size", "Mean KL against size, one point per variant (log scale above the "
                                        "smallest KL; the dashed line is the Pareto front, the ring the pick)."))
    return Section("Which variant to ship", tuple(blocks))


def _any_of(expressions: tuple[str, ...]) -> str:
    return " or ".join(expressions)


def _variants_section(variants: list[dict]) -> Section:
    rows = tuple((v["name"], v["path"], v.get("format") or MISSING, v.get("runtime") or MISSING,
                  v.get("recipe") or MISSING, v["status"]) for v in variants)
    blocks: list = [Table(("variant", "path", "format", "runtime", "recipe", "status"), rows, (False,) * 6)]
    # A runtime that cannot run some samples (GGUF: video) is scored on the rest; its metrics cover fewer samples.
    skipped = tuple(f"{v['name']}: not scored on {count} sample(s): {reason}" for v in variants
                    for reason, count in (v.get("skipped_samples") or {}).items())
    if skipped:
        blocks.append(Bullets(skipped))
    return Section("Variants", tuple(blocks))


def _metric_section(group: str, title: str, ok: list[dict]) -> Section:
    keys = [key for key, metric in METRICS.items() if metric.group == group]
    header = ["variant"] + [_column_title(key) for key in keys]
    rows = []
    for v in ok:
        metrics = v.get("metrics", {})
        if group == "latency":
            cells = [format_latency(k, metrics.get(k), v.get("spread", {}).get(k)) for k in keys]
        else:
            cells = [format_metric(k, metrics.get(k)) for k in keys]
        rows.append((v["name"], *cells))
    blocks: list[Block] = [Table(tuple(header), tuple(rows), (False,) + (True,) * len(keys))]
    if group == "latency":
        blocks.append("Latency cells: median (min–max over the timed runs).")
        blocks.append(Plot("latency", "Median latency and throughput per variant; error bars span min to max."))
    blocks.append(Bullets(tuple(f"{METRICS[k].label} ({METRICS[k].better} is better): {METRICS[k].description}"
                                for k in keys)))
    return Section(title, tuple(blocks))


def _column_title(key: str) -> str:
    metric = METRICS[key]
    return f"{metric.label} ({metric.unit})" if metric.unit and metric.unit != "bytes" else metric.label


def _components_section(ok: list[dict]) -> Section:
    present = [c for c in COMPONENTS if any(c in v.get("components", {}) for v in ok)]
    extra = sorted({c for v in ok for c in v.get("components", {})} - set(COMPONENTS))
    names = present + extra
    rows = []
    for v in ok:
        parts = v.get("components", {})
        cells = []
        for name in names:
            part = parts.get(name)
            if not part:
                cells.append(MISSING)
                continue
            bpw = part.get("bits_per_weight")
            cells.append(f"{format_bytes(part.get('bytes'))} ({MISSING if bpw is None else f'{bpw:.2f}'} bits/weight)")
        rows.append((v["name"], *cells))
    params = ok[0].get("components", {}) if ok else {}
    blocks: list[Block] = [Table(("variant", *names), tuple(rows), (False,) + (True,) * len(names))]
    if params:
        blocks.append("Parameters: " + ", ".join(f"{name} {_format_params(params[name].get('params'))}"
                                                 for name in names if name in params) + ".")
    return Section("Size per component", tuple(blocks))


def _kl_breakdown_section(results: dict, ok: list[dict]) -> Section:
    kinds = list(results["eval"].get("kinds") or {})
    kinds += sorted({k for v in ok for k in v.get("kl_by_kind", {})} - set(kinds))
    counts = results["eval"].get("kinds") or {}
    header = ("variant", "whole model", "vision path only",
              *(f"{kind} ({counts[kind]})" if kind in counts else kind for kind in kinds))
    rows = tuple((v["name"], format_metric("kl_mean", v.get("metrics", {}).get("kl_mean")),
                  format_metric("kl_mean", v.get("kl_vision_path")),
                  *(format_metric("kl_mean", v.get("kl_by_kind", {}).get(kind)) for kind in kinds)) for v in ok)
    return Section("Mean KL by part and sample kind", (
        "Whole model: every component is the variant's. Vision path only: the vision tower and resampler are the "
        "variant's, the LLM is the reference's. Per kind: mean KL over that kind of eval sample (count in "
        "brackets). Values in nats.",
        Table(header, rows, (False,) + (True,) * (len(header) - 1)),
        Plot("kl_parts", "Left: mean KL of the whole model beside the vision path alone. Right: mean KL by sample "
                         "kind. The reference is left out (its KL is 0 by construction)."),
    ))


def _thresholds_section(variants: list[dict], ranking: Ranking) -> Section:
    # mcq validate's thresholds are failure conditions (`--fail-if kl_mean>0.05`); `passed` is None where the
    # metric does not apply to the run.
    if not ranking.expressions:
        return Section("Thresholds", ("No thresholds were given.",))
    words = {True: "pass", False: "FAIL", None: "n/a"}
    rows = []
    for v in variants:
        checks = {t["expression"]: t for t in v.get("thresholds", [])}
        cells = [MISSING if (check := checks.get(e)) is None
                 else f"{words[check['passed']]} ({_threshold_value(e, check.get('value'))})"
                 for e in ranking.expressions]
        verdict = ("yes" if v["name"] in ranking.eligible
                   else "not checked" if not checks else "no")
        rows.append((v["name"], *cells, verdict))
    header = ("variant", *(f"fail if {e}" for e in ranking.expressions), "passes all")
    return Section("Thresholds", (
        f"{len(ranking.eligible)} of {len(variants)} variants pass every threshold. n/a: the metric does not "
        f"apply to this run (neither pass nor fail). {MISSING}: not checked (mcq validate checks the variants, "
        "not the reference), which does not count as passing.",
        Table(header, tuple(rows), (False,) + (True,) * (len(header) - 1)),
    ))
