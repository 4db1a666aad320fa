"""bitsandbytes variants on tiny checkpoints: what is converted and kept, the saved layout, reload, generation,
and how far the logits move (against the source, and against the source with the dequantized weights)."""

from __future__ import annotations

import hashlib
import json
import logging

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

import mcq  # noqa: F401  (registers the Auto classes)
from mcq.errors import McqError
from mcq.models.loading import load_model, load_processor, meta_skeleton, model_spec
from mcq.outputs import staged_output
from mcq.models.bnb_runtime import _QuietNotices, disable_unsupported_cpu_repacking
from mcq.quantize.bnb import OPENBMB_SKIP_MODULES, quantize_bnb, skip_matches

GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 4}
PROMPT = "<|im_start|>user\n(<image>./</image>)\nDescribe the picture.<|im_end|>\n<|im_start|>assistant\n"
# Linears of the tiny models (2 vision layers, 2 LLM layers) that the OpenBMB skip list keeps: the attention output
# projections, the resampler (kv_proj by the list, q/k/v/proj because their official tensors are packed) and lm_head.
KEPT = ["llm.lm_head", "resampler.attn.k_proj", "resampler.attn.out_proj", "resampler.attn.q_proj",
        "resampler.attn.v_proj", "resampler.kv_proj", "resampler.proj", "vpm.encoder.layers.0.self_attn.out_proj",
        "vpm.encoder.layers.1.self_attn.out_proj"]


def _image() -> Image.Image:
    generator = torch.Generator().manual_seed(0)
    return Image.fromarray((torch.rand(300, 400, 3, generator=generator) * 255).to(torch.uint8).numpy())


def _quantize(source, out, **kwargs):
    with staged_output(out, force=False) as staging:
        stats = quantize_bnb(source, staging, **kwargs)
    return out, stats


def _header(path) -> dict[str, tuple[str, list[int]]]:
    with safe_open(path / "model.safetensors", "pt") as handle:
        return {k: (handle.get_slice(k).get_dtype(), handle.get_slice(k).get_shape()) for k in handle.keys()}


def _relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.float() - other.float()).norm() / reference.float().norm())


def _logits(model, processor) -> torch.Tensor:
    inputs = processor(PROMPT, [[_image()]])
    with torch.no_grad():
        return model(inputs).logits


def _dequantized_reference(source, quantized):
    """The source model with every quantized Linear's weight replaced by its dequantized value."""
    reference = load_model(source)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            elif isinstance(module, bnb.nn.Linear8bitLt):
                weight = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127
            else:
                continue
            modules[name].weight.copy_(weight.to(modules[name].weight.dtype))
    return reference


@pytest.fixture(scope="module")
def nf4(tiny45, tmp_path_factory):
    return _quantize(tiny45, tmp_path_factory.mktemp("bnb") / "nf4", bits=4,
                     skip_modules=list(OPENBMB_SKIP_MODULES))


@pytest.fixture(scope="module")
def source45(tiny45):
    return load_model(tiny45), load_processor(tiny45)


def test_nf4_converts_vision_and_llm_linears_and_keeps_the_skipped(nf4, tiny45):
    out, stats = nf4
    assert stats["converted"] == {"vision": 10, "resampler": 0, "llm": 14}
    assert stats["kept"] == KEPT
    assert stats["skip_modules"][:3] == list(OPENBMB_SKIP_MODULES)
    header = _header(out)
    for layer in ("mlp.fc1", "mlp.fc2", "self_attn.q_proj"):
        name = f"vpm.encoder.layers.0.{layer}"
        assert header[f"{name}.weight"][0] == "U8" and f"{name}.weight.quant_state.bitsandbytes__nf4" in header
        assert f"{name}.weight.absmax" in header and f"{name}.weight.nested_absmax" in header  # double quant
    assert header["vpm.encoder.layers.0.self_attn.out_proj.weight"] == ("BF16", [128, 128])
    assert header["resampler.kv_proj.weight"] == ("BF16", [256, 128])
    assert header["llm.lm_head.weight"][0] == "BF16"
    # the resampler keeps the official packed / transposed names on disk
    assert header["resampler.attn.in_proj_weight"] == ("BF16", [768, 256])
    assert header["resampler.proj"] == ("BF16", [256, 256])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_quant_type"] == "nf4"
    assert config["llm_int8_skip_modules"] == stats["skip_modules"] and config["bnb_4bit_use_double_quant"]
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny45 / name).read_bytes()
    assert not (out / "model.safetensors.index.json").exists()  # one shard now: the source's index would lie
    assert stats["bytes_after"]["llm"] < 0.5 * stats["bytes_before"]["llm"]
    assert stats["bytes_after"]["vision"] < stats["bytes_before"]["vision"]
    assert stats["bytes_after"]["resampler"] == stats["bytes_before"]["resampler"]


