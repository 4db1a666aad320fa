"""Build plans, the CI matrix they give, and the workflow file that must hold that matrix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mcq.build.matrix import matrix_entries
from mcq.build.plan import FORMATS, load_plan
from mcq.errors import McqError
from mcq.models import families

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "ci.yml"


def _plan(tmp_path, text: str):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return load_plan(path)


def test_default_plan_covers_every_format_and_exports_from_awq():
    plan = load_plan()
    assert {v.format for v in plan.variants} == set(FORMATS)
    assert plan.variant("onnx-int4").source == "awq" and plan.variant("coreml").source == "awq"
    assert plan.variant("coreml").versions == ("2.6", "4.0", "4.5", "4.6")   # 4.0 and 4.6 included
    # 4.6 by default where mcq writes its format for it: every format
    assert {v.format for v in plan.variants if "4.6" in v.versions} == set(FORMATS)
    assert all(v.fail_if for v in plan.variants)


def test_select_by_format_adds_what_a_variant_exports_from(tmp_path):
    plan = load_plan()
    assert [v.name for v in plan.select(["onnx"])] == ["awq", "onnx-int4"]
    assert [v.name for v in plan.select(["gguf", "bnb-nf4"])] == ["bnb-nf4", "gguf-q4_k_m"]
    narrowed = _plan(tmp_path, "variants:\n  awq:\n    quantize: {method: awq}\n  coreml:\n"
                               "    export: {format: coreml, from: awq}\n    versions: ['2.6', '4.5']\n")
    assert [v.name for v in narrowed.select(version="4.0")] == ["awq"]
    assert [v.name for v in narrowed.select(version="4.5")] == ["awq", "coreml"]
    with pytest.raises(McqError, match="--only tflite: not a format"):
        plan.select(["tflite"])


@pytest.mark.parametrize(("text", "message"), [
    ("variants: {a: {quantize: {method: awq}, colour: red}}", "variants.a: unknown key 'colour'"),
    ("variants: {a: {quantize: {method: awq}, export: {format: onnx}}}", "exactly one of quantize or export"),
    ("variants: {a: {quantize: {method: zip}}}", "unknown method 'zip'"),
    ("variants: {a: {export: {format: onnx, from: b}}, b: {quantize: {method: rtn}}}",
     "'b' is not a variant listed before a"),
    ("variants: {a: {export: {format: gguf, quant: Q3_X}}}", "variants.a.export: quant 'Q3_X' is not a type"),
    ("variants: {a: {export: {format: coreml, target: iOS17}}}", "needs --target iOS18"),
    ("variants: {a: {export: {format: onnx, precision: int4, colour: red}}}", "unknown key 'colour'"),
    ("variants: {a: {export: {format: onnx, block_size: 64}}}", "export: --block-size applies to int4 and int8"),
    ("variants: {a: {quantize: {method: rtn}}, b: {export: {format: onnx, precision: int4, from: a, block_size: 64}}}",
     "variants.b.export: --block-size does not apply with --from"),
    ("variants: {a: {quantize: {method: rtn}, fail_if: ['kl>1']}}", "unknown metric 'kl'"),
    ("variants: {a: {quantize: {method: rtn}, versions: ['5.0']}}", "versions: a list of MiniCPM-V versions"),
    ("calibration: {num_samples: 0}\nvariants: {a: {quantize: {method: rtn}}}", "calibration.num_samples: must be"),
    ("variants: {}", "name at least one variant"),
    ("variants: {'../x': {quantize: {method: rtn}}}", "a variant name is a folder name"),
])
def test_bad_plans_name_the_key(tmp_path, text, message):
    with pytest.raises(McqError, match=message.replace("(", r"\(").replace("[", r"\[")):
        _plan(tmp_path, text)


def test_a_release_lacking_the_format_is_refused_by_name(tmp_path, monkeypatch):
    """A family mcq writes fewer formats for (every family has them all today: 4.6 made one here) is left out of a
    variant's default versions, and naming its release is an error."""
    monkeypatch.setitem(families.FAMILY_FORMATS, "minicpmv4_6", tuple(f for f in FORMATS if f != "coreml"))
    assert _plan(tmp_path, "variants: {a: {export: {format: coreml}}}").variant("a").versions == ("2.6", "4.0", "4.5")
    with pytest.raises(McqError, match=r"variants\.a\.versions: mcq writes no coreml for MiniCPM-V 4\.6 yet"):
        _plan(tmp_path, "variants: {a: {export: {format: coreml}, versions: ['4.5', '4.6']}}")


