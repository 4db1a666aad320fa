"""`mcq build` on the tiny model: one calibration for every variant, reuse of what did not change, failures that
stay with their variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcq.build import build
from mcq.cli import main
from mcq.models import families

# Small enough for CI: 4 calibration samples, 2 eval samples, short answers, one timed run.
PLAN = """
name: small
calibration: {num_samples: 4, max_slice_nums: 2}
validate: {num_samples: 2, max_new_tokens: 4, latency_runs: 1, fail_if: ["kl_mean>0.5"]}
variants:
  rtn:
    quantize: {method: rtn}
  onnx-int4:
    export: {format: onnx, precision: int4, from: rtn}
  gguf-q4_k_m:
    export: {format: gguf, quant: Q4_K_M}
"""


def _stats(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def first_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    plan = root / "plan.yaml"
    plan.write_text(PLAN)
    result = build("tiny:4.5", root / "out", plan=plan, progress=False)
    return root, plan, result


def test_build_makes_every_variant_and_one_report(first_build):
    root, _, result = first_build
    out = root / "out"
    assert result.failed == []
    assert [(v.name, v.status, v.validation) for v in result.variants] == [
        ("rtn", "built", "validated"), ("onnx-int4", "built", "validated"), ("gguf-q4_k_m", "built", "validated")]
    assert result.calibration["status"] == "encoded" and result.calibration["samples"] == 4
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["variants"]] == ["tiny:4.5", "rtn", "onnx-int4", "gguf-q4_k_m"]
    assert [row["format"] for row in results["variants"][1:]] == ["compressed-tensors", "onnx-int4", "gguf"]
    for row in results["variants"][1:]:
        assert row["status"] == "ok" and row["thresholds"][0]["passed"] is True
        assert 0 < row["metrics"]["kl_mean"] < 0.5
    assert (out / "report" / "report.html").is_file() and (out / "README.md").is_file()
    for name in ("rtn", "onnx-int4", "gguf-q4_k_m"):
        assert (out / "variants" / name / "mcq-manifest.json").is_file()
    # The ONNX variant carries the RTN variant's levels, not a re-quantization of the bf16 weights.
    assert json.loads((out / "variants" / "onnx-int4" / "mcq-manifest.json").read_text())["settings"]["from"] == "rtn"


def test_a_46_build_makes_its_formats_and_names_what_it_lacks(tmp_path, capsys, monkeypatch):
    """The same plan on 4.6, plus a Core ML variant, with 4.6 made a family without Core ML (as a newly added family
    may be): RTN, ONNX int4 from its levels and GGUF (with the calibration's importance matrix) built and gated in
    their runtimes; Core ML passed over with why — and asked for by name, an error. (4.6's own Core ML export:
    tests/export/test_coreml_minicpmv4_6.py.)"""
    monkeypatch.setitem(families.FAMILY_FORMATS, "minicpmv4_6", ("compressed-tensors", "bitsandbytes", "gguf", "onnx"))
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN + "  coreml:\n    export: {format: coreml, from: rtn}\n")
    result = build("tiny:4.6", tmp_path / "out", plan=plan, progress=False)
    assert result.version == "4.6" and result.failed == []
    assert [(v.name, v.status, v.validation) for v in result.variants] == [
        ("rtn", "built", "validated"), ("onnx-int4", "built", "validated"), ("gguf-q4_k_m", "built", "validated"),
        ("coreml", "not applicable", "none")]
    assert result.variants[3].error == "mcq writes no coreml for MiniCPM-V 4.6 yet"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["format"] for row in results["variants"][1:]] == ["compressed-tensors", "onnx-int4", "gguf"]
    for row in results["variants"][1:]:
        assert row["status"] == "ok" and 0 < row["metrics"]["kl_mean"] < 0.5
    assert main(["build", "--model", "tiny:4.6", "--out", str(tmp_path / "o2"), "--plan", str(plan),
                 "--only", "coreml"]) == 2
    assert capsys.readouterr().err.strip().endswith("--only coreml: mcq writes no coreml for MiniCPM-V 4.6 yet")


def test_gguf_from_the_cached_calibration_equals_a_direct_export(first_build, tmp_path):
    """The build's encoded set and importance matrix, read back from the cache, give the same bytes as
    `mcq export --format gguf` calibrating on its own with the same settings."""
    from mcq.export.gguf import export_gguf

    root, _, _ = first_build
    direct = export_gguf("tiny:4.5", tmp_path / "direct", quant="Q4_K_M", num_samples=4, progress=False)
    built = root / "out" / "variants" / "gguf-q4_k_m" / Path(direct.llm.path).name
    assert built.read_bytes() == Path(direct.llm.path).read_bytes()


def test_second_run_reuses_everything_and_new_gates_remeasure_nothing(first_build, tmp_path):
    root, plan, _ = first_build
    out = root / "out"
    before = _stats(out / "variants") | _stats(out / "validation")
    again = build("tiny:4.5", out, plan=plan, progress=False)
    assert [(v.status, v.validation) for v in again.variants] == [("reused", "reused")] * 3
    assert again.calibration["status"] == "not needed"
    assert _stats(out / "variants") | _stats(out / "validation") == before

    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(PLAN.replace('fail_if: ["kl_mean>0.5"]', 'fail_if: ["kl_mean>0.0"]'))
    gated = build("tiny:4.5", out, plan=stricter, progress=False)
    assert [v.validation for v in gated.variants] == ["reused"] * 3
    assert gated.failed == ["rtn", "onnx-int4", "gguf-q4_k_m"]
    assert _stats(out / "variants") | _stats(out / "validation") == before


def test_a_changed_variant_rebuilds_it_and_what_exports_from_it(first_build, tmp_path):
    root, _, _ = first_build
    out = tmp_path / "copy"
    import shutil

    shutil.copytree(root / "out", out)
    changed = tmp_path / "changed.yaml"
    changed.write_text(PLAN.replace("quantize: {method: rtn}", "quantize: {recipe: rtn-w4g128}"))
    result = build("tiny:4.5", out, plan=changed, validate=False, progress=False)
    assert [(v.name, v.status) for v in result.variants] == [
        ("rtn", "built"), ("onnx-int4", "built"), ("gguf-q4_k_m", "reused")]


@pytest.fixture()
def edited_mcq(tmp_path, monkeypatch):
    """A copy of mcq's source that the build's code digests read instead of the real one: editing a file of the
    copy changes the keys exactly as editing mcq would, while the real code still runs."""
    import shutil

    import mcq
    from mcq import outputs

    copy = tmp_path / "mcq-source"
    shutil.copytree(Path(mcq.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    outputs.source_digest.cache_clear()
    monkeypatch.setattr(outputs, "_PACKAGE_DIR", copy)

    def edit(relative: str) -> None:
        with open(copy / relative, "a", encoding="utf-8") as source:
            source.write("\n# an edit\n")
        outputs.source_digest.cache_clear()

    yield edit
    outputs.source_digest.cache_clear()


def _copy_build(first_build, tmp_path) -> Path:
    import shutil

    root, _, _ = first_build
    out = tmp_path / "copy"
    shutil.copytree(root / "out", out)
    return out


def test_an_exporter_edit_rebuilds_and_revalidates_its_variants_only(first_build, edited_mcq, tmp_path):
    _, plan, _ = first_build
    out = _copy_build(first_build, tmp_path)
    unchanged = build("tiny:4.5", out, plan=plan, progress=False)     # the copy digests like the real source
    assert [(v.status, v.validation) for v in unchanged.variants] == [("reused", "reused")] * 3
    before = _stats(out / "validation")
    edited_mcq("export/onnx/traced.py")
    result = build("tiny:4.5", out, plan=plan, progress=False)
    assert [(v.name, v.status, v.validation) for v in result.variants] == [
        ("rtn", "reused", "reused"), ("onnx-int4", "built", "validated"), ("gguf-q4_k_m", "reused", "reused")]
    assert result.calibration["status"] == "not needed"
    after = _stats(out / "validation")
    assert {name for name in before if before[name] != after[name]} == {"onnx-int4.json"}


def test_a_synthetic_data_edit_recalibrates_and_rebuilds_what_read_it(first_build, edited_mcq, tmp_path):
    _, plan, _ = first_build
    out = _copy_build(first_build, tmp_path)
    edited_mcq("calibration/synthetic.py")
    result = build("tiny:4.5", out, plan=plan, progress=False)
    # RTN reads no data and the ONNX variant exports its levels: only the GGUF K-quant's importance matrix read the
    # calibration set. Every variant was measured on the built-in eval set, which the same generator makes.
    assert [(v.name, v.status, v.validation) for v in result.variants] == [
        ("rtn", "reused", "validated"), ("onnx-int4", "reused", "validated"), ("gguf-q4_k_m", "built", "validated")]
    assert result.calibration["status"] == "encoded"


def test_keys_name_the_code_pillow_and_the_data_generator(monkeypatch, edited_mcq):
    from importlib import metadata

    from mcq.build import digest

    index = digest.DigestIndex(Path("/nonexistent"))
    builtin = digest.data_digest(index, None)
    assert builtin == digest.data_digest(index, "builtin") and builtin.startswith("builtin-")
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.0" if name == "pillow" else real_version(name))
    assert digest.data_digest(index, None) != builtin            # another Pillow renders other pixels
    monkeypatch.setattr(metadata, "version", real_version)
    keys = {step: digest.code_key(step) for step in digest.STEP_SOURCES}
    edited_mcq("calibration/synthetic.py")
    assert digest.data_digest(index, None) != builtin
    assert {step for step, key in keys.items() if digest.code_key(step) != key} == {"calibration", "validation"}


def test_a_failed_write_leaves_the_build_folder_as_it_was(tmp_path, monkeypatch):
    """The build folder is updated in place: a write that fails (a full disk) keeps the old file and leaves no
    temporary one beside it."""
    import os

    from mcq.build import api

    state = tmp_path / api.STATE_FILE
    api._write_json(state, {"format": api.STATE_FORMAT, "variants": {}})
    before = state.read_bytes()

    def full_disk(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        api._write_json(state, {"format": api.STATE_FORMAT, "variants": {"a": {}}})
    assert [p.name for p in tmp_path.iterdir()] == [api.STATE_FILE] and state.read_bytes() == before


def test_a_failed_variant_is_reported_and_the_others_finish(tmp_path, capsys):
    recipe = tmp_path / "strict.yaml"
    # The tiny vision fc2 has 464 = 16 x 29 inputs: group 128 with non_divisible: error refuses it.
    recipe.write_text("method: rtn\nrules:\n  - match: '.'\n    bits: 4\n    non_divisible: error\n")
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
validate: {{num_samples: 2, max_new_tokens: 4, latency_runs: 1, fail_if: ["kl_mean>0.5"]}}
variants:
  strict:
    quantize: {{recipe: {recipe}}}
  onnx-strict:
    export: {{format: onnx, precision: int4, from: strict}}
  gguf-q8:
    export: {{format: gguf, quant: Q8_0}}
""")
    code = main(["build", "--model", "tiny:4.5", "--out", str(tmp_path / "out"), "--plan", str(plan), "--json"])
    captured = capsys.readouterr()
    assert code == 1 and "2 variant(s) failed: strict, onnx-strict" in captured.err
    printed = json.loads(captured.out)
    by_name = {v["name"]: v for v in printed["variants"]}
    assert "464" in by_name["strict"]["error"] and by_name["onnx-strict"]["error"] == "needs strict, which failed"
    assert by_name["gguf-q8"]["status"] == "built" and by_name["gguf-q8"]["validation"] == "validated"
    assert "Traceback" in (tmp_path / "out" / "logs" / "strict.log").read_text()
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["variants"]
    assert [(r["name"], r["status"]) for r in rows] == [
        ("tiny:4.5", "ok"), ("strict", "failed"), ("onnx-strict", "failed"), ("gguf-q8", "ok")]
    assert "strict" in (tmp_path / "out" / "report" / "report.md").read_text()