def test_nf4_reloads_generates_and_stays_close(nf4, tiny45, source45):
    out, _ = nf4
    source, processor = source45
    model = load_model(out)
    modules = dict(model.named_modules())
    for name in ("vpm.encoder.layers.0.mlp.fc1", "vpm.encoder.layers.1.mlp.fc2",
                 "vpm.encoder.layers.0.self_attn.q_proj", "llm.model.layers.0.mlp.down_proj"):
        assert isinstance(modules[name], bnb.nn.Linear4bit) and modules[name].weight.dtype == torch.uint8
    for name in KEPT:
        assert type(modules[name]) is nn.Linear and modules[name].weight.dtype == torch.bfloat16
    reference = _dequantized_reference(tiny45, model)  # before any forward repacks the weights
    answer = model.chat(msgs=[{"role": "user", "content": [_image(), "What is it?"]}], processor=processor, **GREEDY)
    assert isinstance(answer, str)
    logits = _logits(model, processor)
    # Random tiny weights: nf4 moves each layer's output ~9 %, about 25 % after the whole model (measured 0.25).
    assert 0.05 < _relative_error(_logits(source, processor), logits) < 0.4
    # What was saved is exactly what was quantized: the reload computes what the dequantized weights compute.
    assert _relative_error(_logits(reference, processor), logits) < 0.03


def test_int8_reloads_with_automodel_and_stays_close(tiny45, tmp_path, source45):
    from transformers import AutoModel

    out, stats = _quantize(tiny45, tmp_path / "int8", bits=8, skip_modules=list(OPENBMB_SKIP_MODULES))
    assert stats["format"] == "int8" and stats["converted"] == {"vision": 10, "resampler": 0, "llm": 14}
    header = _header(out)
    assert header["vpm.encoder.layers.0.mlp.fc1.weight"] == ("I8", [464, 128])
    assert "vpm.encoder.layers.0.mlp.fc1.SCB" in header and header["llm.lm_head.weight"][0] == "BF16"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["load_in_8bit"] and config["llm_int8_threshold"] == 6.0

    source, processor = source45
    model = AutoModel.from_pretrained(out).eval()  # plain transformers, no mcq loader
    assert isinstance(model.vpm.encoder.layers[0].mlp.fc1, bnb.nn.Linear8bitLt)
    assert type(model.vpm.encoder.layers[0].self_attn.out_proj) is nn.Linear
    answer = model.chat(msgs=[{"role": "user", "content": [_image(), "What is it?"]}], processor=processor, **GREEDY)
    assert isinstance(answer, str)
    # LLM.int8 on random tiny weights: measured 0.014
    assert _relative_error(_logits(source, processor), _logits(model, processor)) < 0.05


def test_2_6_adds_lm_head_to_the_skip_list_and_keeps_stdout_clean(tmp_path, capfd):
    from mcq.models.tiny import resolve_tiny

    source = resolve_tiny("tiny:2.6")
    capfd.readouterr()
    out, stats = _quantize(source, tmp_path / "nf4-26", bits=4, quant_type="fp4", double_quant=False,
                           skip_modules=["out_proj", "kv_proj"])
    assert stats["skip_modules"][:2] == ["out_proj", "kv_proj"] and "llm.lm_head" in stats["skip_modules"]
    assert "llm.lm_head" in stats["kept"] and stats["converted"]["llm"] == 14
    header = _header(out)
    assert header["llm.lm_head.weight"][0] == "BF16"
    assert "vpm.encoder.layers.0.mlp.fc1.weight.quant_state.bitsandbytes__fp4" in header
    assert "vpm.encoder.layers.0.mlp.fc1.weight.nested_absmax" not in header
    model, processor = load_model(out), load_processor(out)
    assert model.spec.version == "2.6"
    answer = model.chat(msgs=[{"role": "user", "content": [_image(), "What is it?"]}], processor=processor, **GREEDY)
    assert isinstance(answer, str)
    assert capfd.readouterr().out == ""  # mcq prints JSON on stdout: the library writes nothing there


