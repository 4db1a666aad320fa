"""int4 / int8 ONNX exports: MatMulNBits written from mcq's stored levels (exact), onnxruntime's own quantizer, the
KL of calibrated AWQ against onnxruntime's RTN, and the validator's ONNX runner."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from mcq.errors import McqError
from mcq.export.onnx import OnnxMiniCPMV, export_onnx
from mcq.models.loading import load_model, load_processor
from mcq.quantize.api import quantize
from mcq.validate.accuracy import token_kl
from mcq.validate.evalset import encode_items, eval_samples, open_encoder
from mcq.validate.runners import detect_format
from mcq.validate.runners.onnx_runner import OnnxRunner
from mcq.validate.runners.transformers_runner import TransformersRunner

from onnx_helpers import chat_inputs, digests, image, quantize_with_onnxruntime, relative_error


def matmul_nbits(path) -> dict[str, dict[str, int]]:
    """MatMulNBits nodes of a graph file: the Linear each replaces → its attributes."""
    nodes = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type == "MatMulNBits":
            nodes[node.name.split("/")[0]] = {a.name: a.i for a in node.attribute}
    return nodes


@pytest.fixture(scope="module")
def rtn_variants(tmp_path_factory):
    """Data-free mcq variants of tiny 4.5: RTN int4 g128 (asymmetric) and RTN int8 per channel (symmetric), planned
    for mcq's own loader (`target="mcq"`): every resampler Linear quantized and fc2 at group 16, the most layouts the
    export has to carry (the vLLM-targeted defaults keep the resampler's attention dense and pad fc2)."""
    root = tmp_path_factory.mktemp("rtn")
    return {"int4": quantize("tiny:4.5", root / "w4", method="rtn", target="mcq", progress=False).out,
            "int8": quantize("tiny:4.5", root / "w8", recipe="rtn-w8", target="mcq", progress=False).out}


@pytest.fixture(scope="module")
def prompt():
    model = load_model("tiny:4.5", dtype="float32")
    msgs = [{"role": "user", "content": [image(700, 500, 11), "Describe the image in detail."]}]
    return chat_inputs(model, load_processor("tiny:4.5"), msgs)


@pytest.mark.parametrize("bits", ["int4", "int8"])
def test_stored_levels_are_written_exactly(bits, rtn_variants, prompt, tmp_path):
    variant = rtn_variants[bits]
    out = tmp_path / bits
    # float32 activations (accuracy_level 0), so MatMulNBits is compared with the torch model exactly
    result = export_onnx("tiny:4.5", out, precision=bits, from_dir=variant, accuracy_level=0)
    suffix = "_q4" if bits == "int4" else "_int8"
    decoder = matmul_nbits(out / f"onnx/decoder_model_merged{suffix}.onnx")
    vision = matmul_nbits(out / f"onnx/vision_encoder{suffix}.onnx")
    assert len(decoder) == 14 and "llm.lm_head" not in decoder   # lm_head is kept by every recipe
    assert len(vision) == 12 + 6                                  # vision tower and resampler
    assert {n["bits"] for n in [*decoder.values(), *vision.values()]} == {int(bits[3:])}
    if bits == "int4":
        # g128 layers at block 128; the 464-input fc2 took the recipe's fallback group 16
        assert vision["vpm.encoder.layers.0.mlp.fc2"]["block_size"] == 16
        assert decoder["llm.model.layers.0.mlp.down_proj"]["block_size"] == 128
    assert result.linears["llm"] == {"mcq": 14, "onnxruntime": 0, "float": 1}
    # MatMulNBits on the stored levels computes what the dequantized torch model computes.
    torch_model = load_model(variant, dtype="float32")
    onnx_model = OnnxMiniCPMV(out)
    with torch.no_grad():
        logits = torch_model(prompt, use_cache=False).logits
        features = torch_model._vision_states_per_sample(prompt)[0]
    assert relative_error(onnx_model.vision_per_sample(prompt)[0], features) < 1e-4
    assert relative_error(onnx_model.forward(prompt), logits) < 1e-4
    other = "int8" if bits == "int4" else "int4"
    with pytest.raises(McqError, match=f"--from stores {bits} weights but --precision is {other}"):
        export_onnx("tiny:4.5", tmp_path / "mismatch", precision=other, from_dir=variant)
    assert not (tmp_path / "mismatch").exists()


def test_from_dir_at_fp32_writes_the_dequantized_weights(rtn_variants, prompt, tmp_path):
    export_onnx("tiny:4.5", tmp_path / "fp32", precision="fp32", from_dir=rtn_variants["int4"])
    export_onnx("tiny:4.5", tmp_path / "int4", precision="int4", from_dir=rtn_variants["int4"], accuracy_level=0)
    assert not matmul_nbits(tmp_path / "fp32/onnx/decoder_model_merged.onnx")
    dequantized, packed = OnnxMiniCPMV(tmp_path / "fp32"), OnnxMiniCPMV(tmp_path / "int4")
    assert relative_error(packed.forward(prompt), dequantized.forward(prompt)) < 1e-4
    config = json.loads((tmp_path / "int4/config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.parametrize("precision, block, algorithm", [("int4", 32, "default"), ("int8", 64, "default"),
                                                         ("int4", 128, "rtn")])
def test_onnxruntime_quantizer(precision, block, algorithm, prompt, tmp_path):
    out = tmp_path / "out"
    result = export_onnx("tiny:4.5", out, precision=precision, block_size=block, algorithm=algorithm)
    suffix = "_q4" if precision == "int4" else "_int8"
    decoder = matmul_nbits(out / f"onnx/decoder_model_merged{suffix}.onnx")
    vision = matmul_nbits(out / f"onnx/vision_encoder{suffix}.onnx")
    assert len(decoder) == 14 and len(vision) == 18 and "llm.lm_head" not in decoder
    assert result.linears["vision"] == {"mcq": 0, "onnxruntime": 12, "float": 0}
    if algorithm == "default":
        assert {n["block_size"] for n in decoder.values()} == {block}
        # 464 inputs: no block of 32 or 64 divides them, so the recipe's fallback gives 16
        assert vision["vpm.encoder.layers.1.mlp.fc2"]["block_size"] == 16
        assert any("464 = 16 × 29" in line for line in result.fallbacks)
    reference = OnnxMiniCPMV(_fp32_export(tmp_path))
    expected = torch.from_numpy(reference.forward(prompt)[0])
    kl = token_kl(expected, torch.from_numpy(OnnxMiniCPMV(out).forward(prompt)[0])).mean().item()
    assert 0 < kl < (0.01 if precision == "int8" else 0.2), kl


@pytest.mark.parametrize("precision, block, algorithm", [("int4", 32, "default"), ("int8", 64, "default"),
                                                         ("int4", 128, "rtn"), ("int4", 64, "k_quant")])
def test_streamed_quantization_equals_onnxruntime_on_the_float_graph(precision, block, algorithm, tmp_path,
                                                                    monkeypatch):
    """Each weight quantized as it is written, a few rows at a time, gives exactly the MatMulNBits tensors and
    attributes onnxruntime's MatMulNBitsQuantizer writes from the whole float graph (what the export ran before)."""
    from onnx import numpy_helper

    from mcq.export import rows
    from mcq.export.onnx.quantize import LinearPlan

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = tmp_path / "streamed"
    with monkeypatch.context() as patch:
        patch.setattr(rows, "ROW_BLOCK_BYTES", 4096)     # several row blocks per weight at tiny widths

        def whole_graph(*_args, **_kwargs):
            raise AssertionError("the export ran onnxruntime's quantizer over a whole float graph")
        patch.setattr(MatMulNBitsQuantizer, "process", whole_graph)
        export_onnx("tiny:4.5", out, precision=precision, block_size=block, algorithm=algorithm)
    plans = {d["name"]: LinearPlan(**d) for d in json.loads((out / "mcq-manifest.json").read_text())["extra"]["linears"]}
    suffix = "_q4" if precision == "int4" else "_int8"
    compared = 0
    for graph in ("decoder_model_merged", "vision_encoder"):
        float_graph = onnx.load(str(_fp32_export(tmp_path) / f"onnx/{graph}.onnx"))
        oracle = quantize_with_onnxruntime(float_graph, plans, symmetric=False, accuracy_level=4)
        streamed = onnx.load(str(out / f"onnx/{graph}{suffix}.onnx"))
        weights = {t.name: t for g in (oracle, streamed) for t in g.graph.initializer}
        # Each MatMulNBits by its Linear: its packed weight is named after the Linear's weight in both.
        ours = {n.input[1].split(".weight")[0]: n for n in streamed.graph.node if n.op_type == "MatMulNBits"}
        theirs = {n.input[1].split(".weight")[0]: n for n in oracle.graph.node if n.op_type == "MatMulNBits"}
        assert set(ours) == set(theirs) and ours
        for module, node in theirs.items():
            assert [(a.name, a.i) for a in node.attribute] == [(a.name, a.i) for a in ours[module].attribute]
            assert len(node.input) == len(ours[module].input)
            for mine, reference in zip(ours[module].input[1:], node.input[1:]):
                expected = numpy_helper.to_array(weights[reference])
                actual = numpy_helper.to_array(weights[mine])
                assert actual.dtype == expected.dtype and actual.shape == expected.shape
                assert actual.tobytes() == expected.tobytes(), (module, mine)
            compared += 1
    assert compared == 14 + 18


def test_row_blocks_and_inline_weights_give_the_same_files(tmp_path, monkeypatch):
    """Weights written a few rows at a time (transposed Linears, tables) and folded into the .onnx file as it is
    written give the bytes of a whole-tensor export, and the file is protobuf's own serialization of the model."""
    from mcq.export import rows

    for precision in ("fp32", "fp16"):
        export_onnx("tiny:4.5", tmp_path / f"{precision}-whole", precision=precision)
        with monkeypatch.context() as patch:
            patch.setattr(rows, "ROW_BLOCK_BYTES", 1000)
            export_onnx("tiny:4.5", tmp_path / f"{precision}-rows", precision=precision)
        assert digests(tmp_path / f"{precision}-whole") == digests(tmp_path / f"{precision}-rows")
    for path in (tmp_path / "fp16-rows/onnx").iterdir():
        assert path.read_bytes() == onnx.load(str(path)).SerializeToString()


def test_onnxruntime_int4_export_is_deterministic(tmp_path):
    for name in ("a", "b"):
        export_onnx("tiny:4.5", tmp_path / name, precision="int4", block_size=64)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def _fp32_export(tmp_path):
    out = tmp_path / "fp32"
    if not out.exists():
        export_onnx("tiny:4.5", out)
    return out


@pytest.mark.slow
def test_awq_int4_has_lower_kl_than_onnxruntime_rtn_int4(outlier_variants, tmp_path):
    """The same scheme (int4, asymmetric, group/block 128, lm_head kept) on the tiny model with activation
    outliers: mcq's calibrated AWQ levels written into MatMulNBits against onnxruntime's round-to-nearest."""
    model = "tiny:4.5-outliers"
    export_onnx(model, tmp_path / "awq", precision="int4", from_dir=outlier_variants["awq"])
    export_onnx(model, tmp_path / "rtn", precision="int4", block_size=128)
    items = encode_items(open_encoder(model), eval_samples(None, None, 0), max_slice_nums=2)
    reference = load_model(model, dtype="float32")
    runners = {name: OnnxMiniCPMV(tmp_path / name) for name in ("awq", "rtn")}
    kls = {name: [] for name in runners}
    for item in items:
        answer = item.scored["answer_mask"][0, 1:].bool()
        inputs = {k: v for k, v in item.scored.items() if k != "answer_mask"}
        with torch.no_grad():
            expected = reference(dict(inputs), use_cache=False).logits[0, :-1][answer]
        for name, runner in runners.items():
            logits = torch.from_numpy(runner.forward(inputs)[0, :-1])[answer]
            kls[name].append(token_kl(expected, logits))
    mean = {name: torch.cat(values).mean().item() for name, values in kls.items()}
    print(f"\nmean answer-token KL on {len(items)} held-out samples: {mean}")
    assert mean["awq"] < mean["rtn"], mean


def test_validator_runner_matches_the_transformers_runner(rtn_variants, tmp_path):
    out = tmp_path / "export"
    export_onnx("tiny:4.5", out, precision="int4", from_dir=rtn_variants["int4"], accuracy_level=0)
    assert detect_format(str(out)) == ("onnx-int4", OnnxRunner)
    assert detect_format(str(out / "onnx")) == ("onnx-int4", OnnxRunner)
    assert OnnxRunner.describe(out) == TransformersRunner.describe(rtn_variants["int4"])
    sizes = OnnxRunner.weight_bytes(out)
    onnx_bytes = sum(p.stat().st_size for p in (out / "onnx").iterdir())
    assert sizes["llm"] > sizes["vision"] > sizes["resampler"] > 0 and sum(sizes.values()) <= onnx_bytes
    item = next(i for i in encode_items(open_encoder("tiny:4.5"), eval_samples(None, 4, 0), 2) if i.has_vision)
    ours = OnnxRunner(out, torch.device("cpu"), "float32")
    theirs = TransformersRunner(rtn_variants["int4"], torch.device("cpu"), "float32")
    vision = theirs.vision(item.scored)
    assert relative_error(ours.vision(item.scored), vision) < 1e-4
    assert relative_error(ours.logits(item.scored), theirs.logits(item.scored)) < 1e-4
    injected = torch.zeros_like(vision)   # another model's vision features go where the images were
    assert relative_error(ours.logits(item.scored, injected), theirs.logits(item.scored, injected)) < 1e-4
    assert ours.generate(item.prompt, 8, vision) == theirs.generate(item.prompt, 8, vision)
    # The timed paths run on the same inputs (their speed is benchmarks/bench_onnx.py's business).
    for seconds in (ours.time_vision(item.prompt), ours.time_prefill(item.prompt, vision),
                    ours.time_decode(item.prompt, 3, vision)):
        assert isinstance(seconds, float)


@pytest.mark.slow
def test_validate_scores_an_fp32_export_as_the_reference(tmp_path):
    from mcq.validate.api import validate

    export_onnx("tiny:4.5", tmp_path / "fp32")
    results = validate("tiny:4.5", [tmp_path / "fp32"], num_samples=3, latency_runs=1, max_new_tokens=8,
                       progress=False)
    row = next(r for r in results["variants"] if r["name"] == "fp32")
    assert row["status"] == "ok" and row["format"] == "onnx-fp32" and "onnxruntime" in row["runtime"]
    metrics = row["metrics"]
    assert metrics["kl_mean"] < 1e-6 and metrics["top1_agreement"] == 1.0 and metrics["gen_exact_match"] == 1.0
    assert np.isclose(metrics["vision_cosine"], 1.0, atol=1e-6)
