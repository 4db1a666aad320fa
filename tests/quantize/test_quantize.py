"""`mcq quantize` end to end on the tiny checkpoints: outputs, reload, quality ranking, determinism, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from checkpoint_files import stored_tensors  # tests/checkpoint_files.py
from mcq.calibration import load_samples
from mcq.calibration.encode import encode_sample
from mcq.cli import main
from mcq.errors import McqError
from mcq.models.loading import load_model, load_processor, model_spec
from mcq.quantize.api import quantize
from mcq.quantize.recipe import CALIBRATED_METHODS, builtin_recipe_names, load_recipe
from mcq.validate.accuracy import compare_models


def _answer(model_dir: Path) -> str:
    model, processor = load_model(model_dir, dtype="float32"), load_processor(model_dir)
    image = load_samples(None, split="heldout", num_samples=8)[0].images[0]
    return model.chat(msgs=[{"role": "user", "content": [image, "What is shown?"]}], processor=processor,
                      max_new_tokens=4, num_beams=1, repetition_penalty=1.0)


def test_rtn_output_layout_reloads_and_generates(tiny_path, tmp_path):
    out = tmp_path / "rtn"
    result = quantize(tiny_path, out, method="rtn", progress=False)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and "llm.lm_head" in qc["ignore"]
    group_sizes = {g["weights"]["group_size"] for g in qc["config_groups"].values()}
    # The vision MLP grew 464 → 512 so that fc2 keeps group 128 (vLLM's kernels run no group 16), not left in bf16.
    assert group_sizes == {128} and config["vision_config"]["intermediate_size"] == 512
    stored = stored_tensors(out)
    assert "llm.model.layers.0.self_attn.q_proj.weight_packed" in stored
    assert "llm.model.layers.0.self_attn.q_proj.weight" not in stored
    assert "resampler.kv_proj.weight_packed" in stored
    # The resampler's attention and proj stay dense in the official layout (what vLLM and the official code build).
    assert {"resampler.attn.in_proj_weight", "resampler.attn.in_proj_bias", "resampler.proj"} <= stored.keys()
    assert stored["llm.model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.bfloat16
    assert result.layers["vision"]["changed"] == 4 and result.bytes_after["llm"] < result.bytes_before["llm"]
    assert (out / "README.md").is_file() and (out / "tokenizer_config.json").is_file()
    manifest = json.loads((out / "mcq-manifest.json").read_text())
    assert manifest["recipe"]["name"] == "rtn-w4g128" and "config.json" in manifest["outputs"]
    assert isinstance(_answer(out), str)


def test_quantized_weights_follow_the_source_within_int4_error(tiny45, tmp_path):
    out = tmp_path / "rtn"
    quantize(tiny45, out, method="rtn", progress=False)
    reference, variant = load_model(tiny45, dtype="float32"), load_model(out, dtype="float32")
    for name in ("llm.model.layers.1.mlp.down_proj", "vpm.encoder.layers.0.mlp.fc2", "resampler.kv_proj"):
        ref = reference.get_submodule(name).weight
        weight = variant.get_submodule(name).weight[:, : ref.shape[1]]   # fc2's inputs were zero-padded
        error = (weight - ref).norm() / ref.norm()
        assert 0 < error < 0.15, (name, error)
    attention = "resampler.attn.k_proj"   # dense for vLLM: the source's weights, exactly
    assert torch.equal(reference.get_submodule(attention).weight, variant.get_submodule(attention).weight)
    ln = "vpm.encoder.layers.0.layer_norm1.weight"
    assert torch.equal(reference.state_dict()[ln], variant.state_dict()[ln])  # RTN does not smooth


@pytest.mark.slow
@pytest.mark.parametrize("recipe", builtin_recipe_names())
def test_every_builtin_recipe_runs_reloads_and_generates(recipe, tiny_path, tmp_path):
    out = tmp_path / recipe
    # Fewer calibration samples than the recipe's, where it takes any (data-free recipes refuse the option).
    calibrated = load_recipe(recipe).method in CALIBRATED_METHODS
    quantize(tiny_path, out, recipe=recipe, num_samples=8 if calibrated else None, progress=False)
    assert isinstance(_answer(out), str)


@pytest.fixture(scope="module")
def outlier_metrics(outlier_variants):
    """Mean answer-token KL and vision cosine of each variant against bf16, on the held-out multimodal split."""
    path, _, spec = model_spec("tiny:4.5-outliers")
    processor = load_processor(path)
    held_out = [encode_sample(processor, spec, s, max_slice_nums=2) for s in load_samples(None, split="heldout")]
    reference = load_model(path, dtype="float32")
    return {m: compare_models(reference, load_model(d, dtype="float32"), held_out)
            for m, d in outlier_variants.items()}


@pytest.mark.slow
def test_gptq_halves_rtn_kl_and_both_keep_the_vision_output(outlier_metrics):
    metrics = outlier_metrics
    assert metrics["gptq"]["kl_mean"] * 2 <= metrics["rtn"]["kl_mean"], metrics
    assert metrics["awq"]["kl_mean"] < metrics["rtn"]["kl_mean"], metrics
    assert metrics["gptq"]["vision_cosine"] >= 0.99, metrics
    assert metrics["awq"]["vision_cosine"] >= 0.99, metrics


@pytest.mark.slow
def test_awq_halves_rtn_kl(outlier_metrics, record_property):
    """Issue 19's acceptance with the vLLM-servable defaults (resampler attention dense, vision fc2 padded to group
    128). Without weight clipping AWQ measured 0.57x RTN's mean KL (0.002859 vs 0.005028; llm-compressor's AWQ
    0.002886); with mcq's clip search (awq-w4g128's weight_clip, on by default) 0.000937, 0.19x (2026-12-03; GPTQ
    0.000427); with the recipe's loss_tokens at 512 instead of 1024, 0.000945; with no padded patches in the
    calibration statistics too, 0.000980 (GPTQ 0.000411, llm-compressor's AWQ 0.002628)."""
    record_property("kl_mean", {m: round(v["kl_mean"], 6) for m, v in outlier_metrics.items()})
    assert outlier_metrics["awq"]["kl_mean"] * 2 <= outlier_metrics["rtn"]["kl_mean"], outlier_metrics


@pytest.mark.slow
def test_mcq_awq_is_as_accurate_as_llmcompressors(outlier_metrics, record_property):
    """The default AWQ (mcq's own scale search, loss on a token sample) against llm-compressor's AWQModifier with the
    same recipe and calibration, which was the default before: mean KL within 5 %, and the vision path (vision
    tower and resampler) at least as close to bf16 as the issue's 0.9985. Measured with the recipe's vllm-gpu target
    (2026-12-03): KL 0.000937 vs 0.002886, vision cosine 0.999412 vs 0.998729 (RTN: KL 0.005028, cosine 0.99005);
    with loss_tokens 512 instead of 1024, KL 0.000945, vision cosine 0.999305; with no padded patches in the
    calibration statistics too (both engines), KL 0.000980 vs 0.002628, cosine 0.999623 vs 0.998924;
    the margin is mcq's clip search, which llm-compressor's AWQ lacks (without it: 0.002859, cosine 0.998863)."""
    ours, theirs = outlier_metrics["awq"], outlier_metrics["awq-llm-compressor"]
    record_property("vision_cosine", {m: round(v["vision_cosine"], 6) for m, v in outlier_metrics.items()})
    assert ours["kl_mean"] <= 1.05 * theirs["kl_mean"], outlier_metrics
    assert ours["vision_cosine"] >= 0.9985, outlier_metrics
    assert ours["vision_cosine"] >= theirs["vision_cosine"] - 1e-5, outlier_metrics


@pytest.mark.slow
def test_awq_search_is_reported_per_block(outlier_variants):
    """What mcq's AWQ search did is in the manifest per block (and summed per component in the summary and card):
    every vision and LLM block, each of its AWQ Linears but queries and keys clipped, never worse than min/max
    (the full range is a candidate), every smoothed pair's loss at most plain rounding's (so is r = 0's). The
    llm-compressor engine searches nothing of mcq's: nothing is reported."""
    manifest = json.loads((outlier_variants["awq"] / "mcq-manifest.json").read_text())
    search = manifest["extra"]["awq_search"]
    blocks = search["blocks"]
    assert {name.rsplit(".", 1)[0] for name in blocks} == {"vpm.encoder.layers", "llm.model.layers"}
    quantized = {entry["name"] for entry in manifest["extra"]["plan"]["layers"]
                 if entry["component"] in ("vision", "llm") and entry["scheme"]}   # the AWQ rules' Linears
    for name, found in blocks.items():
        clipped = {f"{name}.{entry['layer']}" for entry in found["clipped"]}
        assert clipped == {layer for layer in quantized if layer.startswith(name + ".")
                           and not layer.endswith(("q_proj", "k_proj"))}, name
        assert all(entry["error_ratio"] <= 1 and 0.5 <= entry["kept"] <= 1 for entry in found["clipped"]), found
        assert found["pairs"] and all(entry["loss_ratio"] <= 1 for entry in found["pairs"]), found
    summary = search["components"]
    assert set(summary) == {"vision", "llm"}
    assert sum(s["clipped"] for s in summary.values()) == sum(len(b["clipped"]) for b in blocks.values())
    card = (outlier_variants["awq"] / "README.md").read_text()
    assert "AWQ search (per block in mcq-manifest.json):" in card
    reference = json.loads((outlier_variants["awq-llm-compressor"] / "mcq-manifest.json").read_text())
    assert reference["extra"]["awq_search"] == {}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_same_inputs_same_bytes(tiny45, tmp_path, method):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        quantize(tiny45, out, method=method, num_samples=4, progress=False)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_blocks_are_released_after_processing(tiny45, tmp_path):
    """Only the block in flight holds weights: after the run every block and the LM head are back on meta."""
    from mcq.models.weights import CheckpointReader, named_blocks, shell_model
    from mcq.quantize.sequential import BlockHandler, SequentialDriver

    _, config, _ = model_spec(tiny45)
    model = shell_model(config)
    seen = []

    def quantize_block(name, block, calls):
        assert all(not p.is_meta for p in block.parameters())
        others = [n for n, b in named_blocks(model) if n != name]
        assert all(p.is_meta for n in others for p in model.get_submodule(n).parameters())
        seen.append((name, len(calls)))

    path, _, spec = model_spec(tiny45)
    processor = load_processor(path)
    samples = [encode_sample(processor, spec, s) for s in load_samples(None, num_samples=8)]
    SequentialDriver(model, CheckpointReader(path), samples, torch.float32, "cpu").run(
        BlockHandler(quantize_block, lambda name, block: None))
    assert [name for name, _ in seen] == [name for name, _ in named_blocks(model)]
    assert all(count > 0 for _, count in seen)  # every block got calibration inputs
    assert all(p.is_meta for _, block in named_blocks(model) for p in block.parameters())
    assert model.llm.lm_head.weight.is_meta


def test_vision_blocks_calibrate_on_image_patches_only(tiny45):
    """Every row a vision block is calibrated on is a patch of an image: a slice shorter than its sample's longest is
    not padded (padded rows would enter AWQ's activation means and GPTQ's Hessians as if they were content), and
    the rows add up to the slices' patches."""
    from mcq.models.weights import CheckpointReader, shell_model
    from mcq.quantize.sequential import BlockHandler, SequentialDriver

    path, config, spec = model_spec(tiny45)
    processor = load_processor(path)
    samples = [encode_sample(processor, spec, s) for s in load_samples(None, num_samples=8)]
    slices = [size for sample in samples for sizes in sample["tgt_sizes"] for size in sizes.reshape(-1, 2).tolist()]
    assert len({h * w for h, w in slices}) > 1        # slices of unequal length share samples: padding was possible
    seen = {}

    def record(name, block, calls):
        if name == "vpm.encoder.layers.0":
            seen["masks"] = [args[1] if len(args) > 1 else kwargs.get("attention_mask") for args, kwargs in calls]
            seen["rows"] = sum(args[0].shape[0] * args[0].shape[1] for args, _ in calls)
    SequentialDriver(shell_model(config), CheckpointReader(path), samples, torch.float32, "cpu").run(
        BlockHandler(record, lambda name, block: None))
    assert all(mask is None for mask in seen["masks"])
    assert seen["rows"] == sum(h * w for h, w in slices)


def test_interrupt_leaves_no_output(tiny45, tmp_path, monkeypatch):
    from mcq.quantize import llmc

    calls = []

    def interrupted(self, name, block, inputs):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(llmc.LlmCompressorBlockQuantizer, "quantize", interrupted)
    out = tmp_path / "variant"
    assert main(["quantize", "--method", "rtn", "--model", str(tiny45), "--out", str(out)]) == 130
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_input_is_one_line_exit_2(tiny45, tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    assert main(["quantize", "--method", "rtn", "--model", str(tiny45), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", "--method", "awq", "--recipe", "gptq-w4g128", "--model", str(tiny45),
                 "--out", str(tmp_path / "y")]) == 2
    assert "gptq recipe" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["quantize", "--method", "awq", "--model", str(tiny45), "--out", str(tmp_path / "z"),
                 "--calib", str(empty)]) == 2
    assert capsys.readouterr().err.startswith("mcq: error:")
    assert not (tmp_path / "z").exists()
    # A data-free method with calibration options: refused, not silently ignored.
    assert main(["quantize", "--method", "bnb-nf4", "--model", str(tiny45), "--out", str(tmp_path / "w"),
                 "--calib", str(empty)]) == 2
    assert "--calib applies to awq and gptq" in capsys.readouterr().err


def test_json_output_is_pure_json(tiny45, tmp_path):
    """llm-compressor logs to stdout, and its first import warns there on a CPU machine: --json must still parse.
    A fresh process, so that this import is the first one (in this test session it happened long before)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mcq.cli", "quantize", "--method", "rtn", "--model", str(tiny45),
                           "--out", str(tmp_path / "q"), "--json"], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["recipe"] == "rtn-w4g128"


def test_pad_grows_the_vision_mlp_exactly_and_quantizes_it_with_the_full_group(tiny45, tmp_path):
    from mcq.models.family import family_for, pad_intermediate

    reference = load_model(tiny45, dtype="float32")
    layer = reference.vpm.encoder.layers[0]
    hidden = torch.randn(2, 10, 128)
    before = layer.mlp(hidden)
    mlps = family_for("minicpmv").paddable_mlps
    pad_intermediate(layer, mlps["vision"], 512)
    assert layer.mlp.fc1.out_features == layer.mlp.fc2.in_features == 512
    assert torch.allclose(layer.mlp(hidden), before, atol=1e-6)
    decoder = reference.llm.model.layers[0]          # SiLU(gate) * up → down_proj: padded the same way
    hidden = torch.randn(2, 10, 256)
    before, width = decoder.mlp(hidden), decoder.mlp.down_proj.in_features + 128
    pad_intermediate(decoder, mlps["llm"], width)
    assert decoder.mlp.gate_proj.out_features == decoder.mlp.up_proj.out_features == width
    assert torch.allclose(decoder.mlp(hidden), before, atol=1e-6)

    recipe = tmp_path / "pad.yaml"
    recipe.write_text("method: gptq\nrules:\n  - {match: '^vpm\\.', bits: 4, group_size: 128, non_divisible: pad}\n")
    out = Path(quantize(tiny45, tmp_path / "p", recipe=str(recipe), num_samples=4, progress=False).out)
    assert json.loads((out / "config.json").read_text())["vision_config"]["intermediate_size"] == 512
    with safe_open(next(out.glob("*.safetensors")), "pt") as handle:
        shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()}
    assert shapes["vpm.encoder.layers.0.mlp.fc2.weight_scale"] == [128, 4]       # 512 / 128 groups, not 464 / 16
    assert shapes["vpm.encoder.layers.0.mlp.fc1.bias"] == [512]
    variant = load_model(out, dtype="float32")
    source = load_model(tiny45, dtype="float32").vpm.encoder.layers[0].mlp.fc2.weight
    fc2 = variant.vpm.encoder.layers[0].mlp.fc2.weight
    assert torch.equal(fc2[:, 464:], torch.zeros(128, 48))
    assert 0 < (fc2[:, :464] - source).norm() / source.norm() < 0.15
    assert isinstance(_answer(out), str)


def test_an_already_quantized_checkpoint_is_refused(tiny45, tmp_path):
    quantize(tiny45, tmp_path / "q", method="rtn", progress=False)
    with pytest.raises(McqError, match="already quantized"):
        quantize(tmp_path / "q", tmp_path / "qq", method="rtn", progress=False)


def test_embedding_tables_stay_in_their_stored_dtype(tiny45):
    """The driver looks rows up in the stored bf16 tables (an 8B model's would be 2.5 GB in float32 for the whole
    run) and hands the first LLM block exactly the float32 inputs the float32 model computes at every text position.
    At image positions the features come through the vision tower, which the driver runs on slices of equal length
    batched together (`_equal_shape_groups`) and the model one slice at a time: whether a batched matmul rounds each
    row as the single-row one does depends on the machine's BLAS kernels (equal on one CI machine, 6e-7 apart on
    another), so there they agree to float32 rounding."""
    from mcq.models.weights import CheckpointReader, shell_model
    from mcq.quantize.sequential import BlockHandler, SequentialDriver

    path, config, spec = model_spec(tiny45)
    processor = load_processor(path)
    samples = [encode_sample(processor, spec, s) for s in load_samples(None, num_samples=4)]
    model = shell_model(config)
    captured = []

    def record(name, block, calls):
        if name == "llm.model.layers.0":
            captured.extend(args[0] for args, _ in calls)
    SequentialDriver(model, CheckpointReader(path), samples, torch.float32, "cpu").run(
        BlockHandler(record, lambda name, block: None))
    assert model.llm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.vpm.embeddings.position_embedding.weight.dtype == torch.bfloat16

    reference = load_model(path, dtype="float32")
    expected = []
    hook = reference.llm.model.layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: expected.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    reference.config.vision_batch_size = 1
    with torch.no_grad():
        for sample in samples:
            reference(sample, use_cache=False)
    hook.remove()
    assert len(captured) == len(expected) == len(samples)
    for sample, ours, theirs in zip(samples, captured, expected):
        text = torch.ones(ours.shape[1], dtype=torch.bool)
        for bounds in sample["image_bound"]:
            for start, end in bounds.tolist():
                text[start:end] = False
        assert ours.dtype == torch.float32 and torch.equal(ours[:, text], theirs[:, text])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
