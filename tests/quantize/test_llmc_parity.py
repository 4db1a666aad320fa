"""mcq's block-by-block quantization against llm-compressor's own pipeline, on the same LLM and the same tokens.

Reference: `llmcompressor.oneshot` (its sequential pipeline: every decoder layer calibrated on the outputs of the
layers before it, quantized, then run again to give the next layer its inputs) on a plain `Qwen3ForCausalLM`: the
`llm.*` tensors of `tiny:4.5` written out as a standalone checkpoint (prefix stripped, config from
`VersionSpec.llm_config`), with modifiers equivalent to the LLM rule of the built-in recipe (gptq-w4g128: W4 g128
symmetric, actorder static; awq-w4g128: AWQ smoothing + W4 g128 asymmetric, its method arguments).

Under test: mcq's real `SequentialDriver` with `LlmCompressorBlockQuantizer`, on the MiniCPM-V checkpoint itself,
fed the same token sequences as text-only samples. So the inputs of the first LLM layer are captured through
`MiniCPMV.forward` (embeddings, rotary tables, masks from the model code), and everything after — materialising
each layer from safetensors, one llm-compressor session per layer, propagating the quantized layer's outputs,
packing — is mcq's production code; only the writer is skipped (the packed tensors are compared directly). That
is a stronger test than a driver written here for a bare Qwen3, which would mirror `sequential.py` instead of
running it.

Findings pinned here:
- GPTQ: with the attention kernel llm-compressor calibrates with (it forces eager attention), every packed weight,
  scale and norm of every layer is bit-identical, and so are the logits.
- A driver that does not propagate the quantized outputs (each layer calibrated on float activations) is caught:
  layer 0 is still identical, layer 1 differs in 10-30 % of its codes.
- With mcq's default (SDPA) attention the kernel's rounding flips a few layer-0 GPTQ decisions (0.3 % of codes),
  and GPTQ's error feedback turns the slightly different layer-1 inputs into 10-25 % different layer-1 codes, as
  far from llm-compressor's as the wrong driver's: two correct runs that differ in attention kernel cannot be told
  from a wrong one by their codes or logits, which is why the exact test pins the kernel. That test checks the
  first layer and that the quantized model is as close to the float model as llm-compressor's.
- AWQ: every packed weight, scale, zero point and smoothed norm is bit-identical, and so are the logits. That
  holds because mcq, like llm-compressor (AWQ calibrates under `DisableQuantization`, the rounding is applied
  data-free at the end) and AutoAWQ, hands the next layer the smoothed, still unquantized outputs of an AWQ block;
  a driver propagating the quantized outputs instead agrees on layer 0 only (caught below).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from mcq.models.family import family_for, linear_layers
from mcq.models.loading import meta_skeleton, model_spec
from mcq.models.minicpmv.tokenization import load_tokenizer
from mcq.models.weights import CheckpointReader, shell_model
from mcq.quantize.llmc import LlmCompressorBlockQuantizer, quantization_args
from mcq.quantize.recipe import load_recipe, plan_quantization
from mcq.quantize.sequential import BlockHandler, SequentialDriver

LAYERS = "llm.model.layers."


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: on a loaded machine, intra-op threads cost far more than they give (GPTQ's column loop ran
    40x slower with 2 threads on a busy 2-core box). Both sides run alike, so parity is unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parity(tiny45, tmp_path_factory, awq_recipe_on):
    """The MiniCPM-V checkpoint, its LLM as a standalone Qwen3 checkpoint, the calibration tokens, the plans."""
    path, config, spec = model_spec(tiny45)
    qwen3 = tmp_path_factory.mktemp("qwen3")
    llm_config = spec.llm_config(config)
    llm_config.architectures = [spec.llm_model_class.__name__]
    llm_config.save_pretrained(qwen3)
    reader = CheckpointReader(path)
    save_file({name[len("llm."):]: reader.read_stored(name) for name in reader.stored_names
               if name.startswith("llm.")}, qwen3 / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (path / name).exists():
            shutil.copy2(path / name, qwen3 / name)
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, config.vocab_size, (1, length), generator=generator) for length in (64, 48, 56, 64)]
    # The built-in recipes as shipped, AWQ on llm-compressor's engine (mcq's own search is compared with it in
    # test_awq.py); text-only samples never reach the vision tower, which is rounded data-free.
    recipes = {"gptq": load_recipe("gptq-w4g128"), "awq": awq_recipe_on("llm-compressor")}
    plans = {method: plan_quantization(recipe, linear_layers(meta_skeleton(config))) for method, recipe in recipes.items()}
    return {"path": path, "qwen3": qwen3, "sequences": sequences, "plans": plans,
            "tokenizer": load_tokenizer(path, spec.version)}


# -- the two sides ---------------------------------------------------------------------------------------------------
def llm_rule(plan) -> tuple:
    """The scheme and engine of the recipe's LLM decoder layers (one for all of them)."""
    rules = {rule.index: rule for rule in plan.recipe.rules}
    found = {(layer.scheme, rules[layer.rule].method or plan.recipe.method) for layer in plan.quantized()
             if layer.name.startswith(LAYERS)}
    assert len(found) == 1, found
    return found.pop()


