"""The report's three plots, drawn with matplotlib as SVG text.

Only `matplotlib.figure.Figure` is used, never pyplot: pyplot picks an interactive backend and keeps figures in
global state, while a bare Figure renders straight to the SVG backend, so no GUI toolkit is ever touched. Each plot
is drawn under matplotlib's default style (a user's matplotlibrc cannot change the report), with a fixed
`svg.hashsalt` and no date, so the same numbers give the same bytes.
"""

from __future__ import annotations

import io
import math

import matplotlib
import matplotlib.style
from matplotlib.colors import LogNorm, Normalize, to_hex
from matplotlib.figure import Figure

from mcq.reports.ranking import Ranking
from mcq.validate.results import LATENCY_KEYS, METRICS

_REFERENCE_COLOR = "#555555"
_RC = {"font.size": 9, "svg.fonttype": "path", "axes.spines.top": False, "axes.spines.right": False}


def draw_plots(variants: list[dict], ranking: Ranking, reference: dict | None) -> dict[str, str]:
    """SVG text of each plot, keyed by the names content.Plot blocks use. `reference`: the reference's row."""
    ok = [v for v in variants if v["status"] == "ok"]
    colors = {v["name"]: _REFERENCE_COLOR for v in ok if v is reference}
    # The others take tab10's colours in input order: a variant keeps its colour across the plots.
    palette = matplotlib.colormaps["tab10"].colors
    others = [v for v in ok if v is not reference]
    colors |= {v["name"]: to_hex(palette[i % len(palette)]) for i, v in enumerate(others)}
    drawers = {"accuracy_size": lambda fig: _accuracy_size(fig, ok, ranking, colors),
               "kl_parts": lambda fig: _kl_parts(fig, others, colors),
               "latency": lambda fig: _latency(fig, ok, colors)}
    sizes = {"accuracy_size": (7.5, 4.5), "kl_parts": (10, 4.2), "latency": (10, 3.8)}
    svgs = {}
    for name, draw in drawers.items():
        # A fixed salt: without one, matplotlib salts its clip-path and hatch ids with a random uuid.
        with matplotlib.style.context("default"), matplotlib.rc_context({**_RC, "svg.hashsalt": "mcq-report"}):
            fig = Figure(figsize=sizes[name], layout="constrained")
            draw(fig)
            buffer = io.StringIO()
            fig.savefig(buffer, format="svg", metadata={"Date": None})
        svgs[name] = buffer.getvalue()
    return svgs


def _text(value: str) -> str:
    # Names come from the results file: a `$` would start mathtext (and an unbalanced one raises).
    return value.replace("$", r"\$")


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.set_xticks([])
    ax.set_yticks([])


def _accuracy_size(fig: Figure, ok: list[dict], ranking: Ranking, colors: dict[str, str]) -> None:
    ax = fig.add_subplot()
    points = [v for v in ok if v["metrics"].get("bytes") is not None and v["metrics"].get("kl_mean") is not None]
    ax.set_title("Mean KL against size")
    if not points:
        _empty(ax, "no variant has both a size and a mean KL")
        return
    scale, unit = (1 << 30, "GiB") if max(v["metrics"]["bytes"] for v in points) >= 1 << 30 else (1 << 20, "MiB")
    xs = {v["name"]: v["metrics"]["bytes"] / scale for v in points}
    ys = {v["name"]: v["metrics"]["kl_mean"] for v in points}
    positive = [y for y in ys.values() if y > 0]
    if positive:
        # Log above the decade of the smallest positive KL, linear below it, so KL 0 (the reference) stays on the
        # plot at the bottom of the axis.
        ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(min(positive))), linscale=0.3)
    front = [p for p in ranking.front if p in xs]
    if len(front) > 1:
        ax.plot([xs[p] for p in front], [ys[p] for p in front], "--", color="#999999", zorder=1,
                label="Pareto front")
    left_labels = _left_labels(points, xs, ys)
    for v in points:
        x, y = xs[v["name"]], ys[v["name"]]
        ax.scatter([x], [y], s=40, color=colors[v["name"]], zorder=3)
        left = v["name"] in left_labels
        ax.annotate(_text(v["name"]), (x, y), xytext=(-6 if left else 6, 4), textcoords="offset points",
                    ha="right" if left else "left", fontsize=8)
    if ranking.pick in xs:
        ax.scatter([xs[ranking.pick]], [ys[ranking.pick]], s=220, facecolors="none", edgecolors="#d62728",
                   linewidths=1.5, zorder=2, label="pick")
    ax.set_xlabel(f"size ({unit})")
    ax.set_ylabel("mean KL (nats)")
    ax.margins(x=0.15, y=0.15)
    if positive:
        # KL is never negative: end the axis just below 0 (room for the reference's marker), not at -linthresh.
        ax.set_ylim(bottom=-0.3 * ax.yaxis.get_transform().linthresh)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", frameon=False)


