"""`mcq validate` end to end on the tiny outlier model, and its refusals of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mcq.cli import main
from mcq.errors import McqError
from mcq.models.loading import weight_files
from mcq.validate.api import parse_threshold
from mcq.validate.results import FORMAT, METRICS

REFERENCE = "tiny:4.5-outliers"


def rewrite_shards(variant: Path, change) -> None:
    """Rewrite every safetensors shard of `variant` with `change(name, tensor)` (None drops the tensor) applied."""
    index_file = variant / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    for shard in weight_files(variant):
        with safe_open(shard, "pt") as handle:
            tensors = {name: change(name, handle.get_tensor(name)) for name in handle.keys()}
        kept = {name: tensor for name, tensor in tensors.items() if tensor is not None}
        save_file(kept, str(shard), metadata={"format": "pt"})
        if index is not None:
            for name in set(tensors) - set(kept):
                del index["weight_map"][name]
    if index is not None:
        index_file.write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module")
def variants(outlier_variants, tmp_path_factory):
    from mcq.quantize.api import quantize

    root = tmp_path_factory.mktemp("validate")
    int8 = Path(quantize(REFERENCE, root / "int8", recipe="rtn-w8", progress=False).out)
    # Every LLM Linear's scales zeroed: its weights dequantize to 0, the model still loads and runs.
    zeroed = root / "zeroed"
    shutil.copytree(outlier_variants["rtn"], zeroed)
    rewrite_shards(zeroed, lambda name, t: torch.zeros_like(t) if name.startswith("llm.") and
                   name.endswith("weight_scale") else t)
    # A tensor the layout requires is gone: loading fails inside the variant's own process.
    broken = root / "broken"
    shutil.copytree(outlier_variants["gptq"], broken)
    rewrite_shards(broken, lambda name, t: None if name == "llm.model.norm.weight" else t)
    return {"int8": int8, **outlier_variants, "zeroed": zeroed, "broken": broken}


@pytest.fixture(scope="module")
def validated(variants, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "results.json"
    order = ["int8", "awq", "gptq", "rtn", "zeroed", "broken"]
    code = main(["validate", "--reference", REFERENCE, "--variant", *[str(variants[n]) for n in order],
                 "--fail-if", "kl_mean>0.05", "--latency-runs", "2", "--json", str(out)])
    results = json.loads(out.read_text())
    return code, {row["name"]: row for row in results["variants"]}, results


@pytest.mark.slow
def test_ranks_bf16_int8_calibrated_w4_rtn_w4_by_mean_kl(validated):
    _, rows, results = validated
    assert results["format"] == FORMAT
    kl = {name: row["metrics"]["kl_mean"] for name, row in rows.items()}
    assert kl[REFERENCE] == 0.0
    assert kl[REFERENCE] < kl["int8"] < min(kl["awq"], kl["gptq"]) <= max(kl["awq"], kl["gptq"]) < kl["rtn"], kl
    for name in ("int8", "awq", "gptq", "rtn"):
        metrics = rows[name]["metrics"]
        assert set(metrics) == set(METRICS)
        assert metrics["vision_cosine"] > 0.97 and 0 < metrics["top1_agreement"] <= 1
        assert metrics["ppl"] > 0 and metrics["peak_rss_load"] > 0 and metrics["decode_tok_s"] > 0
        assert rows[name]["kl_vision_path"] is not None
    # The vision path alone: RTN's vision tower costs more than GPTQ's.
    assert rows["rtn"]["kl_vision_path"] > rows["gptq"]["kl_vision_path"]
    assert rows["awq"]["runtime"].startswith("transformers ") and "dequantized at load" in rows["awq"]["runtime"]
    assert rows[REFERENCE]["metrics"]["ppl_delta"] == 0.0
    assert rows[REFERENCE]["metrics"]["gen_exact_match"] == 1.0


@pytest.mark.slow
def test_sizes_agree_with_bits_per_weight(validated):
    _, rows, _ = validated
    params = sum(c["params"] for c in rows[REFERENCE]["components"].values())
    for row in rows.values():
        metrics = row["metrics"]
        assert metrics["bits_per_weight"] == pytest.approx(8 * metrics["bytes"] / params)
        assert sum(c["bytes"] for c in row["components"].values()) == metrics["bytes"]
    bits = {name: row["metrics"]["bits_per_weight"] for name, row in rows.items()}
    assert bits[REFERENCE] == pytest.approx(16)          # every tensor stored in bf16
    assert bits[REFERENCE] > bits["int8"] > bits["awq"]
    # Per component too (on tiny widths the bf16 embeddings and position table weigh more than the Linears).
    for component in ("llm", "vision", "resampler"):
        ours, theirs = rows["gptq"]["components"][component], rows[REFERENCE]["components"][component]
        assert ours["params"] == theirs["params"] and ours["bits_per_weight"] < theirs["bits_per_weight"] == 16


@pytest.mark.slow
def test_fail_if_flags_the_zeroed_variant_and_a_crash_is_reported_not_fatal(validated):
    code, rows, _ = validated
    assert code == 1
    assert rows["zeroed"]["status"] == "ok"
    assert rows["zeroed"]["thresholds"] == [{"expression": "kl_mean>0.05", "value": rows["zeroed"]["metrics"][
        "kl_mean"], "passed": False}]
    for name in ("int8", "awq", "gptq", "rtn"):
        assert [check["passed"] for check in rows[name]["thresholds"]] == [True]
    assert rows["broken"]["status"] == "failed"
    assert "llm.model.norm.weight" in rows["broken"]["error"] or "layout" in rows["broken"]["error"]
    assert rows["broken"]["metrics"]["kl_mean"] is None and rows["broken"]["metrics"]["bytes"] > 0


def test_threshold_parsing():
    threshold = parse_threshold("kl_mean>0.05")
    assert threshold.fails(0.06) and not threshold.fails(0.05)
    assert parse_threshold(" top1_agreement <= 0.9 ").fails(0.9)
    for bad, message in (("kl>0.05", "unknown metric"), ("kl_mean=0.05", "METRIC>VALUE"), ("kl_mean>1e999", "finite")):
        with pytest.raises(McqError, match=message):
            parse_threshold(bad)


@pytest.fixture(scope="module")
def gptq_variant(outlier_variants):
    return str(outlier_variants["gptq"])


@pytest.mark.parametrize("args, message", [
    (["--variant", "{missing}"], "does not exist"),
    (["--variant", "{not_a_model}"], "not in a format mcq validates"),
    (["--variant", "{awq_format}"], "not in a format mcq validates"),
    (["--variant", "tiny:2.6"], "not a variant of the reference"),
    (["--variant", "{gptq}", "--eval", "{missing}"], "does not exist"),
    (["--variant", "{gptq}", "--eval", "{bad_eval}"], "bad.jsonl"),
    (["--variant", "{gptq}", "--fail-if", "speed>1"], "unknown metric"),
    (["--variant", "{gptq}", "--json", "{existing}"], "already exists"),
    (["--variant", "{gptq}", "--device", "tpu"], "unknown device"),
])
def test_bad_input_is_one_line_exit_2(args, message, gptq_variant, tmp_path, capsys):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    awq_format = tmp_path / "official_awq"
    shutil.copytree(gptq_variant, awq_format)
    config = json.loads((awq_format / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (awq_format / "config.json").write_text(json.dumps(config))
    bad_eval = tmp_path / "bad_eval"
    bad_eval.mkdir()
    (bad_eval / "bad.jsonl").write_text("{not json\n")
    existing = tmp_path / "existing.json"
    existing.write_text("{}")
    names = {"missing": tmp_path / "missing", "not_a_model": not_a_model, "awq_format": awq_format,
             "gptq": gptq_variant, "bad_eval": bad_eval, "existing": existing}
    code = main(["validate", "--reference", REFERENCE, *[a.format(**names) for a in args]])
    err = capsys.readouterr().err.strip()
    assert code == 2
    # The last line is the error; anything before it is a progress bar (a tiny model built on first use).
    assert "Traceback" not in err and err.splitlines()[-1].startswith("mcq: error: ") and message in err, err


def test_variant_quantized_from_other_weights_is_refused(gptq_variant, capsys):
    assert main(["validate", "--reference", "tiny:4.5", "--variant", gptq_variant]) == 2
    assert "quantized from other weights" in capsys.readouterr().err


@pytest.mark.parametrize("manifest", ['{"source": {"files": {"model', '["not", "an", "object"]',
                                      '{"source": {"files": ["model.safetensors"]}}', b"\xff\xfe"],
                         ids=["truncated", "not-an-object", "files-not-a-mapping", "not-utf8"])
def test_an_unreadable_manifest_is_refused_not_skipped(gptq_variant, manifest, tmp_path, capsys):
    """The provenance check cannot run without the manifest: exit 2 before any model run, rather than measuring a
    variant whose weights may come from another model."""
    variant = tmp_path / "gptq"
    shutil.copytree(gptq_variant, variant)
    target = variant / "mcq-manifest.json"
    target.write_bytes(manifest) if isinstance(manifest, bytes) else target.write_text(manifest)
    assert main(["validate", "--reference", REFERENCE, "--variant", str(variant), "--latency-runs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"mcq: error: {target} is unreadable, so {variant} cannot be checked against the "
                       "reference's weights; write the variant again with mcq")


def test_quantized_reference_is_refused(gptq_variant, capsys):
    assert main(["validate", "--reference", gptq_variant, "--variant", gptq_variant]) == 2
    assert "pass the original" in capsys.readouterr().err


@pytest.fixture(scope="module")
def rtn_tiny(tmp_path_factory):
    from mcq.quantize.api import quantize

    return str(quantize("tiny:4.5", tmp_path_factory.mktemp("rtn") / "rtn", method="rtn", progress=False).out)


def test_mapped_weights_give_the_resident_numbers(rtn_tiny, monkeypatch):
    """A model too large for the machine runs from its mapped checkpoint (a Linear cast or dequantized a block at a
    time): the reference and a compressed-tensors variant score exactly what they score with resident weights."""
    from mcq.validate import api
    from mcq.validate.runners import transformers_runner

    options = {"num_samples": 3, "max_new_tokens": 6, "latency_runs": 1, "progress": False}
    resident = api.validate("tiny:4.5", [rtn_tiny], **options)
    monkeypatch.setattr(transformers_runner, "RESIDENT_SHARE", 0.0)    # nothing fits: every weight mapped
    environments, run_worker = [], api._run_worker

    def recording(job, workdir, label, python, environment=None):
        environments.append(environment)
        return run_worker(job, workdir, label, python, environment)
    monkeypatch.setattr(api, "_run_worker", recording)
    mapped = api.validate("tiny:4.5", [rtn_tiny], **options)
    # every worker (reference, variant, vision path) waits passively between its many short parallel ops
    assert environments == [{"OMP_WAIT_POLICY": "PASSIVE"}] * 3
    for ours, theirs in zip(mapped["variants"], resident["variants"]):
        assert "weights mapped from the checkpoint" in ours["runtime"] and "mapped" not in theirs["runtime"]
        assert ours["status"] == theirs["status"] == "ok"
        for key in ("kl_mean", "kl_p99", "top1_agreement", "ppl", "vision_cosine", "gen_token_agreement",
                    "gen_exact_match"):
            assert ours["metrics"][key] == theirs["metrics"][key], key
        assert ours["kl_by_kind"] == theirs["kl_by_kind"] and ours["kl_vision_path"] == theirs["kl_vision_path"]
    assert mapped["variants"][1]["metrics"]["kl_mean"] > 0


def test_a_variant_that_cannot_fit_is_refused_before_loading(rtn_tiny, monkeypatch, capsys):
    from mcq.validate import api, probes

    monkeypatch.setattr(probes, "available_memory", lambda: 512 << 20)

    def no_run(*_args, **_kwargs):
        raise AssertionError("a worker was started")
    monkeypatch.setattr(api, "_run_worker", no_run)
    code = main(["validate", "--reference", "tiny:4.5", "--variant", rtn_tiny])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "needs about" in error and "GiB is available; pass --dtype bfloat16 or --device cuda" in error
    assert main(["validate", "--reference", "tiny:4.5", "--variant", rtn_tiny, "--dtype", "bfloat16"]) == 2
    assert "pass --device cuda" in capsys.readouterr().err
