"""mcq's AWQ scale search (mcq/quantize/awq.py) against llm-compressor's AWQModifier, and the pairs AWQ skips.

The search is llm-compressor's algorithm with its compute spent elsewhere, so the pieces are pinned to it: the
candidate grid, the rounding of a candidate (bit for bit), and, with a token budget that covers every calibration
token, the scales chosen on a real block. Quality on the outlier model (against llm-compressor's AWQ and RTN) is in
test_quantize.py, where the variants are built once.
"""

from __future__ import annotations

import json

import pytest
import torch

from mcq.calibration import load_samples
from mcq.calibration.encode import encode_sample
from mcq.models.family import family_for, linear_layers
from mcq.models.loading import load_processor, model_spec
from mcq.models.weights import CheckpointReader, named_blocks, shell_model
from mcq.quantize import awq
from mcq.quantize.api import format_result, quantize
from mcq.quantize.llmc import LlmCompressorBlockQuantizer, quantization_args
from mcq.quantize.recipe import LayerScheme, plan_quantization
from mcq.quantize.sequential import BlockHandler, Calls, SequentialDriver


# -- the pieces, against llm-compressor's ----------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", [LayerScheme(4, 128, False), LayerScheme(4, None, False), LayerScheme(4, 16, True),
                                    LayerScheme(8, 32, False)])
