"""Runtime rules (mcq.models.runtimes) and the plans `target:` / `--target` make from them: which modules stay dense,
zero points, groups and padding per runtime, fused groups, refusals before calibration, and what the output says."""

from __future__ import annotations

import json
import re

import pytest
from safetensors import safe_open

from mcq.cli import main
from mcq.errors import McqError
from mcq.models.families import RELEASES
from mcq.models.family import LinearInfo, linear_layers
from mcq.models.loading import meta_skeleton, model_spec, open_checkpoint
from mcq.models.minicpmv import checkpoint_names
from mcq.models.runtimes import (BITSANDBYTES, COMPRESSED_TENSORS, DEFAULT_TARGETS, KINDS, RUNTIMES, kind_of)
from mcq.models.tiny import resolve_tiny
from mcq.quantize.recipe import LayerScheme, load_recipe, parse_recipe, plan_quantization

from test_recipe import FC2, REAL_45, RESAMPLER_DENSE  # tests/quantize is on sys.path (pytest prepend)


def _linears(path) -> list[LinearInfo]:
    return linear_layers(meta_skeleton(open_checkpoint(path).config))


def _plan(rules, target, **top):
    return plan_quantization(parse_recipe({"name": "t", "method": "rtn", "target": target, "rules": rules, **top},
                                          "t"), REAL_45)


# ---------------------------------------------------------------------------------------------------- the table

def test_every_runtime_rules_every_kind_and_reads_a_format():
    for runtime in RUNTIMES.values():
        assert set(runtime.holds) == {kind.name for kind in KINDS}, runtime.name
        assert set(runtime.formats) <= {COMPRESSED_TENSORS, BITSANDBYTES}
    for fmt, targets in DEFAULT_TARGETS.items():
        assert targets and all(fmt in RUNTIMES[name].formats for name in targets)


def test_runtimes_that_read_the_official_layout_keep_its_packed_modules_dense():
    """The resampler's q/k/v (one packed in_proj_weight) and proj (a bare Parameter) have no module of their own
    officially: a runtime reading the official names can hold them dense only. The table must say so."""
    renamed = [layer.name for layer in REAL_45 if not checkpoint_names.official_module(layer.name)]
    assert renamed == ["resampler.attn.q_proj", "resampler.attn.k_proj", "resampler.attn.v_proj", "resampler.proj"]
    for runtime in RUNTIMES.values():
        dense = {name for name in renamed if runtime.holds_for(name).dense_only}
        assert dense == (set(renamed) if runtime.official_layout else set()), runtime.name


def test_every_linear_of_every_release_has_a_kind():
    """Each release's Linears all have a kind, and every kind is some release's (no rule for modules that exist
    nowhere)."""
    seen = set()
    for release in RELEASES:
        kinds = {layer.name: kind_of(layer.name) for layer in _linears(resolve_tiny(f"tiny:{release}"))}
        assert all(kinds.values()), (release, [name for name, kind in kinds.items() if kind is None])
        seen |= {kind.name for kind in kinds.values()}
    assert seen == {kind.name for kind in KINDS}
    assert kind_of("llm.model.layers.3.mlp.up_proj").fused_group("llm.model.layers.3.mlp.up_proj") == \
        "llm.model.layers.3.mlp.gate_up_proj"
    assert kind_of("vpm.encoder.layers.0.self_attn.k_proj").fused_group("vpm.encoder.layers.0.self_attn.k_proj") \
        == "vpm.encoder.layers.0.self_attn.qkv_proj"
    assert kind_of("vpm.encoder.layers.0.self_attn.out_proj").fused_group("x") is None
    # 4.6: vLLM's Qwen3.5 fuses the Gated DeltaNet input projections, its vit_merger fuses q/k/v.
    layer = "model.language_model.layers.0.linear_attn."
    assert [kind_of(layer + name).fused_group(layer + name) for name in ("in_proj_qkv", "in_proj_z", "in_proj_b",
                                                                         "in_proj_a")] == \
        [layer + "in_proj_qkvz"] * 2 + [layer + "in_proj_ba"] * 2
    merger = "model.vision_tower.vit_merger.self_attn."
    assert kind_of(merger + "v_proj").fused_group(merger + "v_proj") == merger + "qkv_proj"
    assert kind_of("lm_head").name == kind_of("llm.lm_head").name == "llm.lm_head"


