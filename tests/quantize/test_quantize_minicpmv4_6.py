"""`mcq quantize` on MiniCPM-V 4.6 (tiny:4.6): RTN block by block through its family's blocks, the output read
back by transformers' own classes; what 4.6 cannot do yet is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

from mcq.cli import main
from mcq.errors import McqError
from mcq.models.tiny import resolve_tiny
from mcq.quantize.api import quantize
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
    fc2 = [g for g in qc["config_groups"].values() if any("mlp\\.fc2" in t for t in g["targets"])]
    assert [g["weights"]["group_size"] for g in fc2] == [16]


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
    # The card names a runtime's test only where that test loads this family's outputs (vLLM's covers 2.6-4.5).
    card = (out / "README.md").read_text()
    assert "tests/validate/test_vllm.py" not in card and "tests/quantize/test_quantize_minicpmv4_6.py" in card


def test_pad_of_the_46_vision_mlp_is_refused(tiny46, tmp_path):
    # vision_config.intermediate_size also sizes the vit_merger: 4.6's family declares only the LLM's MLP paddable.
    with pytest.raises(McqError, match=r"'pad' .*encoder\.layers\.0\.mlp\.fc2 \(in_features 464.*pad grows only an "
                                       r"MLP's intermediate width \(mlp\.down_proj\)"):
        quantize(tiny46, tmp_path / "pad", recipe=_recipe(tmp_path, "pad"), progress=False)
    assert not (tmp_path / "pad").exists()


@pytest.mark.parametrize("argv,message", [
    (["--method", "gptq"], "gptq calibrates through the model's blocks, which mcq does not do for MiniCPM-V 4.6"),
    (["--method", "rtn", "--target", "remote-code"], "target remote-code cannot load MiniCPM-V 4.6: the official "
                                                     "remote code exists for MiniCPM-V 2.6 / 4.0 / 4.5 only"),
])
def test_what_46_cannot_do_yet_is_one_line(argv, message, tmp_path, capsys):
    assert main(["quantize", "--model", "tiny:4.6", "--out", str(tmp_path / "q"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