def test_a_candidates_rounding_is_llmcompressors_bit_for_bit(scheme):
    """Q(W·s)/s for a batch of candidates equals what llm-compressor's grid search computes for each: its
    memoryless min/max observer, compressed-tensors' qparams (scales rounded to bf16) and fake quantization."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor.observers.base import Observer

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator)
    scales = torch.rand(3, 256, generator=generator) + 0.5
    args = quantization_args(scheme, observer="minmax", scale_dtype=torch.bfloat16)
    # into a buffer, as the grid search rounds every candidate: whatever it held before is overwritten
    ours = awq.fake_quantized(weight, scales, args, out=torch.full((3, 64, 256), float("nan")))
    for g in range(3):
        observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
        qparams = observer(weight * scales[g]).get_qparams()
        expected = fake_quantize(weight * scales[g], qparams["scale"], qparams["zero_point"], args) / scales[g]
        assert torch.equal(ours[g], expected), (scheme, g)


@pytest.mark.parametrize("duo_scaling", [True, False, "both"])
def test_the_grid_is_llmcompressors(duo_scaling):
    from llmcompressor.modifiers.transform.awq import AWQModifier

    theirs = AWQModifier(duo_scaling=duo_scaling, n_grid=20)._get_grid_search_params()
    ours = awq.grid(20, duo_scaling)
    # `both` evaluates r = 1 once: the duo form there is mean|x| / (1 + 1e-4), the plain one normalized.
    assert ours == [c for c in theirs if not (duo_scaling == "both" and c == (1.0, True))]


def test_rows_for_attention_take_every_kind_before_a_second_sample_of_any():
    calls = [((torch.zeros(3, 10, 4),), {}), ((torch.zeros(1, 10, 4),), {}), ((torch.zeros(2, 10, 4),), {})]
    origins = [(("chart", 0), ("chart", 0), ("scene", 1)), (("video", 2),), (("chart", 3), ("scene", 4))]
    # 3 rows of 10 tokens: chart, scene, video, each its first sample's first slice
    assert awq.pick_rows(calls, origins, budget=30) == {0: [0, 2], 1: [0]}
    # every kind, even past the budget
    assert awq.pick_rows(calls, origins, budget=1) == {0: [0, 2], 1: [0]}
    # 5 rows: then the second samples of chart and scene, before the first sample's second chart slice
    assert awq.pick_rows(calls, origins, budget=50) == {0: [0, 2], 1: [0], 2: [0, 1]}
    assert awq.pick_rows(calls, origins, budget=10 ** 6) == {0: [0, 1, 2], 1: [0], 2: [0, 1]}


def test_pairs_that_cannot_smooth_are_reported_with_the_reason(tiny45):
    _, config, _ = model_spec(tiny45)
    model = shell_model(config)
    layer = model.llm.model.layers[0]
    names = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
    # q_proj kept (an ignore pattern, say), down_proj rounded with GPTQ
    pairs, skipped = awq.resolve_pairs(layer, family_for("minicpmv").smoothing_pairs["llm"],
                                       {**dict.fromkeys(names, "awq"), "mlp.down_proj": "gptq"})
    assert [(p.smooth, p.balance, p.parent) for p in pairs] == [
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp")]
    # up_proj → down_proj is no AWQ pair here (its balance layer is GPTQ's): not applied, and nothing to report
    assert [(s.smooth, s.reason) for s in skipped] == [
        ("input_layernorm", "self_attn.q_proj is kept unquantized; every balance layer of a pair must be "
                            "AWQ-quantized"),
        # tiny 4.5: 4 query heads and 2 key/value heads of 64
        ("self_attn.v_proj", "self_attn.v_proj has 128 output channels but self_attn.o_proj takes 256 inputs "
                             "(grouped-query attention: each value head serves 2 query heads), so no per-channel "
                             "scale passes between them")]


# -- a real block: mcq's search against llm-compressor's AWQModifier ---------------------------------------------------
@pytest.fixture(scope="module")
def captured(tiny45):
    """The calibration calls of the first vision layer and the first LLM layer of tiny 4.5 (8 built-in samples)."""
    path, config, spec = model_spec(tiny45)
    processor = load_processor(path)
    samples = [dict(encode_sample(processor, spec, s, max_slice_nums=2), kind=s.kind)
               for s in load_samples(None, num_samples=8)]
    wanted = {"vpm.encoder.layers.0", "llm.model.layers.0"}
    calls = {}

    def keep(name, block, block_calls):
        if name in wanted:
            calls[name] = block_calls

    SequentialDriver(shell_model(config), CheckpointReader(path), samples, torch.float32, "cpu").run(
        BlockHandler(keep, lambda name, block: None))
    return path, config, calls


@pytest.fixture(scope="module")
def quantized_block(captured, awq_recipe_on):
    """`quantized_block(name, engine, **method_args)`: the block after `quantizer.quantize` with awq-w4g128 on
    `engine` (smoothed, not yet packed), and the quantizer."""
    path, config, calls = captured

    def run(name, engine, **args):
        plan = plan_quantization(awq_recipe_on(engine, **args), linear_layers(shell_model(config)))
        block = dict(named_blocks(shell_model(config)))[name]
        CheckpointReader(path).materialize(block, name, torch.float32, "cpu")
        quantizer = LlmCompressorBlockQuantizer(plan, family_for(config.model_type), scale_dtype=torch.bfloat16)
        quantizer.quantize(name, block, calls[name])
        return block, quantizer

    return run


@pytest.mark.parametrize("name", ["vpm.encoder.layers.0", "llm.model.layers.0"])
def test_with_every_token_in_the_loss_the_search_picks_llmcompressors_scales(captured, quantized_block, name):
    """A budget covering all calibration tokens makes the loss llm-compressor's own (all tokens, all rows), so the
    chosen scales, folded into the smooth layers, must be the same (without mcq's clip search, which
    llm-compressor's AWQ does not run)."""
    ours, quantizer = quantized_block(name, "mcq", loss_tokens=10 ** 9, weight_clip=False)
    theirs, _ = quantized_block(name, "llm-compressor")
    reference = theirs.state_dict()
    smoothed = {key: value for key, value in ours.state_dict().items() if not key.rpartition(".")[2].startswith(
        "weight_")}   # the weights, biases and norms the scales were folded into (weight_scale etc. follow them)
    assert {key for key, value in smoothed.items() if not torch.allclose(value, reference[key], rtol=1e-4,
                                                                         atol=1e-7)} == set()
    pairs = {r.smooth for r in quantizer.awq_results[name]}
    assert pairs == ({"layer_norm1", "self_attn.v_proj", "layer_norm2"} if name.startswith("vpm")
                     else {"input_layernorm", "post_attention_layernorm", "mlp.up_proj"})
    every = sum(args[0].shape[:-1].numel() for args, _ in captured[2][name])
    assert all(r.tokens == every for r in quantizer.awq_results[name])


def test_the_loss_runs_on_the_token_budget_and_still_smooths(captured, quantized_block):
    name = "vpm.encoder.layers.0"
    calls = captured[2][name]
    block, quantizer = quantized_block(name, "mcq", loss_tokens=512)
    results = {r.smooth: r for r in quantizer.awq_results[name]}
    assert set(results) == {"layer_norm1", "self_attn.v_proj", "layer_norm2"}
    assert results["layer_norm2"].tokens == 512 and results["self_attn.v_proj"].tokens == 512
    # attention: whole slices, one of every kind of sample that has images, though one slice exceeds 512 tokens
    picked = awq.pick_rows(calls, calls.origins, 512)
    kinds = {kind for origin in calls.origins for kind, _ in origin}
    assert {calls.origins[i][row][0] for i, rows in picked.items() for row in rows} == kinds
    assert results["layer_norm1"].tokens == sum(len(rows) * calls[i][0][0].shape[1] for i, rows in picked.items())
    assert len(picked) < len(calls) or sum(map(len, picked.values())) < sum(c[0][0].shape[0] for c in calls)
    assert all(r.best_error <= r.initial_error for r in results.values())


# -- weight clipping --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,tokens", [(LayerScheme(4, 128, False), 512), (LayerScheme(4, 32, True), 512),
                                           (LayerScheme(4, None, False), 128)])   # per channel: scored on tokens