# ---------------------------------------------------------------------------------------------------- plans

def test_the_gptq_default_fits_both_vllm_builds_at_real_widths():
    plan = plan_quantization(load_recipe("gptq-w4g128"), REAL_45)
    assert plan.targets == ("vllm-gpu", "vllm-cpu")
    assert plan.padded_widths() == {"vision": 4352}   # 34 × 128: group 128 and CPUWNA16's 32s both divide it
    assert plan.layer(FC2[0]).scheme == LayerScheme(4, 128, True)
    assert {l.name for l in plan.kept()} == RESAMPLER_DENSE | {"llm.lm_head"}
    assert plan.problems("vllm-gpu") == plan.problems("vllm-cpu") == plan.problems("mcq") == []
    assert plan.problems("remote-code") == []


def test_a_cpu_target_makes_zero_points_symmetric_and_says_why():
    plan = plan_quantization(load_recipe("awq-w4g128").with_targets("vllm-cpu"), REAL_45)
    assert {scheme.symmetric for scheme in plan.schemes()} == {True}
    assert plan.layer("llm.model.layers.0.self_attn.q_proj").reason == \
        "rule 1 (component: llm), symmetric: vllm-cpu runs no zero points at 4 bits"
    assert plan.problems("vllm-gpu") == []   # symmetric int4 runs on GPUs too
    # The default (vllm-gpu) keeps its zero points, and the CPU build cannot take that plan.
    gpu = plan_quantization(load_recipe("awq-w4g128"), REAL_45)
    layer, why = gpu.problems("vllm-cpu")[0]
    assert layer == "llm.model.layers.0.self_attn.q_proj"
    assert why.startswith("vllm-cpu runs int4 without zero points, not int4 with zero points")


def test_marlin_runs_no_int8_zero_points():
    plan = _plan([{"match": "^llm\\.", "bits": 8, "group_size": "channel", "symmetric": False}], "vllm-gpu")
    assert plan.layer("llm.model.layers.1.mlp.down_proj").scheme == LayerScheme(8, None, True)


def test_a_group_the_target_does_not_run_falls_back_or_is_refused():
    rules = [{"match": "^llm\\.", "bits": 4, "group_size": 256}]
    plan = _plan(rules, "vllm-gpu")
    layer = plan.layer("llm.model.layers.0.self_attn.q_proj")
    assert layer.scheme.group_size == 128 and layer.fallback
    assert layer.reason == "rule 1 (^llm\\.), group 256 → 128: vllm-gpu runs groups per channel, 32, 64, 128"
    assert _plan(rules, "mcq").layer("llm.model.layers.0.self_attn.q_proj").scheme.group_size == 256
    with pytest.raises(McqError) as err:
        _plan([{**rules[0], "non_divisible": "error"}], "vllm-gpu")
    message = str(err.value)
    assert "\n" not in message and message.startswith("recipe t cannot be loaded by its target (vllm-gpu): ")
    assert ": vllm-gpu runs groups per channel, 32, 64, 128, not group 256 (Marlin: " in message
    assert "): llm.model.layers.*.self_attn.q_proj, llm.model.layers.*.self_attn.k_proj" in message
    assert message.endswith("llm.model.layers.*.mlp.down_proj (rule 1 (^llm\\.))")


def test_a_per_channel_rule_pads_the_mlp_for_cpuwna16():
    plan = _plan([{"match": "^vpm\\.", "bits": 4, "group_size": "channel"}], "vllm-cpu")
    fc2 = plan.layer(FC2[0])
    assert fc2.scheme == LayerScheme(4, None, True) and fc2.pad_to == 4320   # the next multiple of 32
    assert fc2.reason == ("rule 1 (^vpm\\.), inputs zero-padded 4304 → 4320 (with the rows that feed them; exact): "
                          "vllm-cpu needs input widths that are multiples of 32, not 4304")
    assert plan.problems("vllm-cpu") == []


