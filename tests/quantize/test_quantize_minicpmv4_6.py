"""`mcq quantize` on MiniCPM-V 4.6 (tiny:4.6): RTN, GPTQ and AWQ block by block through its family's blocks (the
calibrated methods capture each block's inputs through transformers' own forward), the output read back by
transformers' own classes; what 4.6 cannot do is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

from mcq.calibration import load_samples
from mcq.cli import main
from mcq.errors import McqError
from mcq.models.bnb_runtime import disable_unsupported_cpu_repacking
from mcq.models.family import family_for
from mcq.models.minicpmv4_6.calibration import CalibrationEncoder, forward, image_blocks, per_size_runs
from mcq.models.tiny import resolve_tiny
from mcq.models.weights import CheckpointReader, shell_model
from mcq.quantize.api import quantize
from mcq.quantize.sequential import BlockHandler, SequentialDriver
from checkpoint_files import stored_tensors  # tests/checkpoint_files.py
from minicpmv4_6_inputs import image_inputs, random_image  # tests/minicpmv4_6_inputs.py

# A user recipe in 4.6's own module names (match rules), with the LLM and the vision encoder layers quantized and
# the mergers left dense, for mcq's own loader (no serving runtime's rules).
RECIPE = """
name: rtn-w4g128-46
method: rtn
target: mcq
rules:
  - match: "^model\\\\.language_model\\\\."
    bits: 4
    group_size: 128
    symmetric: false
    non_divisible: fallback_group
  - match: "^model\\\\.vision_tower\\\\.encoder\\\\."
    bits: 4
    group_size: 128
    symmetric: false
    non_divisible: {policy}
"""


@pytest.fixture(scope="module")
def tiny46() -> Path:
    return resolve_tiny("tiny:4.6")


def _recipe(tmp_path: Path, policy: str = "fallback_group") -> Path:
    path = tmp_path / f"rtn-46-{policy}.yaml"
    path.write_text(RECIPE.format(policy=policy))
    return path


def _kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(reference || other) per position."""
    return torch.nn.functional.kl_div(other.float().log_softmax(-1), reference.float().log_softmax(-1),
                                      log_target=True, reduction="none").sum(-1)


