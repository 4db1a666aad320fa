"""`mcq validate` on Core ML exports: the runner detects them, describes the model, splits the sizes, and scores
them end to end (on Linux through mcq's numpy interpreter of the saved packages, on macOS through Core ML)."""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from mcq.errors import McqError
from mcq.export.coreml import api
from mcq.validate.coreml.runtime import native_available
from mcq.validate.runners import detect_format
from mcq.validate.runners.coreml_runner import CoremlRunner

MODEL = "tiny:4.5"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """fp16 everywhere (only fp16 rounding between it and torch), and the defaults' int4 LLM with an int8 tower."""
    root = tmp_path_factory.mktemp("coreml-validate")
    api.export_coreml(MODEL, root / "fp16", vision="fp16", llm="fp16", progress=False)
    api.export_coreml(MODEL, root / "int4", vision="int8", llm="int4-block32", progress=False)
    return root


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """User eval data: an image, and a video of 5 frames at 1 fps packed 3 a block (4.5's temporal groups (0, 10, 20)
    and (30, 40): a group of 3 frames and one of 2)."""
    root = tmp_path_factory.mktemp("coreml-eval")
    rng = np.random.default_rng(0)
    (root / "clip").mkdir()
    for name in ["picture.png", *(f"clip/{i:02d}.png" for i in range(5))]:
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(root / name)
    records = [{"image": "picture.png", "messages": [{"role": "user", "content": "<image>\nWhat is shown?"},
                                                     {"role": "assistant", "content": "Coloured noise."}]},
               {"frames": "clip", "fps": 1, "packing": 3, "messages": [
                   {"role": "user", "content": "What happens in <video>?"},
                   {"role": "assistant", "content": "The noise changes every second."}]}]
    (root / "eval.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root / "eval.jsonl"


def test_detect_describe_and_sizes(exports):
    fmt, runner = detect_format(exports / "int4")
    assert (fmt, runner) == ("coreml-int4-block32", CoremlRunner)
    assert detect_format(exports / "fp16")[0] == "coreml-fp16"
    # Core ML where it can predict (macOS 15+), the interpreter everywhere else (and on Linux, always).
    assert CoremlRunner.runtime(fmt).startswith("Core ML (" if native_available() else "mcq MIL interpreter (")
    assert native_available() or sys.platform != "linux" or "Linux" in CoremlRunner.runtime(fmt)
    from mcq.models.loading import model_spec
    from mcq.validate.runners.base import config_identity

    assert CoremlRunner.describe(exports / "int4") == config_identity(model_spec(MODEL)[1])
    fp16, int4 = CoremlRunner.weight_bytes(exports / "fp16"), CoremlRunner.weight_bytes(exports / "int4")
    assert set(fp16) == {"vision", "resampler", "llm"} and all(fp16.values())
    # int8 resampler: half of fp16; the tower too but for its position-embedding table (a gather, left at fp16);
    # int4 blocks of 32: 4.5 of 16 bits (fp16 zero biases aside).
    assert 0.45 < int4["resampler"] / fp16["resampler"] < 0.55 and 0.5 < int4["vision"] / fp16["vision"] < 0.85
    assert 0.27 < int4["llm"] / fp16["llm"] < 0.3


def test_export_without_llm_is_refused_at_describe(exports, tmp_path):
    out = tmp_path / "vision-only"
    api.export_coreml(MODEL, out, vision="fp16", llm="none", progress=False)
    assert detect_format(out)[0] == "coreml-none"
    with pytest.raises(McqError, match="no LLM package .*--llm none"):
        CoremlRunner.describe(out)


def test_sidecar_without_model_identity_is_refused(exports, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(exports / "fp16", out)
    sidecar = json.loads((out / api.SIDECAR).read_text())
    del sidecar["model_config"]
    (out / api.SIDECAR).write_text(json.dumps(sidecar))
    with pytest.raises(McqError, match="does not say which model"):
        CoremlRunner.describe(out)


def test_validate_scores_the_packages(exports, eval_data):
    """An image and a 4.5 video (frames packed by temporal id through the group resampler package), one slice per
    image or frame, through every validate stage (reference, variants, vision path); none is left out.

    The fp16 packages differ from torch only by fp16 rounding: their KL was measured at 9.3e-8 (the video sample
    alone: 9.0e-8), so 1e-4 is a bound with a thousandfold margin that a wrong rotary term, mask or cache position
    (KL ≥ 0.1) still fails. int4 blocks of tiny random weights lose far more (measured 2.5e-3): at least 100x
    fp16's, below 0.05."""
    from mcq.validate.api import validate

    results = validate(MODEL, [exports / "fp16", exports / "int4"], eval_data=eval_data, max_slice_nums=1,
                       max_new_tokens=8, latency_runs=1, warmup_runs=0, decode_tokens=2, progress=False)
    assert (results["eval"]["images"], results["eval"]["video_frames"]) == (1, 5)
    _, fp16, int4 = results["variants"]
    for row in (fp16, int4):
        assert row["status"] == "ok", row["error"]
        assert row["runtime"] == CoremlRunner.runtime(row["format"])
        assert set(row["components"]) == {"vision", "resampler", "llm"}
        assert row["skipped_samples"] == {}
        assert all(row["metrics"][key] > 0 for key in ("prefill_tok_s", "decode_tok_s", "vision_ms"))
    metrics = fp16["metrics"]
    assert metrics["kl_mean"] < 1e-4 and metrics["top1_agreement"] == 1.0 and metrics["gen_token_agreement"] == 1.0
    assert metrics["vision_cosine"] > 0.999 and fp16["kl_vision_path"] < 1e-4
    kl = int4["metrics"]["kl_mean"]
    assert math.isfinite(kl) and 100 * metrics["kl_mean"] < kl < 0.05
    assert int4["metrics"]["bits_per_weight"] < 0.5 * metrics["bits_per_weight"]


def test_memory_plan_counts_the_weights_as_the_interpreter_holds_them(exports, monkeypatch, capsys):
    """The interpreter holds a package's weights in fp16 during a call (2 bytes an element, four times an int4
    level's half byte on disk), but for those it reads by rows (tables, large heads), so the plan counts the others'
    elements from each program; too little memory is refused in one line before anything runs, saying where the
    export can be validated instead."""
    from mcq.cli import main
    from mcq.export.coreml.program import load_program
    from mcq.validate import api as validate_api, probes
    from mcq.validate.coreml.interpreter import read_by_rows
    from mcq.validate.runners.base import MemoryPlan
    from mcq.validate.runners.transformers_runner import TransformersRunner

    plan = CoremlRunner.memory_plan(exports / "int4", "cpu", "float32", None, 64)
    if native_available():          # Core ML itself: it manages its own memory
        assert plan.bytes is None
        return
    packages = sorted((exports / "int4").glob("*.mlpackage"))
    programs = [load_program(package) for package in packages]
    elements = [sum(tensor.size for name, tensor in program.stored() if name not in read_by_rows(program))
                for program in programs]
    files = [sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) for package in packages]
    assert plan.bytes - (1 << 30) >= 2 * max(elements)
    # The int4 decoder packages hold over 3x their bytes on disk (the plan before counted 6x the largest file).
    assert max(2 * count / size for count, size in zip(elements, files)) > 3

    monkeypatch.setattr(probes, "available_memory", lambda: plan.bytes - 1)
    # The tiny reference's plan is about as large; this test is about the Core ML variant's.
    monkeypatch.setattr(TransformersRunner, "memory_plan", classmethod(lambda *_args: MemoryPlan(None)))

    def no_run(*_args, **_kwargs):
        raise AssertionError("a worker was started")
    monkeypatch.setattr(validate_api, "_run_worker", no_run)
    code = main(["validate", "--reference", MODEL, "--variant", str(exports / "int4")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "needs about" in error and "validate it on macOS 15 or later" in error