@pytest.mark.parametrize("text", [
    # The same variant twice: PyYAML would keep the second and drop the rtn variant without a word.
    "variants:\n  a: {quantize: {method: rtn}}\n  a: {quantize: {method: awq}}\n",
    "validate: {max_new_tokens: 8, max_new_tokens: 64}\nvariants: {a: {quantize: {method: rtn}}}\n",
])
def test_a_key_given_twice_is_refused_with_its_line(tmp_path, text, capsys):
    with pytest.raises(McqError, match=r"plan .*plan\.yaml is not valid YAML: duplicate key '(a|max_new_tokens)' "
                                       r"\(line \d+, column \d+\)$"):
        _plan(tmp_path, text)
    from mcq.cli import main

    assert main(["build", "--model", "tiny:4.5", "--out", str(tmp_path / "out"), "--plan",
                 str(tmp_path / "plan.yaml")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("mcq: error: plan ") and "duplicate key" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_per_variant_gates_replace_the_default_and_split_matrix_entries(tmp_path):
    plan = _plan(tmp_path, """
validate: {fail_if: ["kl_mean>0.1"], latency_runs: 2}
variants:
  awq: {quantize: {method: awq}}
  gptq: {quantize: {method: gptq}, fail_if: ["kl_mean>0.2", "top1_agreement<0.5"]}
""")
    entries = matrix_entries(plan, ["4.5"])
    assert [(e["job"], e["variants"], e["fail_if"]) for e in entries] == [
        ("4.5-compressed-tensors", "build/variants/awq", "kl_mean>0.1"),
        ("4.5-compressed-tensors-2", "build/variants/gptq", "kl_mean>0.2,top1_agreement<0.5")]
    assert entries[0]["validate"] == "--max-slice-nums 2 --max-new-tokens 24 --latency-runs 2"


def test_workflow_matrix_is_the_one_mcq_matrix_emits():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    variants = jobs["variants"]
    assert variants["strategy"]["matrix"]["include"] == matrix_entries(load_plan())
    assert variants["needs"] == "tests" and jobs["report"]["needs"] == "variants"
    merge = next(step["run"] for step in jobs["report"]["steps"] if step.get("name") == "Merge")
    versions = dict.fromkeys(entry["version"] for entry in matrix_entries(load_plan()))
    assert f"for version in {' '.join(versions)}; do" in merge     # one report per version the matrix builds
    steps = "\n".join(step.get("run", "") for step in variants["steps"])
    # The job builds the entry's format and gates the entry's variants with the entry's gates and settings.
    assert '--only "${{ matrix.format }}"' in steps and "--out build " in steps
    assert "--variant ${{ matrix.variants }}" in steps and '--fail-if "${{ matrix.fail_if }}"' in steps
    assert "${{ matrix.validate }}" in steps and '--json "results/${{ matrix.job }}.json"' in steps
    assert "bash .ci/run" in jobs["tests"]["steps"][-1]["run"]
    assert any("tests/export/test_coreml.py" in step.get("run", "") for step in jobs["coreml-macos"]["steps"])


def test_emit_github_prints_the_matrix(capsys):
    import json

    from mcq.cli import main

    assert main(["matrix", "--emit-github", "--versions", "4.5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["include"] == matrix_entries(load_plan(), ["4.5"])
    assert {e["format"] for e in printed["include"]} == set(FORMATS)