def test_a_fused_group_planned_two_ways_is_refused_for_a_fusing_runtime():
    rules = [{"match": "self_attn\\.q_proj$", "bits": 4, "group_size": 64},
             {"match": "^llm\\.model\\.layers\\.", "bits": 4, "group_size": 128}]
    with pytest.raises(McqError) as err:
        _plan(rules, "vllm-gpu")
    message = str(err.value)
    assert "vllm-gpu builds it as one Linear with one scheme, the plan has q_proj int4 g64 sym, k_proj int4 g128 " \
        "sym, v_proj int4 g128 sym: llm.model.layers.*.self_attn.qkv_proj (fused)" in message
    assert _plan(rules, "mcq").layer("llm.model.layers.0.self_attn.q_proj").scheme.group_size == 64
    # Half a fused group ignored is refused too (vLLM's should_ignore_layer raises on it at load).
    with pytest.raises(McqError, match=r"gate_proj int4 g128 sym, up_proj dense: .*mlp\.gate_up_proj \(fused\)"):
        _plan([rules[1]], "vllm-cpu", ignore=["up_proj$"])


def test_weight_only_int8_on_vllm_cpu_is_refused_naming_layers_rule_and_reason():
    with pytest.raises(McqError) as err:
        plan_quantization(load_recipe("rtn-w8").with_targets("vllm-cpu"), REAL_45)
    message = str(err.value)
    assert "\n" not in message and message.startswith("recipe rtn-w8 cannot be loaded by its target (vllm-cpu): ")
    why = ("vllm-cpu runs int4 without zero points, not int8 without zero points (CPUWNA16: int4 without zero points, "
           "both widths multiples of 32)")
    assert message.count(why) == 1 and message.endswith(
        "vpm.encoder.layers.*.mlp.fc2 (rule 2 (component: vision, vit_merger, merger)), "
        "resampler.kv_proj (rule 3 (component: resampler))")
    assert f"{why}: llm.model.layers.*.self_attn.q_proj, " in message


def test_a_quantized_lm_head_needs_a_vocabulary_in_32s_on_cpu():
    rules = [{"match": "^llm\\.", "bits": 4}]
    with pytest.raises(McqError, match=r"output widths that are multiples of 32, not 151748 .*: llm\.lm_head \(rule 1 "):
        _plan(rules, "vllm-cpu", quantize_lm_head=True)
    assert _plan(rules, "vllm-gpu", quantize_lm_head=True).layer("llm.lm_head").scheme == LayerScheme(4, 128, True)


def test_targets_are_checked_when_the_recipe_is_read():
    base = {"name": "t", "method": "gptq", "rules": [{"match": "^llm\\.", "bits": 4}]}
    assert parse_recipe(base, "t").targets == ("vllm-gpu",)
    assert parse_recipe({**base, "target": "vllm-cpu, mcq"}, "t").targets == ("vllm-cpu", "mcq")
    assert parse_recipe({**base, "target": ["vllm-gpu", "vllm-gpu"]}, "t").targets == ("vllm-gpu",)
    assert parse_recipe({**base, "method": "bnb", "rules": [{"match": "^llm\\.", "bits": 4}]}, "t").targets == \
        ("mcq", "remote-code-bnb")
    cases = {
        "sglang": "t: target: unknown runtime 'sglang'; runtimes: vllm-gpu, vllm-cpu, mcq, remote-code, "
                  "remote-code-bnb",
        "remote-code-bnb": "t: target: remote-code-bnb does not read compressed-tensors checkpoints (gptq recipes "
                           "write them); runtimes that do: vllm-gpu, vllm-cpu, mcq, remote-code",
        7: "t: target must be a runtime name or a list of them",
        "": "t: target must be a runtime name or a list of them",
    }
    for target, message in cases.items():
        with pytest.raises(McqError) as err:
            parse_recipe({**base, "target": target}, "t")
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(McqError, match="--target: vllm-gpu does not read bitsandbytes checkpoints"):
        load_recipe("bnb-nf4").with_targets("vllm-gpu")