def test_same_inputs_same_bytes(nf4, tiny45, tmp_path):
    out, stats = nf4
    again, stats_again = _quantize(tiny45, tmp_path / "again", bits=4, skip_modules=list(OPENBMB_SKIP_MODULES))
    assert stats_again == stats

    def digests(path):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}

    assert digests(again) == digests(out)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 3}, "bits must be 4 or 8"),
    ({"bits": 4, "quant_type": "nf3"}, "quant_type must be one of nf4, fp4"),
    ({"bits": 4, "compute_dtype": "int8"}, "compute_dtype must be one of"),
    ({"bits": 8, "int8_threshold": -1}, "int8_threshold must be a number >= 0"),
    ({"bits": 4, "device": "nonsense"}, "is not a torch device"),
    ({"bits": 4, "skip_modules": ["fc3"]}, "'fc3' matches no Linear"),
    ({"bits": 4, "skip_modules": ["fc1("]}, "not a valid regular expression"),
])
def test_bad_arguments_are_one_line_errors(tiny45, tmp_path, kwargs, message):
    kwargs = {"skip_modules": list(OPENBMB_SKIP_MODULES), **kwargs}
    with pytest.raises(McqError, match=message):
        quantize_bnb(tiny45, tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_already_quantized_source_is_refused(nf4, tmp_path):
    out, _ = nf4
    with pytest.raises(McqError, match=r"already quantized \(bitsandbytes\)"):
        quantize_bnb(out, tmp_path, bits=4, skip_modules=list(OPENBMB_SKIP_MODULES))


def test_skip_rule_agrees_with_transformers(tiny45):
    from transformers.quantizers.quantizers_utils import should_convert_module

    _, config, _ = model_spec(tiny45)
    names = [name for name, module in meta_skeleton(config).named_modules() if isinstance(module, nn.Linear)]
    entries = ["out_proj", "lm_head", "proj", "llm", "vpm.encoder.layers.1", "vpm\\.encoder\\.layers\\.\\d\\.mlp",
               "resampler.proj", "fc1"]
    for entry in entries:
        for name in names:
            assert skip_matches(entry, name) == (not should_convert_module(name, [entry])), (entry, name)


def test_nf4_runs_through_plain_automodel(nf4, source45):
    """No mcq loader: `AutoModel.from_pretrained` alone must give a model whose vision tower runs (on a CPU with
    AVX512-BF16, bitsandbytes' repacking would otherwise fail on SigLIP's MLP at the first forward)."""
    from transformers import AutoModel

    out, _ = nf4
    _, processor = source45
    model = AutoModel.from_pretrained(out).eval()
    assert not any(getattr(model.get_submodule(f"vpm.encoder.layers.{i}.mlp.{fc}"), "support_avx512bf16_for_cpu",
                           False) for i in range(2) for fc in ("fc1", "fc2"))
    assert isinstance(model.chat(msgs=[{"role": "user", "content": [_image(), "What is it?"]}], processor=processor,
                                 **GREEDY), str)


def test_cpu_repacking_is_disabled_only_where_bitsandbytes_cannot_repack(nf4):
    out, _ = nf4
    model = load_model(out)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in quantized:  # as on a CPU with AVX512-BF16, whatever this machine has
        module.support_avx512bf16_for_cpu = True
    changed = disable_unsupported_cpu_repacking(model)
    # vision MLP 128 -> 464 -> 128: 464 is no multiple of 32 (fc1 outputs) nor of 64 (fc2 inputs), like 4304
    assert changed == [f"vpm.encoder.layers.{i}.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2")]
    assert sum(m.support_avx512bf16_for_cpu for m in quantized) == len(quantized) - 4


def test_bitsandbytes_notices_are_quieted():
    notices = _QuietNotices()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("bitsandbytes", logging.WARNING, __file__, 1, message, None, None)

    assert not notices.filter(record("Failed to load CPU gemm_4bit_forward from kernels-community: %s."))
    cast = "MatMul8bitLt: inputs will be cast from %s to float16 during quantization"
    assert [notices.filter(record(cast)) for _ in range(3)] == [True, False, False]
    assert notices.filter(record("something else"))