@pytest.fixture(scope="module")
def rtn46(tiny46, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("rtn46")
    out = work / "out"
    quantize(tiny46, out, recipe=_recipe(work), progress=False)
    return out


def test_rtn46_layout(tiny46, rtn46):
    config = json.loads((rtn46 / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["format"] == "pack-quantized" and "lm_head" in qc["ignore"]
    stored, source = stored_tensors(rtn46), stored_tensors(tiny46)
    layer = "model.language_model.layers"
    # Both LLM layer kinds are quantized: the linear-attention projections and the full-attention ones.
    for name in (f"{layer}.0.linear_attn.in_proj_qkv", f"{layer}.0.linear_attn.in_proj_b", f"{layer}.3.self_attn.q_proj",
                 f"{layer}.3.mlp.down_proj", "model.vision_tower.encoder.layers.2.mlp.fc2"):
        assert f"{name}.weight_packed" in stored and f"{name}.weight" not in stored, name
    # What the recipe keeps is the source's tensor, byte for byte (the mergers, norms, the DeltaNet's A_log/conv1d).
    kept = [n for n in source if n.startswith(("model.merger.", "model.vision_tower.vit_merger."))
            or n.endswith(("A_log", "conv1d.weight", "embed_tokens.weight"))]
    assert kept and all(torch.equal(stored[n], source[n]) for n in kept)
    assert "lm_head.weight" not in stored   # still tied to the embedding table
    # 464 inputs: group 128 falls back to 16, as the recipe says.
    fc2 = [g for g in qc["config_groups"].values() if any(t.endswith("mlp.fc2") for t in g["targets"])]
    assert [g["weights"]["group_size"] for g in fc2] == [16]
    # Every module by its name, no pattern: vLLM maps 4.6's names to its own modules, plain names only.
    named = [t for g in qc["config_groups"].values() for t in g["targets"]] + qc["ignore"]
    assert not [t for t in named if t.startswith("re:")]
    packed = {n.removesuffix(".weight_packed") for n in stored if n.endswith(".weight_packed")}
    assert {t for g in qc["config_groups"].values() for t in g["targets"]} == packed


def test_rtn46_reloads_in_transformers_close_to_bf16(tiny46, rtn46):
    reference = AutoModelForImageTextToText.from_pretrained(tiny46, dtype=torch.float32).eval()
    quantized = AutoModelForImageTextToText.from_pretrained(
        rtn46, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    inputs = image_inputs(tiny46, random_image(150, 100, seed=0))
    with torch.no_grad():
        kl = _kl(reference(**inputs).logits, quantized(**inputs).logits)
        greedy = quantized.generate(**inputs, max_new_tokens=3, do_sample=False)
    # int4 g128 on a random tiny model: measured 1.7e-3; nonzero (the weights did change), and small.
    assert 1e-5 < kl.mean().item() < 1e-2
    assert greedy.shape[1] == inputs["input_ids"].shape[1] + 3


def test_the_default_recipe_reaches_every_46_component(tmp_path):
    """rtn-w4g128's rules select components, so on 4.6 they cover its vision tower, vit_merger, merger and LLM."""
    out = tmp_path / "default"
    result = quantize("tiny:4.6", out, method="rtn", target="mcq", progress=False)
    assert result.recipe == "rtn-w4g128"
    assert list(result.layers) == ["vision", "vit_merger", "merger", "llm"]   # data-flow order
    # Everything but the tied lm_head: 3 x 6 encoder, 6 vit_merger, 2 merger, 3 x 8 linear-attention + 7 full.
    assert {c: (row["quantized"], row["kept"]) for c, row in result.layers.items()} == {
        "vision": (18, 0), "vit_merger": (6, 0), "merger": (2, 0), "llm": (31, 1)}
    stored = stored_tensors(out)
    for name in ("model.vision_tower.vit_merger.linear_2", "model.vision_tower.vit_merger.self_attn.q_proj",
                 "model.merger.mlp.0.linear_1"):
        assert f"{name}.weight_packed" in stored and f"{name}.weight" not in stored, name


def test_the_default_rtn_output_is_for_vllm_with_what_vllm_builds_plain_left_dense(tiny46, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--method", "rtn", "--model", "tiny:4.6", "--out", str(out)]) == 0
    assert "for vllm-gpu" in capsys.readouterr().out
    stored = stored_tensors(out)
    for name in ("model.vision_tower.vit_merger.linear_1", "model.merger.mlp.0.linear_2"):
        assert f"{name}.weight" in stored and f"{name}.weight_packed" not in stored, name
    for name in ("model.vision_tower.vit_merger.self_attn.k_proj", "model.language_model.layers.0.linear_attn.in_proj_z",
                 "model.language_model.layers.0.linear_attn.in_proj_a"):
        assert f"{name}.weight_packed" in stored, name
    manifest = json.loads((out / "mcq-manifest.json").read_text())
    assert manifest["extra"]["runtimes"]["vllm-gpu"] == "target"
    # 4.6 is native in transformers: there is no official remote code to load it in.
    assert manifest["extra"]["runtimes"]["remote-code"].startswith("no: the official remote code exists for")
    # The card names a runtime's test only where that test loads this family's outputs: vLLM's CPU test serves 4.6
    # (test_vllm_serves_4_6); nothing here loads them in vLLM on a GPU.
    card = (out / "README.md").read_text()
    rows = {line.split("`")[1]: line for line in card.splitlines() if line.startswith("| `")}
    assert "tests/validate/test_vllm.py" in rows["vllm-cpu"] and "tests/" not in rows["vllm-gpu"]
    assert "tests/quantize/test_quantize_minicpmv4_6.py" in rows["mcq"]


def test_bnb_nf4_on_46_loads_in_transformers_own_class(tiny46, tmp_path, capsys):
    """The bnb default on 4.6: its recipe also targets the official remote code, which has no 4.6, so it is planned
    for mcq's (transformers') loader alone; the output loads with transformers' class, as its card says."""
    out = tmp_path / "nf4"
    assert main(["quantize", "--method", "bnb-nf4", "--model", "tiny:4.6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "for mcq" in printed and "not in remote-code-bnb: the official remote code exists for" in printed
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and "lm_head" in config["llm_int8_skip_modules"]
    card = (out / "README.md").read_text()
    assert ("```python\nfrom transformers import AutoModelForImageTextToText\n"
            "model = AutoModelForImageTextToText.from_pretrained(PATH, device_map=\"cpu\")\n") in card
    reference = AutoModelForImageTextToText.from_pretrained(tiny46, dtype=torch.float32).eval()
    quantized = AutoModelForImageTextToText.from_pretrained(out, device_map="cpu").eval()
    # As the card says: on a CPU with AVX512-BF16 the fused kernel cannot take the vision MLP's widths (464 here).
    assert "mcq.models.bnb_runtime.disable_unsupported_cpu_repacking(model)" in card
    disable_unsupported_cpu_repacking(quantized)
    assert quantized.model.language_model.layers[0].mlp.down_proj.__class__.__name__ == "Linear4bit"
    inputs = image_inputs(tiny46, random_image(150, 100, seed=0))
    with torch.no_grad():
        kl = _kl(reference(**inputs).logits, quantized(**inputs).logits.float())
    # nf4 (blocks of 64) of a random tiny model: small, and nonzero (the weights did change).
    assert 1e-5 < kl.mean().item() < 2e-2


def test_pad_grows_the_46_vision_mlp_and_the_vit_merger_mlp_with_it_exactly(tiny46, tmp_path):
    """vision_config.intermediate_size sizes the encoder MLPs and (x4) the vit_merger's: padding it grows both."""
    from mcq.models.family import pad_intermediate

    model = AutoModelForImageTextToText.from_pretrained(tiny46, dtype=torch.float32).eval()
    inputs = image_inputs(tiny46, random_image(150, 100, seed=0))
    with torch.no_grad():
        before = model(**inputs).logits
        mlps = family_for("minicpmv4_6").paddable_mlps
        tower = model.model.vision_tower
        for layer in tower.encoder.layers:
            pad_intermediate(layer, mlps["vision"], 512)
        pad_intermediate(tower.vit_merger, mlps["vit_merger"], 4 * 512)
        assert (tower.vit_merger.linear_1.out_features, tower.vit_merger.linear_2.in_features) == (2048, 2048)
        assert torch.allclose(model(**inputs).logits, before, atol=1e-5)

    out = tmp_path / "pad"
    result = quantize(tiny46, out, recipe=_recipe(tmp_path, "pad"), progress=False)
    assert json.loads((out / "config.json").read_text())["vision_config"]["intermediate_size"] == 512
    stored = stored_tensors(out)
    assert list(stored["model.vision_tower.encoder.layers.0.mlp.fc2.weight_scale"].shape) == [128, 4]   # 512 / 128
    merger_in = stored["model.vision_tower.vit_merger.linear_1.weight"]   # dense (no rule): zero rows appended
    assert list(merger_in.shape) == [2048, 512] and not merger_in[1856:].any()
    reason = next(d["reason"] for d in result.changes if "vit_merger.linear_1" in d["layers"])
    assert reason == ("no rule matches, outputs zero-padded 1856 → 2048 with the MLP (exact): 4 x the vision MLP's "
                      "width, which grows")
    quantized = AutoModelForImageTextToText.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    with torch.no_grad():
        assert 1e-5 < _kl(before, quantized(**inputs).logits).mean().item() < 1e-2


@pytest.mark.parametrize("argv,message", [
    (["--method", "rtn", "--target", "remote-code"], "target remote-code cannot load MiniCPM-V 4.6: the official "
                                                     "remote code exists for MiniCPM-V 2.6 / 4.0 / 4.5 only"),
])
def test_what_46_cannot_do_is_one_line(argv, message, tmp_path, capsys):
    assert main(["quantize", "--model", "tiny:4.6", "--out", str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


# -- calibration: encoding, capture through transformers' forward, GPTQ and AWQ ----------------------------------

@pytest.fixture(scope="module")
def outliers46() -> Path:
    return resolve_tiny("tiny:4.6-outliers")


def test_the_encoder_lays_out_every_slice_and_image_as_the_processor(outliers46):
    """Sliced and multi-image samples: one image token per 16 patches of every overview and slice, in the
    processor's layout (video samples: tests/models/test_minicpmv4_6_chat.py checks them against the processor)."""
    encoder = CalibrationEncoder(outliers46)
    samples = [s for s in load_samples(None, num_samples=12, seed=0) if s.kind in ("multi_image", "chart")]
    assert {s.kind for s in samples} == {"multi_image", "chart"}
    tokenizer = encoder.tokenizer
    slices = 0
    for sample in samples:
        data = encoder(sample, max_slice_nums=2)
        ids = data["input_ids"][0].tolist()
        assert ids.count(tokenizer.image_token_id) == int(data["target_sizes"].prod(-1).sum()) // 16
        overviews_and_slices = data["target_sizes"].shape[0]
        assert ids.count(tokenizer.convert_tokens_to_ids(tokenizer.image_start_token)) == len(sample.images)
        assert ids.count(tokenizer.convert_tokens_to_ids(tokenizer.slice_start_token)) == \
            overviews_and_slices - len(sample.images)
        assert data["pixel_values"].shape[-1] == int(data["target_sizes"].prod(-1).sum()) * 14   # packed patches
        # image_bound: each block's run of image tokens right after its <image> or <slice>, in the blocks' order,
        # which is the order image_blocks splits the packed pixels in.
        openers = {tokenizer.convert_tokens_to_ids(token)
                   for token in (tokenizer.image_start_token, tokenizer.slice_start_token)}
        bounds = data["image_bound"][0].tolist()
        assert [end - start for start, end in bounds] == (data["target_sizes"].prod(-1) // 16).tolist()
        assert all(set(ids[start:end]) == {tokenizer.image_token_id} and ids[start - 1] in openers
                   for start, end in bounds)
        blocks = image_blocks(data)
        assert [size for _, size in blocks] == [tuple(size) for size in data["target_sizes"].tolist()]
        assert torch.equal(torch.cat([pixels for pixels, _ in blocks], dim=-1), data["pixel_values"][0])
        slices += overviews_and_slices - len(sample.images)
    assert slices > 0


def test_per_size_runs_compute_each_image_as_on_its_own(outliers46):
    """transformers' tower merges windows as if every packed image had the first one's size; run by run, each image
    (a sliced image's overview and its slices differ in size) gets what it gets alone."""
    model = AutoModelForImageTextToText.from_pretrained(outliers46, dtype=torch.float32).eval()
    sample = next(s for s in load_samples(None, num_samples=12, seed=0) if s.kind == "chart")
    data = CalibrationEncoder(outliers46)(sample, max_slice_nums=2)
    sizes = data["target_sizes"]
    assert len({tuple(size) for size in sizes.tolist()}) > 1   # an overview and slices of another size
    tower = model.model.vision_tower
    alone, column = [], 0
    with torch.no_grad():
        for size in sizes:
            width = int(size.prod()) * 14
            alone.append(tower(data["pixel_values"][..., column: column + width], size[None]).last_hidden_state)
            column += width
        with per_size_runs(model):
            runs = tower(data["pixel_values"], sizes).last_hidden_state
    torch.testing.assert_close(runs, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)


def test_the_driver_feeds_each_block_what_transformers_forward_feeds_it(outliers46):
    """With every block left as it is, the driver's capture and propagation end where transformers' forward does:
    the last decoder layer's outputs on every sample (images, several images, a video, text) are the model's
    own."""
    chosen = load_samples(None, num_samples=7)
    assert "video" in {s.kind for s in chosen}
    samples = [dict(CalibrationEncoder(outliers46)(s, 2), kind=s.kind) for s in chosen]
    reference = AutoModelForImageTextToText.from_pretrained(outliers46, dtype=torch.float32).eval()
    last = reference.model.language_model.layers[-1]
    expected = []
    handle = last.register_forward_hook(lambda module, args, output: expected.append(output))
    with torch.no_grad(), per_size_runs(reference):
        for data in samples:
            forward(reference, data)
    handle.remove()
    model = shell_model(reference.config)
    blocks = list(family_for("minicpmv4_6").blocks(model))
    seen, outputs = [], {}

    def run_block(name, block, calls):
        # One block holds weights at a time (memory flat with depth).
        assert all(p.is_meta for other, module in blocks if other != name for p in module.parameters())
        seen.append((name, len(calls)))
        with torch.no_grad():
            outputs[name] = [block(*args, **kwargs) for args, kwargs in calls]
        return outputs[name]

    SequentialDriver(model, CheckpointReader(outliers46), samples, torch.float32, "cpu").run(
        BlockHandler(run_block, lambda name, block: None))
    assert [name for name, _ in seen] == [
        "model.vision_tower.encoder.layers.0", "model.vision_tower.encoder.layers.1", "model.vision_tower.vit_merger",
        "model.vision_tower.encoder.layers.2", "model.merger", *(f"model.language_model.layers.{i}" for i in range(4))]
    # The merger runs once per forward for the images and once for the video.
    visual = sum(("pixel_values" in data) + ("pixel_values_videos" in data) for data in samples)
    assert dict(seen)["model.merger"] == visual and dict(seen)["model.language_model.layers.3"] == len(samples)
    assert all(p.is_meta for _, module in blocks for p in module.parameters())
    got = outputs["model.language_model.layers.3"]
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


# The held-out built-in set, encoded as calibration encodes (a disjoint split of the same generator): the inputs
# calibration is for, where the acceptance of issue 17 measures AWQ and GPTQ against RTN.
CALIBRATION_SAMPLES = 12


def _logits(path: Path, inputs: list[dict], **load) -> list[torch.Tensor]:
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, **load).eval()
    with torch.no_grad(), per_size_runs(model):
        return [forward(model, data).logits for data in inputs]


@pytest.fixture(scope="module")
def heldout_kl46(outliers46, tmp_path_factory):
    """Method → (held-out mean KL, quantize result) of the default recipe, for its default targets (vLLM), on
    tiny:4.6-outliers."""
    encoder = CalibrationEncoder(outliers46)
    inputs = [encoder(s, 2) for s in load_samples(None, split="heldout", seed=0)]
    reference = _logits(outliers46, inputs)
    work = tmp_path_factory.mktemp("calibrated46")
    found = {}
    for method in ("rtn", "gptq", "awq"):
        samples = {} if method == "rtn" else {"num_samples": CALIBRATION_SAMPLES}
        result = quantize(outliers46, work / method, method=method, progress=False, **samples)
        quantized = _logits(work / method, inputs, quantization_config=CompressedTensorsConfig(dequantize=True))
        kls = [_kl(ref, out)[0] for ref, out in zip(reference, quantized)]
        found[method] = (torch.cat(kls).mean().item(), result)
    return found


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_46_halves_rtn_kl_on_the_outlier_model(method, heldout_kl46):
    """Issue 17's acceptance: the default recipe's mean KL at most half of RTN's on tiny:4.6-outliers (measured
    2026-12-04 with 12 calibration samples, a video among them, each recipe for its default targets, on the whole
    held-out set: RTN 0.00892, GPTQ 0.00351, AWQ 0.00416; without its 3 video samples 0.01032, 0.00418, 0.00481).
    Every block got calibration input, and the only smoothing pair AWQ cannot apply is the one grouped-query
    attention rules out."""
    rtn, _ = heldout_kl46["rtn"]
    kl, result = heldout_kl46[method]
    assert 0 < kl <= 0.5 * rtn, (kl, rtn)
    assert result.data_free_blocks == []
    assert {(p["smooth"], tuple(p["balance"])) for p in result.skipped_pairs} <= {("self_attn.v_proj",
                                                                                  ("self_attn.o_proj",))}
    if method == "awq":
        assert set(result.awq_search) == {"vision", "vit_merger", "llm"}   # the merger is dense for vllm-gpu
        assert result.awq_search["llm"]["pairs"] == 3 * 4 + 3   # 3 linear-attention layers, 1 full-attention


def test_awq_on_46_is_deterministic(outliers46, tmp_path):
    outs = [tmp_path / name for name in ("a", "b")]
    for out in outs:
        quantize(outliers46, out, method="awq", target="vllm-gpu", num_samples=3, seed=3, progress=False)
    shards = [sorted(out.glob("*.safetensors")) for out in outs]
    assert [p.name for p in shards[0]] == [p.name for p in shards[1]] and shards[0]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*shards))


def test_every_46_smoothing_pair_leaves_its_block_unchanged(outliers46):
    """Scaling a pair (norms that scale by 1 + weight, the per-head gated norm included) is exact: each block of
    every kind gives the same outputs on its real inputs with random scales folded into all its pairs."""
    from mcq.models.family import component_of
    from mcq.quantize.awq import apply_scales, resolve_pairs

    family = family_for("minicpmv4_6")
    model = AutoModelForImageTextToText.from_pretrained(outliers46, dtype=torch.float32).eval()
    sample = next(s for s in load_samples(None, num_samples=12, seed=0) if s.kind == "chart")
    data = CalibrationEncoder(outliers46)(sample, max_slice_nums=2)
    blocks = dict(family.blocks(model))
    calls, handles = {}, []

    def first_call(name):
        def hook(module, args, kwargs):
            calls.setdefault(name, (args, kwargs))   # returns None: the block runs on its own inputs
        return hook

    for name, block in blocks.items():
        handles.append(block.register_forward_pre_hook(first_call(name), with_kwargs=True))
    with torch.no_grad(), per_size_runs(model):
        forward(model, data)
    for handle in handles:
        handle.remove()
    assert set(calls) == set(blocks)
    generator = torch.Generator().manual_seed(0)
    smoothed = 0
    for name, block in blocks.items():
        args, kwargs = calls[name]
        methods = {n: "awq" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        pairs, _ = resolve_pairs(block, family.smoothing_pairs[component_of(name + ".")], methods, family.norm_offset)
        with torch.no_grad():
            before = block(*args, **kwargs)
            for pair in pairs:
                width = block.get_submodule(pair.smooth).weight.shape[0]
                apply_scales(block, pair, torch.rand(width, generator=generator) * 3 + 0.25)
            after = block(*args, **kwargs)
        smoothed += len(pairs)
        for a, b in zip(before if isinstance(before, list) else [before], after if isinstance(after, list) else [after]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # vision 3 x 3, vit_merger 3, merger 1, 3 linear-attention layers x 4, the full-attention layer 3 (v -> o: GQA)
    assert smoothed == 9 + 3 + 1 + 12 + 3


def test_llm_compressors_awq_is_refused_where_it_would_smooth_wrongly(tmp_path, capsys):
    """Its AWQModifier divides a norm's weight by the scales: wrong for Qwen3.5's x̂ · (1 + weight) norms."""
    recipe = tmp_path / "awq-llmc.yaml"
    recipe.write_text("name: awq-llmc\nmethod: awq\nmethod_args: {engine: llm-compressor}\ntarget: vllm-gpu\n"
                      "rules:\n  - component: llm\n    bits: 4\n    group_size: 128\n    symmetric: false\n")
    assert main(["quantize", "--model", "tiny:4.6", "--recipe", str(recipe), "--num-samples", "2",
                 "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("engine llm-compressor cannot smooth input_layernorm in model.language_model.layers.0: "
                            "the norm scales by 1 + weight; use engine mcq"), err
    assert not (tmp_path / "q").exists()