def _weights_args(plan):
    scheme, engine = llm_rule(plan)
    args = plan.recipe.method_args
    return quantization_args(scheme, observer=args.get("weight_observer", "minmax") if engine != "gptq" else "minmax",
                             actorder=args.get("actorder", "static") if engine == "gptq" else None,
                             scale_dtype=torch.bfloat16)


def run_oneshot(parity, method: str) -> dict[str, torch.Tensor]:
    """llm-compressor's own pipeline; the layers' tensors packed like mcq packs them, named as in MiniCPM-V."""
    from compressed_tensors.compressors.base import compress_module
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    plan = parity["plans"][method]
    args = plan.recipe.method_args
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=_weights_args(plan))}
    if llm_rule(plan)[1] == "gptq":
        recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=args["block_size"],
                               dampening_frac=args["dampening_frac"])]
    else:   # llm-compressor's own Qwen3 mappings, the pairs mcq smooths (the family's smoothing_pairs)
        recipe = [AWQModifier(duo_scaling=args["duo_scaling"], n_grid=args["n_grid"]),
                  QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    # float32 like mcq's driver; loaded from a real directory (oneshot re-reads config.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(parity["qwen3"], dtype=torch.float32)
    loader = DataLoader([{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in parity["sequences"]],
                        batch_size=None)
    oneshot(model=model, dataset=loader, recipe=recipe, processor=parity["tokenizer"],
            num_calibration_samples=len(parity["sequences"]))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:
            compress_module(module, "pack-quantized")
    return {f"llm.{name}": tensor.detach().clone() for name, tensor in model.state_dict().items()
            if f"llm.{name}".startswith(LAYERS)}


def run_mcq(parity, method: str, attention: str = "sdpa", propagate: str = "as_shipped") -> dict[str, torch.Tensor]:
    """mcq's driver and block quantizer. `propagate` other than "as_shipped" is a test-only deviation, done from the
    handler (the driver is untouched): "float" hands on the block's outputs from *before* it was quantized (the bug
    of a GPTQ driver that does not propagate quantization error); "quantized" runs the next-layer pass with the
    AWQ layers' quantization enabled (the bug of an AWQ driver that compounds rounding error into the next
    layer's scale search)."""
    from compressed_tensors.quantization.lifecycle.helpers import enable_quantization

    _, config, _ = model_spec(parity["path"])
    config._attn_implementation = attention
    model = shell_model(config)
    assert model.llm.config._attn_implementation == attention
    quantizer = LlmCompressorBlockQuantizer(parity["plans"][method], family_for(config.model_type),
                                            scale_dtype=torch.bfloat16)
    tensors, hooks = {}, []

    def quantize(name, block, calls):
        with torch.no_grad():
            before = iter([block(*a, **k) for a, k in calls] if propagate == "float" else [])
        quantizer.quantize(name, block, calls)
        if propagate == "float" and calls:   # the driver's next-layer pass gets the float outputs
            hooks.append(block.register_forward_hook(lambda module, inputs, output: next(before)))
        if propagate == "quantized":
            block.apply(enable_quantization)

    def emit(name, block):
        while hooks:
            hooks.pop().remove()
        packed = quantizer.packed_tensors(name, block)
        quantized = {key.rsplit(".", 1)[0] for key in packed}
        tensors.update(packed)
        tensors.update({f"{name}.{key}": value.detach().clone() for key, value in block.state_dict().items()
                        if f"{name}.{key}".rsplit(".", 1)[0] not in quantized})

    samples = [{"input_ids": ids} for ids in parity["sequences"]]
    SequentialDriver(model, CheckpointReader(parity["path"]), samples, torch.float32, "cpu").run(
        BlockHandler(quantize, emit))
    return {name: tensor for name, tensor in tensors.items() if name.startswith(LAYERS)}


# -- comparing -------------------------------------------------------------------------------------------------------
def differing(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the fraction of elements that differ (0.0 = bit-identical); packed weights are compared code by
    code (eight 4-bit codes to an int32 word)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    assert set(reference) == set(other)
    result = {}
    for name in sorted(reference):
        a, b = reference[name], other[name].to(reference[name].dtype)
        assert a.shape == b.shape, name
        if name.endswith("weight_packed"):
            shape = torch.Size(reference[name.replace("weight_packed", "weight_shape")].tolist())
            a, b = unpack_from_int32(a, 4, shape), unpack_from_int32(b, 4, shape)
        result[name] = float((a != b).float().mean())
    return result


def dequantized_logits(parity, method: str, tensors: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Logits of the Qwen3 with the quantized layers dequantized from `tensors` (None: the float model) on
    held-out tokens."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(parity["qwen3"], dtype=torch.float32)
    if tensors is not None:
        scheme = QuantizationScheme(targets=["Linear"], weights=_weights_args(parity["plans"][method]))
        state = {}
        for name, tensor in tensors.items():
            module, _, param = name[len("llm."):].rpartition(".")
            if param == "weight_packed":
                parts = {key: tensors[f"llm.{module}.{key}"] for key in
                         ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
                         if f"llm.{module}.{key}" in tensors}
                parts["weight_scale"] = parts["weight_scale"].float()   # mcq stores bf16, oneshot keeps float32
                state[f"{module}.weight"] = PackedQuantizationCompressor.decompress(parts, scheme)["weight"].float()
            elif not param.startswith("weight_"):
                state[f"{module}.{param}"] = tensor.float()
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and all(not key.startswith("model.layers.") for key in missing)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=generator)
    with torch.no_grad():
        return model(input_ids=ids).logits


def layer(name: str) -> int:
    return int(name[len(LAYERS):].split(".")[0])


# -- GPTQ ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gptq_reference(parity):
    return run_oneshot(parity, "gptq")


def test_gptq_block_driver_reproduces_llmcompressor_bit_for_bit(parity, gptq_reference):
    ours = run_mcq(parity, "gptq", attention="eager")
    assert {name for name in ours if name.endswith("weight_packed")} == \
        {f"{LAYERS}{i}.{m}.weight_packed" for i in (0, 1) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")}
    assert {name: frac for name, frac in differing(gptq_reference, ours).items() if frac} == {}
    assert torch.equal(dequantized_logits(parity, "gptq", ours), dequantized_logits(parity, "gptq", gptq_reference))


def test_gptq_driver_without_quantized_propagation_is_caught(parity, gptq_reference):
    wrong = differing(gptq_reference, run_mcq(parity, "gptq", attention="eager", propagate="float"))
    assert all(frac == 0 for name, frac in wrong.items() if layer(name) == 0)     # same inputs, same result
    assert min(frac for name, frac in wrong.items() if name.endswith("weight_packed") and layer(name) == 1) > 0.1


def test_gptq_default_attention_is_as_good_as_llmcompressor(parity, gptq_reference):
    """`mcq quantize` runs SDPA attention (see the module docstring for why codes cannot be compared exactly)."""
    ours = run_mcq(parity, "gptq")
    diff = differing(gptq_reference, ours)
    first = max(frac for name, frac in diff.items() if layer(name) == 0 and name.endswith("weight_packed"))
    assert first < 0.02, diff      # measured 0.3 %; a wrong layer-0 input would flip tens of percent
    float_logits = dequantized_logits(parity, "gptq", None)
    error_ours = (dequantized_logits(parity, "gptq", ours) - float_logits).abs().mean()
    error_reference = (dequantized_logits(parity, "gptq", gptq_reference) - float_logits).abs().mean()
    assert error_ours < 1.1 * error_reference, (float(error_ours), float(error_reference))


# -- AWQ -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def awq_reference(parity):
    from mcq.quantize.llmc import _cpu_compat

    _cpu_compat("cpu")   # llm-compressor 0.14 AWQ pins cached activations; a CPU run must not
    return run_oneshot(parity, "awq")


def test_awq_block_driver_reproduces_llmcompressor_bit_for_bit(parity, awq_reference):
    ours = run_mcq(parity, "awq", attention="eager")
    assert {name: frac for name, frac in differing(awq_reference, ours).items() if frac} == {}
    assert torch.equal(dequantized_logits(parity, "awq", ours), dequantized_logits(parity, "awq", awq_reference))


def test_awq_driver_propagating_quantized_outputs_is_caught(parity, awq_reference):
    wrong = differing(awq_reference, run_mcq(parity, "awq", attention="eager", propagate="quantized"))
    assert all(frac == 0 for name, frac in wrong.items() if layer(name) == 0)     # same inputs, same result
    assert max(frac for name, frac in wrong.items() if layer(name) == 1) > 0