@pytest.mark.parametrize("option", ["--calib", "--eval"])
def test_missing_data_fails_before_any_build(tmp_path, capsys, option):
    assert main(["build", "--model", "tiny:4.5", "--out", str(tmp_path / "b"), option, str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_build_refuses_a_folder_that_is_not_a_build(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["build", "--model", "tiny:4.5", "--out", str(tmp_path / "taken"), "--only", "gguf",
                 "--no-validate"]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_matrix_run_builds_gates_and_reports_each_version(tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("""
validate: {num_samples: 2, max_new_tokens: 4, latency_runs: 1, fail_if: ["kl_mean>0.5"]}
variants:
  rtn: {quantize: {method: rtn}}
  rtn8: {quantize: {recipe: rtn-w8}, fail_if: ["kl_mean>0.0"]}
""")
    code = main(["matrix", "--run", "--plan", str(plan), "--versions", "4.5", "--out", str(tmp_path / "m"), "--json"])
    run = json.loads(capsys.readouterr().out)
    # The two variants have different gates: two jobs; the second one's gate cannot be met (KL is never 0 here).
    assert code == 1 and run["failed"] == ["4.5-compressed-tensors-2"]
    assert [(e["job"], e["variants"], e["status"]) for e in run["entries"]] == [
        ("4.5-compressed-tensors", "build/variants/rtn", "ok"),
        ("4.5-compressed-tensors-2", "build/variants/rtn8", "failed")]
    assert sorted(p.name for p in (tmp_path / "m" / "results").iterdir()) == [
        "4.5-compressed-tensors-2.json", "4.5-compressed-tensors.json"]
    report = json.loads((tmp_path / "m" / "report-4.5" / "results.json").read_text())
    assert [row["name"] for row in report["variants"]] == ["tiny:4.5", "rtn", "rtn8"]