def test_the_clip_search_lowers_a_layers_output_error_and_packs_as_it_scored(scheme, tokens):
    """The clipped weights, rounded as packing rounds them (llm-compressor's min/max observer on the stored weights),
    give the per-group error the search scored, and a lower output error than min/max ranges on the raw weights."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor.observers.base import Observer

    generator = torch.Generator().manual_seed(0)
    # Heavy-tailed weights (2 % of them 5x larger): the ranges min/max wastes most of its levels on.
    weight = torch.randn(64, 256, generator=generator)
    weight = weight * (1 + 4 * (torch.rand(64, 256, generator=generator) < 0.02))
    inputs = torch.randn(tokens, 256, generator=generator)
    args = quantization_args(scheme, observer="minmax", scale_dtype=torch.bfloat16)
    group = scheme.group_size or 256

    def packed(w):
        qparams = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)(w).get_qparams()
        return fake_quantize(w, qparams["scale"], qparams["zero_point"], args)

    def group_error(w):      # each group's share of the output, squared, summed
        delta = (packed(w) - weight).unflatten(-1, (-1, group))
        return float(torch.einsum("ogi,ngi->ong", delta, inputs.unflatten(-1, (-1, group))).pow(2).sum())

    def output_error(w):
        return float((inputs @ (packed(w) - weight).T).pow(2).sum())

    clipped = weight.clone()
    initial, best, kept = awq.clip_weight(clipped, inputs, args)
    assert initial == pytest.approx(group_error(weight), rel=1e-4)
    assert best == pytest.approx(group_error(clipped), rel=1e-4)
    assert 0.5 < kept < 1 and best < 0.9 * initial
    assert output_error(clipped) < 0.9 * output_error(weight)


@pytest.mark.parametrize("scheme,tokens", [(LayerScheme(4, 128, False), 512), (LayerScheme(4, 32, True), 512),
                                           (LayerScheme(4, None, False), 128)])
def test_the_clip_search_scores_each_range_as_compressed_tensors_rounds_it(scheme, tokens):
    """Every candidate range rounded by compressed-tensors' own `fake_quantize` and scored group by group on
    fresh tensors: the search, which rounds and scores in place, chooses the same ranges to the bit and reports the
    same errors."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 256, generator=generator)
    weight = weight * (1 + 4 * (torch.rand(96, 256, generator=generator) < 0.02))
    inputs = torch.randn(tokens, 256, generator=generator) * (torch.rand(256, generator=generator) * 3)
    args = quantization_args(scheme, observer="minmax", scale_dtype=torch.bfloat16)
    group = scheme.group_size or 256
    grouped = weight.unflatten(-1, (-1, group))
    columns = inputs.unflatten(-1, (-1, group))
    low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    errors, candidates = [], []
    for kept in torch.tensor(awq.CLIP_SHRINKS):
        lo, hi = low * kept, high * kept
        clamped = torch.minimum(torch.maximum(grouped, lo[..., None]), hi[..., None])
        scale, zero_point = calculate_qparams(lo, hi, args)
        delta = fake_quantize(clamped.flatten(-2), scale, zero_point, args).unflatten(-1, (-1, group)) - grouped
        if group <= tokens:
            gram = torch.einsum("ngi,ngj->gij", columns, columns)
            errors.append((torch.einsum("ogi,gij->ogj", delta, gram) * delta).sum(-1))
        else:
            errors.append(torch.einsum("ogi,ngi->ogn", delta, columns).square().sum(-1))
        candidates.append(clamped)
    errors = torch.stack(errors)
    best = errors.argmin(0)
    expected = torch.stack(candidates).gather(0, best[None, ..., None].expand(1, *grouped.shape))[0].flatten(-2)
    clipped = weight.clone()
    initial, chosen, _ = awq.clip_weight(clipped, inputs, args)
    assert torch.equal(clipped, expected)
    assert (initial, chosen) == (float(errors[0].sum()), float(errors.gather(0, best[None]).sum()))
    assert 0 < int((best > 0).sum()) < best.numel()   # ranges were clipped, not all of them