# ---------------------------------------------------------------------------------------------------- end to end

def test_a_recipe_its_target_cannot_hold_fails_in_one_line_before_calibration(tiny45, tmp_path, capsys, monkeypatch):
    import mcq.calibration

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration data was read")

    monkeypatch.setattr(mcq.calibration, "load_samples", no_calibration)
    recipe = tmp_path / "w8-gptq.yaml"
    recipe.write_text("method: gptq\nrules:\n  - {match: '^llm\\.', bits: 8, group_size: channel}\n")
    out = tmp_path / "q"
    assert main(["quantize", "--recipe", str(recipe), "--target", "vllm-cpu", "--model", str(tiny45),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mcq: error: recipe w8-gptq cannot be loaded by its target "
                                                   "(vllm-cpu): vllm-cpu runs int4 without zero points, not int8")
    assert err.rstrip().endswith("llm.model.layers.*.mlp.down_proj (rule 1 (^llm\\.))")
    assert not out.exists()
    assert main(["quantize", "--method", "rtn", "--target", "tensorrt", "--model", str(tiny45),
                 "--out", str(out)]) == 2
    assert "--target: unknown runtime 'tensorrt'" in capsys.readouterr().err


def _stored_names(out) -> dict[str, list[int]]:
    shapes = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            shapes.update({name: handle.get_slice(name).get_shape() for name in handle.keys()})
    return shapes


def _config_group(name: str, qc: dict) -> str | None:
    """The config group vLLM gives a module (exact name or `re:` match, first wins), or "ignore"."""
    def matches(target):
        return re.match(target[3:], name) if target.startswith("re:") else target == name

    if any(matches(t) for t in qc["ignore"]):
        return "ignore"
    return next((group for group, scheme in qc["config_groups"].items() if any(matches(t) for t in scheme["targets"])),
                None)


def test_the_default_output_keeps_the_official_layout_and_consistent_fused_groups(tiny45, tmp_path):
    from mcq.quantize.api import quantize

    out = tmp_path / "rtn"
    result = quantize(tiny45, out, method="rtn", progress=False)
    shapes = _stored_names(out)
    # The resampler's attention and proj: dense, under the names vLLM and the official code read.
    assert shapes["resampler.attn.in_proj_weight"] == [768, 256] and shapes["resampler.proj"] == [256, 256]
    assert "resampler.attn.out_proj.weight" in shapes and "resampler.attn.in_proj_bias" in shapes
    assert not [name for name in shapes if name.startswith(("resampler.attn.q_proj", "resampler.attn.k_proj",
                                                             "resampler.attn.v_proj", "resampler.proj."))]
    assert "resampler.kv_proj.weight_packed" in shapes
    # The vision MLP grew to 512 (group 128 instead of 16): config and tensors agree.
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["intermediate_size"] == 512
    assert shapes["vpm.encoder.layers.0.mlp.fc2.weight_scale"] == [128, 4]
    qc = config["quantization_config"]
    assert {g["weights"]["group_size"] for g in qc["config_groups"].values()} == {128}
    assert "resampler.attn.out_proj" in qc["ignore"] and "llm.lm_head" in qc["ignore"]
    assert not [name for name in qc["ignore"] if name.startswith(("resampler.attn.q_proj", "resampler.proj"))]
    # Each fused group vLLM builds resolves to one config group (or is ignored whole).
    for prefix in ("llm.model.layers.0.self_attn.", "vpm.encoder.layers.1.self_attn."):
        assert len({_config_group(prefix + f"{p}_proj", qc) for p in "qkv"}) == 1
    assert len({_config_group(f"llm.model.layers.1.mlp.{p}_proj", qc) for p in ("gate", "up")}) == 1
    assert _config_group("resampler.attn.out_proj", qc) == "ignore"
    # What the output says about where it loads.
    assert result.targets == ["vllm-gpu"]
    assert result.runtimes["vllm-gpu"] == "target" and result.runtimes["mcq"] == "loads"
    assert result.runtimes["remote-code"] == "loads"
    assert result.runtimes["vllm-cpu"].startswith("no: vllm-cpu runs int4 without zero points, not int4 with zero "
                                                  "points")
    assert result.runtimes["vllm-cpu"].endswith("(27 layer(s): llm.model.layers.*.self_attn.q_proj, ...)")
    card = (out / "README.md").read_text()
    assert "## Runtimes\n\nBuilt for: `vllm-gpu`" in card
    assert "| `vllm-cpu`: vLLM's CPU build" in card and "| no | no: vllm-cpu runs int4 without zero points" in card
    assert ("`resampler.attn.q_proj, resampler.attn.k_proj, resampler.attn.v_proj, resampler.attn.out_proj` (4): "
            "dense: rule 3 (component: resampler), kept dense for vllm-gpu: vLLM builds resampler.attn as "
            "torch") in card
    manifest = json.loads((out / "mcq-manifest.json").read_text())
    assert manifest["recipe"]["target"] == ["vllm-gpu"] and manifest["extra"]["plan"]["targets"] == ["vllm-gpu"]
    assert manifest["extra"]["runtimes"] == result.runtimes


def test_only_the_explicit_mcq_target_writes_the_resampler_as_quantized_linears(tiny45, tmp_path):
    from mcq.quantize.api import quantize

    out = tmp_path / "own"
    result = quantize(tiny45, out, method="rtn", target="mcq", progress=False)
    shapes = _stored_names(out)
    assert "resampler.attn.q_proj.weight_packed" in shapes and "resampler.proj.weight_packed" in shapes
    assert shapes["vpm.encoder.layers.0.mlp.fc2.weight_scale"] == [128, 29]   # group 16, no padding
    assert result.runtimes == {"vllm-gpu": result.runtimes["vllm-gpu"], "vllm-cpu": result.runtimes["vllm-cpu"],
                               "mcq": "target", "remote-code": result.runtimes["remote-code"]}
    assert result.runtimes["vllm-gpu"].startswith("no: vllm-gpu runs groups per channel, 32, 64, 128, not group 16")
    assert result.runtimes["vllm-gpu"].endswith("(2 layer(s): vpm.encoder.layers.*.mlp.fc2, ...); 2 other reason(s)")
    assert "resampler.attn" in result.runtimes["remote-code"]


def test_the_writer_refuses_unofficial_names_for_an_official_layout(tiny45, tmp_path):
    import torch

    from mcq.models.weights import CheckpointReader
    from mcq.quantize.writers.compressed_tensors import CompressedTensorsWriter

    writer = CompressedTensorsWriter(CheckpointReader(tiny45), tmp_path)
    with pytest.raises(ValueError, match="resampler: names outside the official layout: "
                                         "resampler.attn.q_proj.weight_packed"):
        writer.add_block("resampler", torch.nn.Module(),
                         {"resampler.attn.q_proj.weight_packed": torch.zeros(2, 2, dtype=torch.int32)})
    own = CompressedTensorsWriter(CheckpointReader(tiny45), tmp_path / "own", official_layout=False)
    (tmp_path / "own").mkdir()
    own.add_block("resampler", torch.nn.Module(),
                  {"resampler.attn.q_proj.weight_packed": torch.zeros(2, 2, dtype=torch.int32)})


def test_a_recipe_whose_every_layer_a_target_keeps_dense_quantizes_nothing():
    with pytest.raises(McqError) as err:
        _plan([{"match": "^resampler\\.(attn|proj)", "bits": 4}], "vllm-gpu")
    assert str(err.value).startswith("recipe t quantizes nothing on this model: every Linear its rules match is kept "
                                     "(rule 1 (^resampler\\.(attn|proj)), kept dense for vllm-gpu: vLLM builds "
                                     "resampler.attn as torch nn.MultiheadAttention")
    assert _plan([{"match": "^resampler\\.(attn|proj)", "bits": 4}], "mcq").layer("resampler.proj").scheme


# ---------------------------------------------------------------------------------------------------- MiniCPM-V 4.6

def _linears_46(**text_config) -> list[LinearInfo]:
    """tiny:4.6's Linears, with `text_config` fields changed (a meta skeleton: no weights)."""
    config = open_checkpoint(resolve_tiny("tiny:4.6")).config
    for key, value in text_config.items():
        setattr(config.text_config, key, value)
    return linear_layers(meta_skeleton(config))


def test_the_default_recipe_on_46_keeps_what_vllm_builds_as_plain_linears_dense():
    plan = plan_quantization(load_recipe("rtn-w4g128"), _linears_46())
    assert plan.targets == ("vllm-gpu",) and plan.problems("vllm-gpu") == []
    plain = ["model.vision_tower.vit_merger.linear_1", "model.vision_tower.vit_merger.linear_2",
             "model.merger.mlp.0.linear_1", "model.merger.mlp.0.linear_2"]
    assert {layer.name for layer in plan.kept()} == {*plain, "lm_head"}
    assert all("vLLM builds MiniCPM-V 4.6's vit_merger.linear_1/2 and merger.* as plain nn.Linear" in
               plan.layer(name).reason for name in plain)
    # What vLLM builds with the quantization config is quantized: the vit_merger's attention, both LLM layer kinds.
    layer = "model.language_model.layers.0.linear_attn."
    for name in ("model.vision_tower.vit_merger.self_attn.q_proj", "model.vision_tower.vit_merger.self_attn.out_proj",
                 layer + "in_proj_qkv", layer + "in_proj_z", layer + "in_proj_b", layer + "in_proj_a",
                 layer + "out_proj", "model.language_model.layers.3.self_attn.q_proj"):
        assert plan.layer(name).scheme == LayerScheme(4, 128, False), name
    # No group Marlin runs divides 464: the encoder MLP grows to 512 (exact), and the vit_merger's MLP, 4x its width
    # in the model, with it (dense).
    fc2 = plan.layer("model.vision_tower.encoder.layers.0.mlp.fc2")
    assert fc2.scheme == LayerScheme(4, 128, False) and fc2.pad_to == 512
    assert plan.padded_widths() == {"vision": 512, "vit_merger": 2048}


@pytest.mark.parametrize("member,fused", [("in_proj_z", "in_proj_qkvz"), ("in_proj_a", "in_proj_ba")])
def test_a_linear_attention_group_planned_two_ways_is_refused_for_vllm(member, fused):
    rules = [{"match": member + "$", "bits": 8, "group_size": "channel"}, {"component": "llm", "bits": 4}]
    recipe = parse_recipe({"name": "t", "method": "rtn", "target": "vllm-gpu", "rules": rules}, "t")
    with pytest.raises(McqError, match=rf"vllm-gpu builds it as one Linear with one scheme, the plan has .*"
                                       rf"{member} int8 per-channel sym: model\.language_model\.layers\.\*\."
                                       rf"linear_attn\.{fused} \(fused\)"):
        plan_quantization(recipe, _linears_46())
    assert plan_quantization(recipe.with_targets("mcq"), _linears_46()).problems("mcq") == []


def test_vllm_cpu_holds_in_proj_ba_by_its_fused_width():
    """CPUWNA16 sees in_proj_b + in_proj_a as one layer: its width (two per value head) must be a multiple of 32.
    tiny:4.6 has 16 value heads as the release does (32 fused); 8 would give 16."""
    recipe = parse_recipe({"name": "t", "method": "rtn", "target": "vllm-cpu",
                           "rules": [{"component": "llm", "bits": 4}]}, "t")
    with pytest.raises(McqError, match=r"vllm-cpu needs output widths that are multiples of 16, not 8 .*"
                                       r"linear_attn\.in_proj_b, .*linear_attn\.in_proj_a \(rule 1"):
        plan_quantization(recipe, _linears_46(linear_num_value_heads=8))
    plan = plan_quantization(recipe, _linears_46())
    assert plan.layer("model.language_model.layers.0.linear_attn.in_proj_b").scheme == LayerScheme(4, 128, True)