def _left_labels(points: list[dict], xs: dict[str, float], ys: dict[str, float]) -> set[str]:
    """Variants whose label goes left of their point: int4 variants of one model differ in size by well under 1%,
    so their labels would print over each other. Within each run of points closer than 3% of the x range, labels
    alternate right and left going up in KL."""
    span = (max(xs.values()) - min(xs.values())) or 1.0
    ordered = sorted(points, key=lambda v: (xs[v["name"]], ys[v["name"]]))
    clusters: list[list[dict]] = []
    for v in ordered:
        if clusters and xs[v["name"]] - xs[clusters[-1][-1]["name"]] < 0.03 * span:
            clusters[-1].append(v)
        else:
            clusters.append([v])
    return {v["name"] for cluster in clusters
            for i, v in enumerate(sorted(cluster, key=lambda v: ys[v["name"]])) if i % 2}


def _kl_parts(fig: Figure, variants: list[dict], colors: dict[str, str]) -> None:
    # The reference is left out: its KL is 0 by construction.
    left, right = fig.subplots(1, 2, width_ratios=(1, 1.2))
    rows = [(v, v["metrics"].get("kl_mean"), v.get("kl_vision_path")) for v in variants]
    rows = [r for r in rows if r[1] is not None or r[2] is not None]
    left.set_title("Mean KL: whole model and vision path")
    if not rows:
        _empty(left, "no KL measured")
    else:
        positions = range(len(rows))
        width = 0.38
        whole = [r[1] or 0 for r in rows]
        vision = [r[2] or 0 for r in rows]
        left.bar([p - width / 2 for p in positions], whole, width, color=[colors[r[0]["name"]] for r in rows],
                 label="whole model")
        left.bar([p + width / 2 for p in positions], vision, width, color=[colors[r[0]["name"]] for r in rows],
                 alpha=0.45, hatch="//", edgecolor="#333333", linewidth=0.5, label="vision path only")
        values = [y for y in whole + vision if y > 0]
        if values and all(y > 0 for r in rows for y in (r[1], r[2]) if y is not None):
            left.set_yscale("log")
        left.set_xticks(list(positions), [_text(r[0]["name"]) for r in rows], rotation=25, ha="right")
        left.set_ylabel("mean KL (nats)")
        left.legend(frameon=False, fontsize=8)

    kinds = list(dict.fromkeys(k for v in variants for k in v.get("kl_by_kind", {})))
    right.set_title("Mean KL by sample kind")
    grid_rows = [v for v in variants if v.get("kl_by_kind")]
    if not kinds or not grid_rows:
        _empty(right, "no KL by sample kind")
        return
    grid = [[math.nan if v["kl_by_kind"].get(k) is None else v["kl_by_kind"][k] for k in kinds] for v in grid_rows]
    finite = [x for row in grid for x in row if not math.isnan(x)]
    positive = [x for x in finite if x > 0]
    norm = (LogNorm(min(positive), max(positive)) if positive and len(positive) == len(finite)
            else Normalize(min(finite, default=0), max(finite, default=1)))
    image = right.imshow(grid, cmap="viridis", norm=norm, aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            label = "–" if math.isnan(value) else f"{value:.3g}"
            shade = 0.0 if math.isnan(value) else norm(value)
            right.text(j, i, label, ha="center", va="center", fontsize=7,
                       color="black" if shade > 0.6 else "white")
    right.set_xticks(range(len(kinds)), [_text(k) for k in kinds], rotation=25, ha="right")
    right.set_yticks(range(len(grid_rows)), [_text(v["name"]) for v in grid_rows])
    right.spines[:].set_visible(False)
    fig.colorbar(image, ax=right, label="mean KL (nats)")


def _latency(fig: Figure, ok: list[dict], colors: dict[str, str]) -> None:
    axes = fig.subplots(1, len(LATENCY_KEYS))
    for ax, key in zip(axes, LATENCY_KEYS):
        metric = METRICS[key]
        ax.set_title(f"{metric.label} ({metric.unit}, {metric.better} is better)")
        bars = [v for v in ok if v["metrics"].get(key) is not None]
        if not bars:
            _empty(ax, "not measured")
            continue
        heights = [v["metrics"][key] for v in bars]
        low, high = [], []
        for v, height in zip(bars, heights):
            spread = v.get("spread", {}).get(key) or {}
            low.append(max(height - spread["min"], 0) if spread.get("min") is not None else 0)
            high.append(max(spread["max"] - height, 0) if spread.get("max") is not None else 0)
        ax.bar(range(len(bars)), heights, color=[colors[v["name"]] for v in bars], yerr=[low, high], capsize=3,
               error_kw={"elinewidth": 1, "ecolor": "#222222"})
        ax.set_xticks(range(len(bars)), [_text(v["name"]) for v in bars], rotation=25, ha="right")
        ax.set_ylabel(metric.unit)
