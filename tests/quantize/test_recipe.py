"""Recipes and the per-layer plan: built-ins on the tiny models, non_divisible policies on the real 4.5 widths,
validation messages, and `mcq recipes list/show`."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import yaml

from mcq.cli import main
from mcq.errors import McqError
from mcq.models.family import LinearInfo, family_for, linear_layers
from mcq.models.loading import meta_skeleton, model_spec
from mcq.quantize.recipe import (METHOD_ARGS, LayerScheme, builtin_recipe_names, dividing_groups, load_recipe,
                                 parse_recipe, plan_quantization)

BUILTINS = {"awq-w4g128": "awq", "gptq-w4g128": "gptq", "rtn-w4g128": "rtn", "rtn-w8": "rtn", "bnb-nf4": "bnb",
            "bnb-int8": "bnb", "awq-llm-only": "awq"}


# The resampler family's paddable MLPs, as `linear_layers` attaches them to a real model's Linears.
MLPS = family_for("minicpmv").paddable_mlps


def _real_45() -> list[LinearInfo]:
    """MiniCPM-V 4.5's Linears at their true widths (Qwen3-8B, SigLIP-400M), two layers each, and the resampler
    with its packed attention input projection as one Linear."""
    layers = []
    for i in range(2):
        prefix = f"llm.model.layers.{i}."
        layers += [LinearInfo(prefix + "self_attn.q_proj", "llm", 4096, 4096),
                   LinearInfo(prefix + "self_attn.k_proj", "llm", 4096, 1024),
                   LinearInfo(prefix + "self_attn.v_proj", "llm", 4096, 1024),
                   LinearInfo(prefix + "self_attn.o_proj", "llm", 4096, 4096),
                   LinearInfo(prefix + "mlp.gate_proj", "llm", 4096, 12288, MLPS["llm"]),
                   LinearInfo(prefix + "mlp.up_proj", "llm", 4096, 12288, MLPS["llm"]),
                   LinearInfo(prefix + "mlp.down_proj", "llm", 12288, 4096, MLPS["llm"])]
    layers.append(LinearInfo("llm.lm_head", "llm", 4096, 151748))
    for i in range(2):
        prefix = f"vpm.encoder.layers.{i}."
        layers += [LinearInfo(prefix + f"self_attn.{p}_proj", "vision", 1152, 1152) for p in ("q", "k", "v", "out")]
        layers += [LinearInfo(prefix + "mlp.fc1", "vision", 1152, 4304, MLPS["vision"]),
                   LinearInfo(prefix + "mlp.fc2", "vision", 4304, 1152, MLPS["vision"])]
    layers += [LinearInfo("resampler.kv_proj", "resampler", 1152, 4096),
               *[LinearInfo(f"resampler.attn.{p}_proj", "resampler", 4096, 4096) for p in ("q", "k", "v")],
               LinearInfo("resampler.attn.out_proj", "resampler", 4096, 4096),
               LinearInfo("resampler.proj", "resampler", 4096, 4096)]
    return layers


REAL_45 = _real_45()
FC2 = ["vpm.encoder.layers.0.mlp.fc2", "vpm.encoder.layers.1.mlp.fc2"]


def _recipe(policy: str = "fallback_group", group_size=128, **top):
    """One rule over the whole model, planned for mcq's own loader (no serving runtime's rules) unless `target`."""
    data = {"name": "t", "method": "rtn", "target": "mcq", "rules": [
        {"match": "^(llm|vpm|resampler)\\.", "bits": 4, "group_size": group_size, "symmetric": False,
         "non_divisible": policy}]}
    data.update(top)
    return parse_recipe(data, "test recipe")


def _tiny_linears(path) -> list[LinearInfo]:
    _, config, _ = model_spec(path)
    return linear_layers(meta_skeleton(config))


# ---------------------------------------------------------------------------------------------------- built-ins

def test_builtins_are_package_data_with_their_comments():
    assert builtin_recipe_names() == sorted(BUILTINS)
    folder = resources.files("mcq").joinpath("recipes")
    for name, method in BUILTINS.items():
        recipe = load_recipe(name)
        assert (recipe.name, recipe.method, recipe.source) == (name, method, "built-in")
        assert recipe.description and "\n" not in recipe.description
        assert recipe.text == folder.joinpath(f"{name}.yaml").read_text()
        assert recipe.text.startswith("#") and "Where the choices come from" in recipe.text


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtins_round_trip_through_to_dict(name, tmp_path):
    recipe = load_recipe(name)
    assert parse_recipe(recipe.to_dict(), "again") == recipe
    file = tmp_path / "copy.yaml"
    file.write_text(yaml.safe_dump(recipe.to_dict()))
    assert load_recipe(file) == recipe


RESAMPLER_DENSE = {"resampler.attn.q_proj", "resampler.attn.k_proj", "resampler.attn.v_proj",
                   "resampler.attn.out_proj", "resampler.proj"}   # modules vLLM and the official code hold dense
DEFAULT_TARGETS = {"awq-w4g128": ("vllm-gpu",), "gptq-w4g128": ("vllm-gpu", "vllm-cpu"), "rtn-w4g128": ("vllm-gpu",),
                   "rtn-w8": ("vllm-gpu",), "awq-llm-only": ("vllm-gpu", "remote-code"),
                   "bnb-nf4": ("mcq", "remote-code-bnb"), "bnb-int8": ("mcq", "remote-code-bnb")}


def test_builtins_plan_on_every_tiny_model(tiny_path):
    linears = _tiny_linears(tiny_path)
    names = [l.name for l in linears]
    fc2 = [n for n in names if n.endswith("mlp.fc2")]
    fc1 = [n for n in names if n.endswith("mlp.fc1")]
    assert fc2 and all(l.in_features == 464 for l in linears if l.name in fc2)  # 16 × 29, like 4304 = 16 × 269
    for name in BUILTINS:
        recipe = load_recipe(name)
        assert recipe.targets == DEFAULT_TARGETS[name]
        plan = plan_quantization(recipe, linears)
        assert [l.name for l in plan.layers] == names
        assert plan.layer("llm.lm_head").scheme is None and plan.layer("llm.lm_head").reason == "ignored (lm_head)"
        assert all(plan.problems(target) == [] for target in recipe.targets)
        quantized = {l.name for l in plan.quantized()}
        if name in ("awq-w4g128", "gptq-w4g128", "rtn-w4g128"):
            # Everything but the LM head and the resampler's attention and proj (dense, official names); the
            # vision MLP grows to 512 so that fc2 keeps group 128 (Marlin runs no group 16, CPUWNA16 needs 32s).
            assert quantized == set(names) - {"llm.lm_head"} - RESAMPLER_DENSE
            for layer in RESAMPLER_DENSE:
                assert "kept dense for vllm-gpu: vLLM builds resampler." in plan.layer(layer).reason
            for layer in fc2:
                assert plan.layer(layer).scheme.group_size == 128 and plan.layer(layer).pad_to == 512
                assert "group 128, inputs zero-padded 464 → 512 (with the rows that feed them; exact)" in \
                    plan.layer(layer).reason
            assert all(plan.layer(layer).pad_to == 512 for layer in fc1)
            assert plan.summary()["vision"]["changed"] == len(fc2) * 2
            assert {s.group_size for s in plan.schemes()} == {128}
            assert {s.symmetric for s in plan.schemes()} == {name == "gptq-w4g128"}
        elif name == "rtn-w8":
            assert quantized == set(names) - {"llm.lm_head"} - RESAMPLER_DENSE
            assert list(plan.schemes()) == [LayerScheme(8, None, True)]
            assert plan.padded_widths() == {}
        elif name == "awq-llm-only":
            assert quantized == {n for n in names if n.startswith("llm.model.layers.")}
            assert list(plan.schemes()) == [LayerScheme(4, 128, False)]
            assert plan.summary()["vision"] == {"quantized": 0, "kept": len(fc2) * 6, "changed": 0}
        else:  # bnb: the official -int4 skips; the resampler (kv_proj, attention, proj) is kept whole
            bits = 4 if name == "bnb-nf4" else 8
            assert list(plan.schemes()) == [LayerScheme(bits, None, True)]
            kept = {l.name for l in plan.kept()}
            assert {n for n in names if n.startswith("resampler.") or n.endswith("out_proj")} | {"llm.lm_head"} \
                == kept
            assert plan.summary()["resampler"]["quantized"] == 0
            assert not any(l.fallback for l in plan.layers)
        assert plan.unused_rules() == []


def test_builtins_on_the_real_45_widths():
    plan = plan_quantization(load_recipe("awq-w4g128"), REAL_45)
    fc2 = plan.layer(FC2[0])
    assert fc2.scheme == LayerScheme(4, 128, False) and fc2.fallback and fc2.pad_to == 4352
    assert fc2.reason == ("rule 2 (component: vision, vit_merger, merger), group 128, inputs zero-padded 4304 → 4352 "
                          "(with the rows that feed them; exact): no group ≤ 128 that vllm-gpu runs divides 4304")
    assert plan.layer("llm.model.layers.0.mlp.down_proj").reason == "rule 1 (component: llm)"
    assert plan.layer("resampler.attn.v_proj").scheme is None
    assert plan.layer("resampler.kv_proj").scheme == LayerScheme(4, 128, False)
    assert plan.summary() == {"vision": {"quantized": 12, "kept": 0, "changed": 4},
                              "resampler": {"quantized": 1, "kept": 5, "changed": 5},
                              "llm": {"quantized": 14, "kept": 1, "changed": 0}}
    assert list(plan.schemes()) == [LayerScheme(4, 128, False)]
    assert plan.padded_widths() == {"vision": 4352}

    # For mcq's own loader the same recipe keeps today's plan: fc2 at group 16, the resampler quantized whole.
    own = plan_quantization(load_recipe("awq-w4g128").with_targets("mcq"), REAL_45)
    assert own.layer(FC2[0]).scheme == LayerScheme(4, 16, False)
    assert own.layer(FC2[0]).reason == ("rule 2 (component: vision, vit_merger, merger), group 128 → 16: "
                                        "4304 = 16 × 269")
    assert own.layer("resampler.attn.v_proj").scheme == LayerScheme(4, 128, False)
    assert list(own.schemes()) == [LayerScheme(4, 16, False), LayerScheme(4, 128, False)]
    assert own.schemes()[LayerScheme(4, 16, False)] == FC2
    assert own.problems("vllm-gpu")[0] == ("vpm.encoder.layers.0.mlp.fc2", "vllm-gpu runs groups per channel, 32, "
                                           "64, 128, not group 16 (Marlin: int4 with or without zero points, int8 "
                                           "without; groups 32/64/128 or per channel)")

    # bnb: blocks over the flattened weight, so fc2 needs no fallback; the q/k/v split of the packed in_proj is
    # kept like the bare Parameter it was in the official model.
    bnb = plan_quantization(load_recipe("bnb-nf4"), REAL_45)
    assert bnb.layer(FC2[0]).scheme == LayerScheme(4, None, True) and not bnb.layer(FC2[0]).fallback
    assert {l.name for l in bnb.kept()} == {"llm.lm_head", "vpm.encoder.layers.0.self_attn.out_proj",
                                            "vpm.encoder.layers.1.self_attn.out_proj", "resampler.kv_proj",
                                            "resampler.attn.q_proj", "resampler.attn.k_proj",
                                            "resampler.attn.v_proj", "resampler.attn.out_proj", "resampler.proj"}
    assert bnb.layer("resampler.proj").reason == "ignored (^resampler\\.proj$)"


def test_awq_llm_only_refuses_an_llm_width_that_128_does_not_divide():
    odd = [*REAL_45, LinearInfo("llm.model.layers.2.mlp.down_proj", "llm", 4304, 4096, MLPS["llm"])]
    with pytest.raises(McqError, match=r"llm\.model\.layers\.2\.mlp\.down_proj \(in_features 4304"):
        plan_quantization(load_recipe("awq-llm-only"), odd)


# ---------------------------------------------------------------------------------------------------- policies

def test_fallback_group_takes_the_largest_power_of_two_that_divides():
    plan = plan_quantization(_recipe("fallback_group"), REAL_45)
    assert [plan.layer(n).scheme.group_size for n in FC2] == [16, 16]
    assert all(plan.layer(n).fallback for n in FC2)
    assert [l.name for l in plan.layers if l.fallback] == FC2
    assert plan_quantization(_recipe(group_size=32), REAL_45).layer(FC2[0]).scheme.group_size == 16
    # 8 divides 4304, so a requested group of 8 needs no fallback at all
    eight = plan_quantization(_recipe(group_size=8), REAL_45).layer(FC2[0])
    assert eight.scheme.group_size == 8 and not eight.fallback and eight.reason == "rule 1 (^(llm|vpm|resampler)\\.)"
    # 4100 = 4 × 1025: no power-of-two group of 8 or more divides it → per channel
    odd = plan_quantization(_recipe(), [LinearInfo("vpm.x", "vision", 4100, 64)]).layer("vpm.x")
    assert odd.scheme == LayerScheme(4, None, False) and odd.fallback
    assert odd.reason.endswith("group 128 → per channel: no power-of-two group >= 8 divides 4100")
    assert dividing_groups(4304, 128) == [8, 16] and dividing_groups(464, 128) == [8, 16]
    assert dividing_groups(4096, 64) == [8, 16, 32, 64] and dividing_groups(4100, 128) == []


def test_pad_keeps_the_group_and_grows_the_mlp_width():
    plan = plan_quantization(_recipe("pad"), REAL_45)
    fc2 = plan.layer(FC2[0])
    assert fc2.scheme == LayerScheme(4, 128, False) and fc2.fallback and fc2.pad_to == 4352
    assert fc2.reason.endswith("group 128, inputs zero-padded 4304 → 4352 (with the rows that feed them; exact)")
    fc1 = plan.layer("vpm.encoder.layers.0.mlp.fc1")   # its outputs grow with the MLP
    assert fc1.pad_to == 4352 and fc1.reason.endswith("outputs zero-padded 4304 → 4352 with the MLP (exact)")
    assert plan.padded_widths() == {"vision": 4352}
    assert list(plan.schemes()) == [LayerScheme(4, 128, False)]


def test_pad_refuses_a_layer_whose_input_width_cannot_grow():
    # group 256 divides neither SigLIP's hidden width (1152, fed by a norm) nor 4304: only fc2 can be padded.
    with pytest.raises(McqError, match=r"'pad'.*self_attn\.q_proj \(in_features 1152.*pad grows only an MLP"):
        plan_quantization(_recipe("pad", group_size=256), REAL_45)


def test_per_channel_policy():
    fc2 = plan_quantization(_recipe("per_channel"), REAL_45).layer(FC2[1])
    assert fc2.scheme == LayerScheme(4, None, False) and fc2.fallback
    assert fc2.reason.endswith("group 128 → per channel: 4304 not divisible by 128")


def test_skip_policy_keeps_the_layer():
    plan = plan_quantization(_recipe("skip"), REAL_45)
    fc2 = plan.layer(FC2[0])
    assert fc2.scheme is None and fc2.fallback and fc2.rule == 1
    assert fc2.reason == "rule 1 (^(llm|vpm|resampler)\\.), skipped: 4304 not divisible by 128"
    assert {l.name for l in plan.kept()} == {*FC2, "llm.lm_head"}
    assert plan.summary()["vision"] == {"quantized": 10, "kept": 2, "changed": 2}


def test_error_policy_lists_every_offending_layer_in_one_line():
    with pytest.raises(McqError) as err:
        plan_quantization(_recipe("error"), REAL_45)
    message = str(err.value)
    assert "\n" not in message and "2 Linear(s)" in message
    for name in FC2:
        assert f"{name} (in_features 4304, rule 1 (^(llm|vpm|resampler)\\.) group 128; groups that divide it: 8, 16)" \
            in message
    with pytest.raises(McqError, match="no power-of-two group divides it: use per_channel"):
        plan_quantization(_recipe("error"), [LinearInfo("vpm.x", "vision", 4100, 64)])


def test_per_channel_rules_ignore_divisibility():
    plan = plan_quantization(_recipe("error", group_size="channel"), REAL_45)
    assert plan.layer(FC2[0]).scheme == LayerScheme(4, None, False) and not plan.layer(FC2[0]).fallback


# ---------------------------------------------------------------------------------------------------- matching

def test_first_matching_rule_wins_and_unmatched_layers_are_kept():
    recipe = parse_recipe({"name": "t", "method": "gptq", "rules": [
        {"match": "mlp\\.fc2$", "bits": 8, "group_size": "channel"},
        {"match": "^vpm\\.", "bits": 4},
        {"match": "^vpm\\.encoder", "bits": 4},  # shadowed by rule 2
        {"match": "^apm\\.", "bits": 4},  # matches nothing
    ]}, "t")
    plan = plan_quantization(recipe, REAL_45)
    assert plan.layer(FC2[0]).scheme == LayerScheme(8, None, True) and plan.layer(FC2[0]).rule == 1
    assert plan.layer("vpm.encoder.layers.0.mlp.fc1").scheme == LayerScheme(4, 128, True)
    assert plan.layer("llm.model.layers.0.mlp.up_proj").reason == "no rule matches"
    assert [r.index for r in plan.unused_rules()] == [3, 4]
    assert plan.summary()["llm"] == {"quantized": 0, "kept": 15, "changed": 0}


def test_re_prefix_matches_from_the_start_like_llm_compressor():
    searched = plan_quantization(_recipe(ignore=["encoder"]), REAL_45)
    assert searched.layer(FC2[0]).reason == "ignored (encoder)"
    from_start = plan_quantization(_recipe(ignore=["re:encoder"]), REAL_45)
    assert from_start.layer(FC2[0]).scheme is not None
    anchored = plan_quantization(_recipe(ignore=["re:vpm\\.encoder"]), REAL_45)
    assert anchored.layer(FC2[0]).reason == "ignored (re:vpm\\.encoder)"


def test_lm_head_is_kept_unless_asked_for():
    assert plan_quantization(_recipe(), REAL_45).layer("llm.lm_head").reason == "ignored (lm_head)"
    plan = plan_quantization(_recipe(quantize_lm_head=True), REAL_45)
    assert plan.layer("llm.lm_head").scheme == LayerScheme(4, 128, False)
    # an explicit ignore still wins over quantize_lm_head
    plan = plan_quantization(_recipe(quantize_lm_head=True, ignore=["lm_head$"]), REAL_45)
    assert plan.layer("llm.lm_head").reason == "ignored (lm_head$)"


def test_a_recipe_that_quantizes_nothing_is_an_error():
    recipe = parse_recipe({"name": "t", "method": "rtn", "rules": [{"match": "^apm\\.", "bits": 4}]}, "t")
    with pytest.raises(McqError) as err:
        plan_quantization(recipe, REAL_45)
    message = str(err.value)
    assert "no rule matches" in message and "vpm.encoder.layers.*.mlp.fc2" in message
    assert "llm.model.layers.*.self_attn.q_proj" in message and "resampler.attn.q_proj" in message
    only_fc2 = parse_recipe({"name": "t", "method": "rtn", "rules": [
        {"match": "fc2$", "bits": 4, "non_divisible": "skip"}]}, "t")
    with pytest.raises(McqError, match="skipped"):
        plan_quantization(only_fc2, REAL_45)


def test_plan_to_dict_is_json():
    data = json.loads(json.dumps(plan_quantization(_recipe("pad"), REAL_45).to_dict()))
    fc2 = next(l for l in data["layers"] if l["name"] == FC2[0])
    assert fc2["scheme"] == {"bits": 4, "group_size": 128, "symmetric": False} and fc2["pad_to"] == 4352
    assert data["summary"]["vision"]["changed"] == 4 and data["method"] == "rtn" and data["targets"] == ["mcq"]
    assert fc2["kind"] == "vision.mlp.fc2"


# ---------------------------------------------------------------------------------------------------- validation

LOSS_TOKENS = METHOD_ARGS["awq"]["loss_tokens"][0]
GOOD = {"name": "t", "method": "awq", "rules": [{"match": "^llm\\.", "bits": 4}, {"match": "^vpm\\.", "bits": 4}]}


def _with(**changes):
    data = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        target, *keys = path.split("__")
        node = data
        if target == "rule2":
            node = data["rules"][1]
        elif target != "top":
            node = data.setdefault(target, {})
        node[keys[0]] = value
    return data


INVALID = {
    "unknown top key": (_with(top__rule=[]), "test: unknown key 'rule'; allowed keys: name, description, method, "
                                            "method_args, calibration, ignore, quantize_lm_head, target, rules"),
    "unknown rule key": (_with(rule2__bit=4), "test: rule 2: unknown key 'bit'; allowed keys: component, match, bits, "
                                             "group_size, symmetric, non_divisible, method"),
    "unknown method arg": (_with(method_args__n_grids=3), "test: method_args: unknown key 'n_grids' (for awq); "
                                                         "allowed keys: engine, duo_scaling, n_grid, weight_observer, "
                                                         "loss_tokens, weight_clip"),
    "bad regex": (_with(rule2__match="vpm.(("), "test: rule 2: match: bad regular expression 'vpm.(('"),
    "bad ignore regex": (_with(top__ignore=["ok", "[a-"]), "test: ignore entry 2: bad regular expression '[a-'"),
    "empty pattern": (_with(rule2__match=""), "rule 2: match: empty pattern"),
    "pattern not a string": (_with(top__ignore=[3]), "ignore entry 1: a pattern must be a string"),
    "ignore not a list": (_with(top__ignore="lm_head"), "ignore must be a list"),
    "bits 3": (_with(rule2__bits=3), "test: rule 2: bits must be one of 4, 8, got 3"),
    "bits bool": (_with(rule2__bits=True), "rule 2: bits must be one of 4, 8, got true"),
    "bits string": (_with(rule2__bits="4"), "rule 2: bits must be one of 4, 8, got '4'"),
    "missing bits": ({**GOOD, "rules": [{"match": "x"}]}, "rule 1: missing key 'bits'"),
    "unknown method": (_with(top__method="hqq"), "unknown method 'hqq'; methods: awq, gptq, rtn, bnb"),
    "missing method": ({"name": "t", "rules": GOOD["rules"]}, "missing key 'method'"),
    "unknown policy": (_with(rule2__non_divisible="round"), "rule 2: non_divisible must be one of 'fallback_group', "
                                                           "'pad', 'per_channel', 'skip', 'error', got 'round'"),
    "group not power of two": (_with(rule2__group_size=100), "rule 2: group_size must be a power of two >= 8"),
    "group as string": (_with(rule2__group_size="128"), "got '128'"),
    "group too small": (_with(rule2__group_size=4), "got 4"),
    "symmetric not bool": (_with(rule2__symmetric="yes"), "rule 2: symmetric must be true or false, got 'yes'"),
    "duo_scaling int": (_with(method_args__duo_scaling=1), "duo_scaling must be one of true, false, 'both', got 1"),
    "observer": (_with(method_args__weight_observer="hist"), "weight_observer must be one of 'minmax', 'mse'"),
    "n_grid": (_with(method_args__n_grid=0), "n_grid must be a positive integer, got 0"),
    "engine": (_with(method_args__engine="autoawq"), "engine must be one of 'mcq', 'llm-compressor', got 'autoawq'"),
    "loss_tokens": (_with(method_args__loss_tokens=0), "loss_tokens must be a positive integer, got 0"),
    "weight_clip": (_with(method_args__weight_clip="yes"), "weight_clip must be true or false, got 'yes'"),
    # llm-compressor's AWQ scores every token and clips nothing: these would be silently ignored
    "loss_tokens on llm-compressor": (_with(method_args__engine="llm-compressor", method_args__loss_tokens=512),
                                      "method_args: loss_tokens applies to engine mcq, not llm-compressor"),
    "weight_clip on llm-compressor": (_with(method_args__engine="llm-compressor", method_args__weight_clip=True),
                                      "method_args: weight_clip applies to engine mcq, not llm-compressor"),
    "no rules": (_with(top__rules=[]), "rules must be a non-empty list"),
    "rule not a mapping": (_with(top__rules=["^llm"]), "rule 1: must be a mapping"),
    "bad name": (_with(top__name="my recipe"), "name 'my recipe' must be letters"),
    "two-line description": (_with(top__description="a\nb"), "description must be one line"),
    "calibration key": (_with(calibration__samples=8), "calibration: unknown key 'samples'; allowed keys: "
                                                      "num_samples, max_slice_nums"),
    "calibration value": (_with(calibration__num_samples=0), "calibration: num_samples must be a positive integer"),
    "lm_head flag": (_with(top__quantize_lm_head="no"), "quantize_lm_head must be true or false"),
    "method_args not mapping": (_with(top__method_args=[1]), "method_args must be a mapping"),
    "unknown component": (_with(rule2__component="vpm"), "test: rule 2: component: unknown component 'vpm'; "
                                                         "components: vision, resampler, llm, vit_merger, merger"),
    "component in a list": (_with(rule2__component=["llm", "projector"]), "unknown component 'projector'"),
    "component not a name": (_with(rule2__component=3), "rule 2: component must be a component name or a list"),
    "empty component list": (_with(rule2__component=[]), "rule 2: component must be a component name or a list"),
    "no selector": ({**GOOD, "rules": [{"bits": 4}]}, "rule 1: missing key 'component' or 'match'"),
    "bnb unknown component": ({"name": "t", "method": "bnb", "rules": [{"component": "apm", "bits": 4}]},
                              "rule 1: component: unknown component 'apm'"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_recipes_name_the_key(case):
    data, message = INVALID[case]
    with pytest.raises(McqError) as err:
        parse_recipe(data, "test")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


METHOD_SPECIFIC = {
    "gptq dampening": ({"method": "gptq", "method_args": {"dampening_frac": 1.5}},
                       "dampening_frac must be a number between 0 and 1"),
    "gptq actorder": ({"method": "gptq", "method_args": {"actorder": "desc"}},
                      "actorder must be one of 'static', 'group', 'weight', null"),
    "rtn takes no calibration": ({"method": "rtn", "calibration": {"num_samples": 8}},
                                 "calibration: rtn is data-free and takes no calibration"),
    "awq arg on rtn": ({"method": "rtn", "method_args": {"n_grid": 20}}, "unknown key 'n_grid' (for rtn)"),
    "bnb group size": ({"method": "bnb", "rules": [{"match": "x", "bits": 4, "group_size": 64}]},
                       "rule 1: unknown key 'group_size' (bnb quantizes blocks of 64 over the flattened weight"),
    "bnb mixed bits": ({"method": "bnb", "rules": [{"match": "x", "bits": 4}, {"match": "y", "bits": 8}]},
                       "the rules mix 4 and 8 bits"),
    "bnb 4-bit option at 8 bits": ({"method": "bnb", "method_args": {"quant_type": "nf4"},
                                    "rules": [{"match": "x", "bits": 8}]},
                                   "unknown key 'quant_type' (for bnb with 8-bit rules); allowed keys: int8_threshold"),
    "bnb threshold at 4 bits": ({"method": "bnb", "method_args": {"int8_threshold": 6.0},
                                 "rules": [{"match": "x", "bits": 4}]}, "unknown key 'int8_threshold'"),
    "bnb quant type": ({"method": "bnb", "method_args": {"quant_type": "int4"}, "rules": [{"match": "x", "bits": 4}]},
                       "quant_type must be one of 'nf4', 'fp4'"),
    "bnb calibration": ({"method": "bnb", "calibration": {}, "rules": [{"match": "x", "bits": 4}]}, "data-free"),
}


@pytest.mark.parametrize("case", sorted(METHOD_SPECIFIC))
def test_method_specific_validation(case):
    changes, message = METHOD_SPECIFIC[case]
    with pytest.raises(McqError) as err:
        parse_recipe({**GOOD, **changes}, "test")
    assert message in str(err.value), str(err.value)


def test_defaults_are_filled_in():
    recipe = parse_recipe(GOOD, "test")
    assert dict(recipe.method_args) == {"engine": "mcq", "duo_scaling": True, "n_grid": 20,
                                        "weight_observer": "minmax", "loss_tokens": LOSS_TOKENS, "weight_clip": True}
    on_llmc = parse_recipe({**GOOD, "method_args": {"engine": "llm-compressor"}}, "t")
    assert "loss_tokens" not in on_llmc.method_args and "weight_clip" not in on_llmc.method_args
    assert parse_recipe(on_llmc.to_dict(), "again") == on_llmc
    assert (recipe.calibration.num_samples, recipe.calibration.max_slice_nums) == (64, 2)
    rule = recipe.rules[0]
    assert (rule.bits, rule.group_size, rule.symmetric, rule.non_divisible) == (4, 128, True, "fallback_group")
    assert recipe.ignore == () and recipe.quantize_lm_head is False
    gptq = parse_recipe({**GOOD, "method": "gptq", "method_args": {"actorder": None}}, "t")
    assert dict(gptq.method_args) == {"block_size": 128, "dampening_frac": 0.01, "actorder": None}
    nf4 = parse_recipe({**GOOD, "method": "bnb"}, "t")
    assert dict(nf4.method_args) == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    assert nf4.calibration is None and nf4.rules[0].group_size is None
    int8 = parse_recipe({"name": "t", "method": "bnb", "rules": [{"match": "x", "bits": 8}]}, "t")
    assert dict(int8.method_args) == {"int8_threshold": 6.0}


# ---------------------------------------------------------------------------------------------------- files

def test_recipe_files(tmp_path):
    file = tmp_path / "mine.yaml"
    file.write_text("method: rtn\nrules:\n  - match: '^vpm\\.'\n    bits: 8\n    group_size: channel\n")
    recipe = load_recipe(str(file))
    assert recipe.name == "mine" and recipe.source == str(file) and recipe.rules[0].group_size is None
    plan = plan_quantization(recipe, REAL_45)
    assert {l.component for l in plan.quantized()} == {"vision"}

    with pytest.raises(McqError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")
    with pytest.raises(McqError, match="is not a file"):
        load_recipe(str(tmp_path) + "/")
    (tmp_path / "bad.yaml").write_text("method: rtn\nrules: [\n")
    with pytest.raises(McqError) as err:
        load_recipe(tmp_path / "bad.yaml")
    assert "is not valid YAML" in str(err.value) and "(line " in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "twice.yaml").write_text("method: rtn\nmethod: awq\nrules: []\n")
    with pytest.raises(McqError, match="duplicate key 'method'"):
        load_recipe(tmp_path / "twice.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(McqError, match="list.yaml: a recipe must be a YAML mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_unknown_recipe_name_lists_the_builtins():
    with pytest.raises(McqError) as err:
        load_recipe("awq-w3")
    assert str(err.value).startswith("unknown recipe 'awq-w3'; built-in recipes: awq-llm-only, awq-w4g128,")
    assert all(name in str(err.value) for name in BUILTINS)


# ---------------------------------------------------------------------------------------------------- CLI

def test_cli_recipes_list(capsys):
    assert main(["recipes", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "method", "target", "description"]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert rows == BUILTINS
    assert {line.split()[0]: tuple(line.split()[2].split(",")) for line in lines[1:]} == DEFAULT_TARGETS
    assert main(["recipes", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["method"] for r in listed} == BUILTINS
    assert all(r["description"] == load_recipe(r["name"]).description for r in listed)


def test_cli_recipes_show(tmp_path, capsys):
    assert main(["recipes", "show", "bnb-nf4"]) == 0
    out = capsys.readouterr().out
    assert out == load_recipe("bnb-nf4").text  # as shipped, comments included
    assert main(["recipes", "show", "gptq-w4g128", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == load_recipe("gptq-w4g128").to_dict() and shown["rules"][1]["symmetric"] is True
    file = tmp_path / "r.yaml"
    file.write_text("name: mine\nmethod: rtn\nrules: [{match: x, bits: 4}]\n")
    assert main(["recipes", "show", str(file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rules"][0]["non_divisible"] == "fallback_group"


@pytest.mark.parametrize("argv,message", [
    (["recipes", "show", "nope"], "unknown recipe 'nope'; built-in recipes: awq-llm-only"),
    (["recipes", "show", "nope", "--json"], "unknown recipe 'nope'"),
])
def test_cli_unknown_recipe_is_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mcq: error:") and message in err and len(err.splitlines()) == 1


def test_cli_invalid_recipe_file_is_exit_2(tmp_path, capsys):
    file = tmp_path / "r.yaml"
    file.write_text("method: rtn\nrules: [{match: x, bits: 5}]\n")
    assert main(["recipes", "show", str(file)]) == 2
    assert capsys.readouterr().err.strip() == f"mcq: error: {file}: rule 1: bits must be one of 4, 8, got 5"


def test_a_rule_may_pick_another_calibrated_method():
    recipe = parse_recipe({"name": "t", "method": "awq", "rules": [
        {"match": "^llm\\.", "bits": 4}, {"match": "^resampler\\.", "bits": 4, "method": "gptq"}]}, "t")
    assert [rule.method for rule in recipe.rules] == ["awq", "gptq"]
    assert parse_recipe(recipe.to_dict(), "again") == recipe
    assert load_recipe("awq-w4g128").rules[-1].method == "gptq"
    with pytest.raises(McqError, match="rule 1: method"):
        parse_recipe({"name": "t", "method": "rtn", "rules": [{"match": "x", "bits": 4, "method": "gptq"}]}, "t")


# ---------------------------------------------------------------------------------------------------- components

def test_a_rule_selects_by_component_and_by_name_together():
    recipe = parse_recipe({"name": "t", "method": "rtn", "target": "mcq", "rules": [
        {"component": "vision", "match": "mlp\\.fc2$", "bits": 8, "group_size": "channel"},
        {"component": ["llm", "resampler"], "bits": 4}]}, "t")
    plan = plan_quantization(recipe, REAL_45)
    assert plan.layer(FC2[0]).scheme == LayerScheme(8, None, True)
    assert plan.layer("vpm.encoder.layers.0.mlp.fc1").reason == "no rule matches"   # vision, but not fc2
    assert plan.layer("resampler.kv_proj").reason == "rule 2 (component: llm, resampler)"
    assert plan.layer(FC2[0]).reason == "rule 1 (component: vision; mlp\\.fc2$)"
    assert recipe.to_dict()["rules"][1]["component"] == ["llm", "resampler"]
    assert parse_recipe(recipe.to_dict(), "again") == recipe


def test_a_name_only_rule_reads_and_dumps_as_before_components():
    """User recipes written with `match:` alone keep their plan reasons and their dumped form (manifests, cards)."""
    rule = parse_recipe({"name": "t", "method": "rtn", "rules": [{"match": "^llm\\.", "bits": 4}]}, "t").rules[0]
    assert rule.describe() == "rule 1 (^llm\\.)" and rule.components == ()
    assert list(parse_recipe({"name": "t", "method": "rtn", "rules": [{"match": "^llm\\.", "bits": 4}]}, "t")
                .to_dict()["rules"][0]) == ["match", "bits", "group_size", "symmetric", "non_divisible", "method"]


def test_builtin_rules_name_components_not_module_names():
    """The built-in recipes apply to every family: no rule names a family's module prefix."""
    for name in builtin_recipe_names():
        assert all(rule.pattern is None and rule.components for rule in load_recipe(name).rules), name