def test_clipping_follows_the_scales_on_every_awq_linear_but_queries_and_keys(quantized_block):
    name = "vpm.encoder.layers.0"
    clipped, quantizer = quantized_block(name, "mcq")
    results = {r.layer: r for r in quantizer.clip_results[name]}
    # fc2 has no smoothing partner (GELU sits between fc1 and fc2): clipping is all AWQ does for it.
    assert set(results) == {"self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"}
    assert all(r.best_error < r.initial_error and r.kept < 1 for r in results.values())
    plain, unclipped = quantized_block(name, "mcq", weight_clip=False)
    assert unclipped.clip_results[name] == []
    assert [r.ratio for r in quantizer.awq_results[name]] == [r.ratio for r in unclipped.awq_results[name]]
    weights = {key: value for key, value in plain.state_dict().items() if key.endswith(".weight")}
    changed = {key for key, value in clipped.state_dict().items() if key in weights
               and not torch.equal(value, weights[key])}
    assert changed == {f"{layer}.weight" for layer in results}


def test_a_block_with_awq_layers_but_no_pair_is_still_clipped(captured, awq_recipe_on):
    """fc2 alone under AWQ: no smoothing pair applies, the clip search still sets its ranges."""
    from mcq.quantize.recipe import parse_recipe

    path, config, calls = captured
    data = awq_recipe_on("mcq").to_dict()
    data["rules"] = [{**data["rules"][1], "match": "^vpm\\..*mlp\\.fc2$"}]
    plan = plan_quantization(parse_recipe(data, "fc2 only"), linear_layers(shell_model(config)))
    name = "vpm.encoder.layers.0"
    block = dict(named_blocks(shell_model(config)))[name]
    CheckpointReader(path).materialize(block, name, torch.float32, "cpu")
    quantizer = LlmCompressorBlockQuantizer(plan, family_for(config.model_type), scale_dtype=torch.bfloat16)
    quantizer.quantize(name, block, calls[name])
    assert quantizer.awq_results[name] == [] and [r.layer for r in quantizer.clip_results[name]] == ["mlp.fc2"]


# -- skipped pairs reach the user ------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["mcq", "llm-compressor"])
def test_skipped_pairs_are_in_the_summary_and_the_manifest(tiny45, tmp_path, llmc_awq_recipe, engine):
    """llm-compressor notes a skipped pair only in a debug log line (and mcq mutes its logs): the user must see which
    pairs AWQ could not smooth, and why."""
    recipe = {"method": "awq"} if engine == "mcq" else {"recipe": str(llmc_awq_recipe)}
    result = quantize(tiny45, tmp_path / "q", num_samples=4, progress=False, **recipe)
    gqa = [entry for entry in result.skipped_pairs if entry["smooth"] == "self_attn.v_proj"]
    assert [entry["block"] for entry in gqa] == ["llm.model.layers.0", "llm.model.layers.1"]
    assert all("grouped-query attention" in entry["reason"] for entry in gqa)
    assert len(result.skipped_pairs) == 2    # the vision tower's v_proj → out_proj has equal widths: applied
    assert "AWQ skipped self_attn.v_proj → self_attn.o_proj in 2 block(s)" in format_result(result)
    manifest = json.loads((tmp_path / "q" / "mcq-manifest.json").read_text())
    assert manifest["extra"]["skipped_smoothing_pairs"] == result.skipped_pairs
    assert "grouped-query attention" in (tmp_path / "q" / "README.md").read_text()


def test_calls_carry_the_sample_kind_of_every_row(captured):
    _, _, calls = captured
    vision = calls["vpm.encoder.layers.0"]
    assert isinstance(vision, Calls) and len(vision.origins) == len(vision)
    assert [len(o) for o in vision.origins] == [c[0][0].shape[0] for c in vision]
    kinds = {kind for origin in vision.origins for kind, _ in origin}
    assert "text" not in kinds and len(kinds) >= 3
    llm = calls["llm.model.layers.0"]
    assert [o[0][1] for o in llm.origins] == list(range(8))   # one call per sample, in order
