"""vLLM as a validation runtime (`mcq validate --runtime vllm`) and mcq's vLLM plugin (MiniCPM-V without remote
code), checked in vLLM's own environment.

The tests marked `vllm` need that environment (`MCQ_VLLM_PYTHON`; `.ci/run` builds it with `.ci/vllm-venv`): in
CI (`CI=true`) they fail without it, elsewhere they skip and name the setup command. Each validated vLLM variant is
one worker process with one engine serving every evaluation sample.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mcq.errors import McqError
from mcq.validate.runners import runtime_runner
from mcq.validate.runners.vllm_runner import PYTHON_VARIABLE, VllmRunner, probe

SETUP = "bash .ci/vllm-venv, then export MCQ_VLLM_PYTHON=<the python it prints>"
EVAL_SAMPLES = 8     # the held-out subset with a document, a scene, several images, a table, a chart, a video, text
#: what the runtime column adds when mcq's plugin dequantizes weight-only layers vLLM's CPU build has no kernel for
#: (int4 on a CPU without AVX-512, int8 on any)
DEQUANTIZED = "dequantized by mcq at load"
#: Served where vLLM's CPU build has no int4 GEMM (AVX2): one output per layout and version, for CI's time (whole
#: model calibrated, whole model uncalibrated, LLM only, int8 per channel); with vLLM's own int4 kernel, every
#: output is served.
DEQUANTIZED_SERVED = {"2.6": ("awq-w4g128", "rtn-w8"), "4.0": ("rtn-w4g128",), "4.5": ("gptq-w4g128", "awq-llm-only")}
VERSIONS = ("2.6", "4.0", "4.5")
CPU_TARGET = "vllm-cpu"
#: calibration samples for AWQ and GPTQ here, instead of the recipes' 64: what vLLM loads (which modules are
#: quantized, schemes, groups, padding, names) is the default's; the sample count moves only the rounding.
CALIBRATION_SAMPLES = 4
#: the kernels vLLM's CPU build picks for compressed-tensors W4A16 layers (ZentorchWNA16 on AMD Zen CPUs with
#: AVX-512 and zentorch installed, CPUWNA16 elsewhere)
CPU_INT4_KERNELS = {"CPUWNA16LinearKernel", "ZentorchWNA16LinearKernel"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def vllm_python() -> str:
    try:
        return VllmRunner.environment()
    except McqError as err:
        if _in_ci():
            pytest.fail(f"CI needs vLLM's environment: {err}")
        pytest.skip(f"needs vLLM's environment ({err}); set it up with: {SETUP}")


# -- choosing the runtime, and what is missing: no vLLM needed --------------------------------------------------
def test_runtime_choice_is_checked_before_any_run(tiny45):
    assert runtime_runner("tiny:4.5", "auto")[1].name == "transformers"
    with pytest.raises(McqError, match="unknown runtime; runtimes: auto, transformers"):
        runtime_runner("tiny:4.5", "tensorrt")
    with pytest.raises(McqError, match=r"--runtime llama.cpp does not serve tiny:4.5 \(bf16\)"):
        runtime_runner("tiny:4.5", "llama.cpp")
    from mcq.validate.api import validate

    with pytest.raises(McqError, match="one runtime for every variant or one for all"):
        validate("tiny:4.5", ["tiny:4.5", "tiny:4.5"], runtimes=["auto", "vllm", "auto"], progress=False)
    with pytest.raises(McqError, match=r"--runtime llama.cpp does not serve tiny:4.5 \(bf16\)"):
        validate("tiny:4.5", ["tiny:4.5"], reference_runtime="llama.cpp", progress=False)


def test_missing_vllm_environment_is_one_line(monkeypatch, tmp_path):
    probe.cache_clear()
    monkeypatch.setenv(PYTHON_VARIABLE, str(tmp_path / "no-python"))
    with pytest.raises(McqError, match=f"{PYTHON_VARIABLE}=.*no-python: no such Python"):
        VllmRunner.environment()
    monkeypatch.setenv(PYTHON_VARIABLE, sys.executable)   # mcq's own environment: no vLLM there
    with pytest.raises(McqError, match="has no vLLM installed"):
        VllmRunner.environment()
    done = subprocess.run([sys.executable, "-m", "mcq.cli", "validate", "--reference", "tiny:4.5", "--variant",
                           "tiny:4.5", "--runtime", "vllm"], capture_output=True, text=True,
                          env={**os.environ, PYTHON_VARIABLE: str(tmp_path / "no-python")})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"mcq: error: {PYTHON_VARIABLE}={tmp_path / 'no-python'}: no such "
                                               "Python"]


def test_missing_quantization_engine_is_one_line(monkeypatch, tmp_path):
    import mcq.extras
    from mcq.quantize.api import quantize

    real = mcq.extras.find_spec
    monkeypatch.setattr(mcq.extras, "find_spec",
                        lambda name: None if name in ("llmcompressor", "bitsandbytes") else real(name))
    for method, module in (("awq", "llmcompressor"), ("rtn", "llmcompressor"), ("bnb-nf4", "bitsandbytes")):
        with pytest.raises(McqError, match=rf"needs {module}, which is not installed here: pip install "
                                           r"'minicpm-quant\[quantize\]'"):
            quantize("tiny:4.5", tmp_path / method, method=method, progress=False)
        assert not (tmp_path / method).exists()


def test_plugin_image_processor_is_mcqs(tiny45):
    """What vLLM's MiniCPM-V processor calls, on the evaluation images: the pixels and placeholders of mcq's image
    processor, with the slicing vLLM's `mm_processor_kwargs` set."""
    import torch

    from mcq.models.minicpmv.configuration import MiniCPMVConfig
    from mcq.models.minicpmv.image_processing import MiniCPMVImageProcessor
    from mcq.validate.evalset import encode_items, eval_samples, open_encoder
    from mcq.models.minicpmv.vllm_plugin import _image_processor_class

    adapter = _image_processor_class().from_pretrained(tiny45, max_slice_nums=2, tokenizer=object(),
                                                       revision="main", trust_remote_code=False)
    ours = MiniCPMVImageProcessor.from_pretrained(tiny45)
    assert adapter.max_slice_nums == 2 and adapter.image_feature_size == ours.image_feature_size
    items = encode_items(open_encoder(tiny45), eval_samples(None, EVAL_SAMPLES, 0), 2)
    images = [image for item in items for image in item.scored.get("images", [[]])[0]]
    videos = [item for item in items if item.scored.get("video")]
    assert len(images) >= 4 and len(videos) == 1 and not videos[0].scored.get("images")
    batch = adapter.preprocess([[image] for image in images])
    for index, image in enumerate(images):
        expected = ours.preprocess([image], max_slice_nums=2)
        assert len(batch["pixel_values"][index]) == len(expected["pixel_values"]) > 0
        for got, want in zip(batch["pixel_values"][index], expected["pixel_values"]):
            assert torch.equal(got, want)
        assert torch.equal(batch["tgt_sizes"][index], expected["tgt_sizes"])
        assert adapter.get_slice_image_placeholder(image.size, 1) == ours.get_slice_image_placeholder(image.size, 1,
                                                                                                      max_slice_nums=2)
        assert adapter.get_sliced_grid(image.size) == ours.get_sliced_grid(image.size, 2)
    # transformers hands processor keyword arguments to the config too (vLLM's --mm-processor-kwargs).
    assert MiniCPMVConfig.from_pretrained(tiny45, max_slice_nums=2).slice_config["max_slice_nums"] == 2


def test_a_worker_in_another_environment_must_encode_the_reference_tokens(tiny45):
    import torch

    from mcq.validate.evalset import encode_items, eval_samples, open_encoder
    from mcq.validate.worker import _check_same_tokens

    (item,) = encode_items(open_encoder(tiny45), eval_samples(None, 1, 0), 2)
    ids = item.scored["input_ids"][0]
    _check_same_tokens(ids.clone(), item, 0)
    with pytest.raises(McqError, match="encodes to other tokens in this runtime's environment"):
        _check_same_tokens(torch.cat([ids, ids[-1:]]), item, 0)


# -- in vLLM's environment --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vllm_loads_mcqs_plugin_from_its_entry_point(vllm_python, tiny45, tmp_path):
    """No mcq import, no trust_remote_code: vLLM's own plugin loading registers mcq's classes (as in `vllm serve`),
    and mcq's commands that need the quantization engine say so there in one line."""
    code = """
import json, sys
from vllm.plugins import load_general_plugins
load_general_plugins()
from transformers import AutoConfig, AutoImageProcessor
from vllm.model_executor.models.minicpmv import MiniCPMV
config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=False)
processor = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=False)
print(json.dumps([type(config).__module__, type(processor).__module__, MiniCPMV._processor_factory.info.__module__]))
"""
    done = subprocess.run([vllm_python, "-c", code, str(tiny45)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [
        "mcq.models.minicpmv.configuration", "mcq.models.minicpmv.vllm_plugin", "mcq.models.minicpmv.vllm_plugin"]
    # vLLM's environment has mcq's core, not llm-compressor (its transformers pin does not fit there).
    done = subprocess.run([vllm_python, "-m", "mcq.cli", "quantize", "--method", "awq", "--model", "tiny:4.5",
                           "--out", str(tmp_path / "awq")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["mcq: error: awq quantization needs llmcompressor, which is not "
                                               "installed here: pip install 'minicpm-quant[quantize]'"]


_DEQUANTIZE = """
import itertools, json, torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
from vllm.scalar_type import scalar_types
from mcq.vllm_plugin import _dequantized_kernel

kernel_class = _dequantized_kernel(CPUWNA16LinearKernel, bits=(4, 8))
types = {(4, True): scalar_types.uint4, (4, False): scalar_types.uint4b8, (8, True): scalar_types.uint8,
         (8, False): scalar_types.uint8b128}
generator = torch.Generator().manual_seed(0)
errors = {}
for bits, zero_points, group in itertools.product((4, 8), (False, True), (128, -1)):
    out_features, in_features = 64, 256
    groups = 1 if group == -1 else in_features // group
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    values = torch.randint(low, high, (out_features, in_features), generator=generator, dtype=torch.int8)
    zero = (torch.randint(low, high, (out_features, groups), generator=generator, dtype=torch.int8)
            if zero_points else None)
    scales = torch.rand(out_features, groups, generator=generator, dtype=torch.float32) + 0.01
    expected = (values.int().view(out_features, groups, -1) - (0 if zero is None else zero.int().unsqueeze(-1)))
    expected = expected.float()   # int8 - int8 overflows int8
    expected = (expected * scales.unsqueeze(-1)).view(out_features, in_features)
    layer = torch.nn.Module()   # as vLLM's compressed-tensors scheme loads it
    layer.weight_packed = torch.nn.Parameter(pack_to_int32(values, bits, packed_dim=1), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(scales, requires_grad=False)
    if zero_points:
        layer.weight_zero_point = torch.nn.Parameter(pack_to_int32(zero, bits, packed_dim=0),
                                                     requires_grad=False)
    config = MPLinearLayerConfig((in_features, out_features), (in_features, out_features),
                                 types[bits, zero_points], torch.float32, group, zero_points)
    kernel = kernel_class(config, "weight_packed", "weight_scale", "weight_zero_point")
    kernel.process_weights_after_loading(layer)
    x = torch.randn(3, in_features, generator=generator)
    got = kernel.apply_weights(layer, x)
    key = f"int{bits} {'asym' if zero_points else 'sym'} g{group}"
    errors[key] = [(layer.weight_dequantized - expected).abs().max().item(),
                   (got - x @ expected.T).abs().max().item(),
                   sorted(name for name, _ in layer.named_parameters())]

def rule(kernel, bits):   # whether the kernel takes a layer with 48 outputs, and whether a refusal is CPUWNA16's
    can, why = kernel.can_implement(MPLinearLayerConfig((256, 48), (256, 48), types[bits, False], torch.float32,
                                                        128, False))
    return [can, why is not None and "CPUWNA16" in why]

rules = {"int4 out 48": rule(kernel_class, 4), "int8 out 48": rule(kernel_class, 8),
         "int8 by CPUWNA16": rule(CPUWNA16LinearKernel, 8)}
print("RESULT " + json.dumps({"errors": errors, "rules": rules}))
"""


@pytest.mark.slow
def test_plugin_dequantizes_compressed_tensors_weights_exactly(vllm_python):
    """The kernel behind `MCQ_VLLM_CPU_WNA16=dequantize`, in vLLM's environment: int4 and int8 weights packed by
    compressed-tensors (values along the input, zero points along the output, offset by 8 or 128), symmetric and
    asymmetric, grouped and per channel, come back as exactly (value - zero point) x scale, and only the
    dequantized weight stays. Its int4 layers keep CPUWNA16's rules (an output width of 48 is refused); int8
    layers, which CPUWNA16 refuses whatever their shape, take any."""
    done = subprocess.run([vllm_python, "-c", _DEQUANTIZE], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    errors, rules = result["errors"], result["rules"]
    assert set(errors) == {f"int{bits} {kind} g{group}" for bits in (4, 8) for kind in ("sym", "asym")
                           for group in (128, -1)}
    for key, (weight_error, output_error, parameters) in errors.items():
        assert weight_error == 0.0 and output_error < 1e-4 and parameters == ["weight_dequantized"], key
    assert rules == {"int4 out 48": [False, True], "int8 out 48": [True, False], "int8 by CPUWNA16": [False, True]}


def _compressed_tensors_recipes():
    from mcq.quantize.recipe import builtin_recipe_names, load_recipe

    return [recipe for recipe in map(load_recipe, builtin_recipe_names()) if recipe.format == "compressed-tensors"]


def _quantize_for_vllm_cpu(model: str | Path, out: Path, recipe) -> bool:
    """Writes `recipe`'s output of `model` for vLLM's CPU build: its default when its targets include that build,
    else the same recipe with `--target vllm-cpu`. A recipe that build cannot hold at all (rtn-w8: weight-only
    int8) is refused in one line before any calibration, for the reason the recipe gives; its default (GPU) output
    is written instead. Returns whether vLLM's CPU build is among the output's targets."""
    from mcq.quantize.api import quantize

    target = None if CPU_TARGET in recipe.targets else [CPU_TARGET]
    options = {"num_samples": CALIBRATION_SAMPLES} if recipe.method in ("awq", "gptq") else {}
    try:
        quantize(model, out, recipe=recipe.name, target=target, progress=False, **options)
        return True
    except McqError as err:
        assert recipe.name == "rtn-w8" and "vllm-cpu runs int4 without zero points, not int8" in str(err)
        assert not out.exists()
        quantize(model, out, recipe=recipe.name, progress=False, **options)
        return False


@pytest.fixture(scope="session")
def recipe_outputs(tmp_path_factory) -> dict[str, dict[str, tuple[Path, bool]]]:
    """{version: {recipe: (output, whether vLLM's CPU build is among its targets)}} for every built-in recipe that
    writes compressed-tensors, on tiny 2.6, 4.0 and 4.5 (`_quantize_for_vllm_cpu`)."""
    root = tmp_path_factory.mktemp("served")
    return {version: {recipe.name: (root / version / recipe.name,
                                    _quantize_for_vllm_cpu(f"tiny:{version}", root / version / recipe.name, recipe))
                      for recipe in _compressed_tensors_recipes()}
            for version in VERSIONS}


def _quantized_modules(path: Path) -> int:
    """The quantized Linears of an output as vLLM builds them (q/k/v and gate/up fused into one module)."""
    from safetensors import safe_open

    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as weights:
            for key in weights.keys():
                if key.endswith(".weight_packed"):
                    module = key.removesuffix(".weight_packed")
                    names.add(re.sub(r"(gate|up)_proj$", "gate_up_proj", re.sub(r"[qkv]_proj$", "qkv_proj", module)))
    return len(names)


_LOAD_EACH = """
import gc, json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM

def kernels(model):
    found = {}
    for module in model.modules():
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            name = type(getattr(scheme, "kernel", None) or scheme).__name__
            found[name] = found.get(name, 0) + 1
    return found

for path in sys.argv[1:]:
    try:
        llm = LLM(model=path, trust_remote_code=False, dtype="bfloat16", enforce_eager=True, max_model_len=1024,
                  max_num_seqs=1, limit_mm_per_prompt={"image": 1, "video": 0})
        (found,) = llm.apply_model(kernels)
        result = {"kernels": found}
        del llm
    except Exception as err:
        lines = str(err).strip().splitlines()
        result = {"error": f"{type(err).__name__}: {lines[-1] if lines else ''}"}
    gc.collect()
    print("RESULT " + json.dumps({"path": path, **result}), flush=True)
"""


@pytest.mark.slow
def test_vllm_cpu_loads_every_built_in_recipe_output(vllm_python, recipe_outputs):
    """One vLLM process loads every output (as `vllm serve` would: the plugin, no remote code): each model builds,
    every weight loads under its name and shape, and vLLM's CPU int4 kernel takes every quantized module. rtn-w8's
    default (weight-only int8, for GPUs) is refused at load, as its recipe says: vLLM's CPU build serves it only
    with mcq's `MCQ_VLLM_CPU_WNA16=dequantize` (the serving tests)."""
    paths = [str(path) for versions in recipe_outputs.values() for path, _ in versions.values()]
    done = subprocess.run([vllm_python, "-c", _LOAD_EACH, *paths], capture_output=True, text=True,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = {found["path"]: found for found in (json.loads(line.removeprefix("RESULT "))
                                                 for line in done.stdout.splitlines() if line.startswith("RESULT "))}
    assert set(loaded) == set(paths)
    for version, outputs in recipe_outputs.items():
        for name, (path, on_cpu) in outputs.items():
            found = loaded[str(path)]
            if not on_cpu:
                assert "Quant type (uint8b128) not supported by CPUWNA16" in found.get("error", ""), (version, found)
                continue
            assert "error" not in found, (version, name, found["error"])
            # The model card names this test beside the runtime (and the AVX-512 condition in its notes).
            card = next(line for line in (path / "README.md").read_text().splitlines()
                        if line.startswith("| `vllm-cpu`"))
            assert "tests/validate/test_vllm.py" in card and "AVX-512" in card
            assert set(found["kernels"]) <= CPU_INT4_KERNELS, (version, name, found)
            assert sum(found["kernels"].values()) == _quantized_modules(path) > 0, (version, name, found)


@pytest.fixture(scope="session")
def int4_native(vllm_python) -> bool:
    """Whether vLLM's CPU build has its own int4 weight-only GEMM on this CPU (it ships it in its AVX-512 kernel
    library only: on an AVX2 CPU the runner serves int4 layers through mcq's plugin, dequantized at load)."""
    code = ("import torch; from vllm.platforms import current_platform; current_platform.import_kernels(); "
            "print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))")
    done = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1] == "True"


def _runtime(vllm_python: str) -> str:
    info = probe(vllm_python)
    return f"vllm-cpu {info['vllm']}" if info["dist"] == "vllm-cpu" else f"vllm {info['vllm']}"


def _validate(reference: str, variants: list[tuple[str, str]], reference_runtime: str = "auto",
              cli_json: Path | None = None) -> dict:
    """validate() (or `mcq validate --json cli_json`) of (variant, runtime) pairs on the evaluation subset."""
    from mcq.validate.api import validate

    paths, runtimes = [str(path) for path, _ in variants], [runtime for _, runtime in variants]
    settings = {"num_samples": EVAL_SAMPLES, "latency_runs": 1, "max_new_tokens": 8}
    if cli_json is None:
        return validate(reference, paths, runtimes=runtimes, reference_runtime=reference_runtime, decode_tokens=4,
                        progress=False, **settings)
    args = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    done = subprocess.run([sys.executable, "-m", "mcq.cli", "validate", "--reference", reference, "--variant",
                           *paths, "--runtime", *runtimes, "--reference-runtime", reference_runtime, *args,
                           "--json", str(cli_json)], capture_output=True, text=True)
    # A variant vLLM's CPU kernels cannot run is a failed row (exit 1); the printed table has every row.
    assert done.returncode in (0, 1), done.stderr[-2000:]
    assert "(vllm)" in done.stdout
    return json.loads(cli_json.read_text())


def _check_bf16(row: dict, runtime: str) -> None:
    assert row["status"] == "ok", row["error"]
    assert row["runtime"].startswith(runtime)
    metrics = row["metrics"]
    assert metrics["kl_mean"] < 1e-4 and metrics["top1_agreement"] > 0.99 and metrics["vision_cosine"] > 0.9999
    assert row["kl_vision_path"] < 1e-4
    # The video sample is left out, with the reason; every other sample went through vLLM's multimodal path.
    assert list(row["skipped_samples"].values()) == [1] and "video" in next(iter(row["skipped_samples"]))


def _dequantized(path: Path, native: bool) -> bool:
    """Whether vLLM's CPU build serves the output at `path` with mcq's dequantized layers: int8 always (no int8
    weight-only kernel), int4 where it has no int4 kernel (`native`)."""
    groups = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"].values()
    return any(group["weights"]["num_bits"] == 8 for group in groups) or not native


def _check_served(own: dict, served: dict, runtime: str, dequantized: bool) -> None:
    """The recipe's output in vLLM: loaded and served, its KL per kind of sample within 1.5x (+1e-4) of mcq's
    (transformers) on the same samples; the runtime column says whether vLLM's kernels or mcq's dequantized layers
    ran it."""
    assert own["status"] == "ok", own["error"]
    assert served["status"] == "ok", served["error"]
    assert served["runtime"].startswith(runtime) and (DEQUANTIZED in served["runtime"]) == dequantized, \
        served["runtime"]
    # Every kind of sample mcq scored, but the video where the vLLM row left it out (the resampler family's).
    assert set(served["kl_by_kind"]) == set(own["kl_by_kind"]) - ({"video"} if served["skipped_samples"] else set())
    for kind, kl in served["kl_by_kind"].items():
        assert kl <= 1.5 * own["kl_by_kind"][kind] + 1e-4, (served["name"], kind, kl, own["kl_by_kind"][kind])


def _served(outputs: dict[str, tuple[Path, bool]], version: str, native: bool) -> dict[str, Path]:
    """The outputs served here: every one with vLLM's own int4 kernel, else `DEQUANTIZED_SERVED`."""
    return {name: path for name, (path, _) in outputs.items() if native or name in DEQUANTIZED_SERVED[version]}


@pytest.mark.slow
@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_vllm_serves_bf16_and_every_built_in_recipe(version, vllm_python, recipe_outputs, int4_native, tmp_path):
    """bf16 served by vLLM reproduces the transformers reference (KL < 1e-4: the runner's own test); each recipe's
    output served by vLLM is within 1.5x (+1e-4) of mcq's KL: every output with vLLM's int4 kernel (AVX-512 CPUs),
    else one per layout through mcq's dequantizing kernel (`test_vllm_cpu_loads_every_built_in_recipe_output`
    shows that every output loads with vLLM's own). 4.5 runs through the CLI, and `mcq report` shows the vLLM
    rows."""
    runtime = _runtime(vllm_python)
    served = _served(recipe_outputs[version], version, int4_native)
    assert served
    variants = [(f"tiny:{version}", "vllm")]
    variants += [(path, runtime_name) for path in served.values() for runtime_name in ("transformers", "vllm")]
    results = _validate(f"tiny:{version}", variants, cli_json=tmp_path / "results.json" if version == "4.5" else None)
    rows = {row["name"]: row for row in results["variants"]}
    _check_bf16(rows[f"tiny:{version} (vllm)"], runtime)
    for name, path in served.items():
        _check_served(rows[f"{name} (transformers)"], rows[f"{name} (vllm)"], runtime, _dequantized(path, int4_native))
    if version != "4.5":
        return
    metrics = rows["tiny:4.5 (vllm)"]["metrics"]
    assert metrics["gen_exact_match"] == 1.0 and metrics["gen_token_agreement"] == 1.0
    assert metrics["load_s"] > 0 and metrics["peak_rss_load"] > 0 and metrics["peak_rss_generate"] > 0
    assert metrics["prefill_tok_s"] > 0 and metrics["decode_tok_s"] > 0 and metrics["vision_ms"] > 0
    report = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "mcq.cli", "report", str(tmp_path / "results.json"), "--out",
                           str(report)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (report / "report.md").read_text()
    assert "tiny:4.5 (vllm)" in text and rows["tiny:4.5 (vllm)"]["runtime"] in text


@pytest.mark.slow
def test_vllm_serves_4_0_against_its_own_bf16(vllm_python, int4_native, tmp_path):
    """vLLM 0.32's MiniCPMV4_0 does not multiply the text embeddings by `scale_emb` (the official code and mcq do;
    tiny 4.0 has 12, the real checkpoint its own): its bf16 differs from the official model in the LLM, by itself.
    So 4.0 is scored against vLLM's own bf16 (`--reference-runtime vllm`): mcq's transformers bf16 shows the
    difference from that side (large KL in the LLM, none from the vision path: the vision tower and resampler
    agree). The two models differ in how much the same int4 weights move them too (rtn-w4g128, text samples:
    KL 0.0036 in vLLM against 0.00007 in mcq), so the recipes' outputs are served from a copy of tiny 4.0 with
    `scale_emb` 1, where vLLM and mcq compute the same function, each held to 1.5x (+1e-4) of mcq's KL there."""
    import shutil

    from mcq.models.tiny import resolve_tiny

    runtime = _runtime(vllm_python)
    results = _validate("tiny:4.0", [("tiny:4.0", "transformers"), ("tiny:4.0", "vllm")], reference_runtime="vllm")
    reference, official, again = results["variants"]   # the reference's row first, then the variants'
    assert reference["runtime"].startswith(runtime) and reference["metrics"]["kl_mean"] < 1e-6
    assert again["status"] == "ok", again["error"]
    assert again["metrics"]["kl_mean"] < 1e-6 and again["metrics"]["gen_exact_match"] == 1.0
    assert official["status"] == "ok", official["error"]
    # Measured: KL 0.05, top-1 5% (scale_emb 12); a change here means vLLM's 4.0 computes otherwise now.
    assert official["metrics"]["kl_mean"] > 1e-2 and official["kl_vision_path"] < 1e-4
    assert official["metrics"]["vision_cosine"] > 0.9999
    # The video sample: the vLLM reference serves none, so no variant is scored on it.
    assert list(official["skipped_samples"].values()) == [1]

    plain = tmp_path / "tiny-4.0-scale-emb-1"
    shutil.copytree(resolve_tiny("tiny:4.0"), plain)
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "scale_emb": 1.0}, indent=2))
    recipes = {recipe.name: recipe for recipe in _compressed_tensors_recipes()}
    served = {}
    for name in (recipes if int4_native else DEQUANTIZED_SERVED["4.0"]):
        _quantize_for_vllm_cpu(plain, tmp_path / name, recipes[name])
        served[name] = tmp_path / name
    variants = [(plain, "vllm")] + [(path, runtime_name) for path in served.values()
                                    for runtime_name in ("transformers", "vllm")]
    rows = {row["name"]: row for row in _validate(str(plain), variants)["variants"]}
    bf16 = rows[f"{plain.name} (vllm)"]
    assert bf16["status"] == "ok" and bf16["metrics"]["kl_mean"] < 1e-4, bf16
    for name, path in served.items():
        _check_served(rows[f"{name} (transformers)"], rows[f"{name} (vllm)"], runtime, _dequantized(path, int4_native))


def _tiny46_for_vllm_cpu(out: Path) -> Path:
    """tiny:4.6 with the release's linear-attention head dim (128): vllm-cpu 0.32's Gated DeltaNet kernel refuses
    tiny:4.6's 32 ("Unexpected head dim size")."""
    import shutil

    import torch
    from transformers import AutoTokenizer, MiniCPMV4_6ForConditionalGeneration

    from mcq.models.minicpmv4_6.tiny import LLM_LAYERS, VISION_LAYERS, tiny_config
    from mcq.models.tiny import resolve_tiny

    shutil.copytree(resolve_tiny("tiny:4.6"), out, ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
    config = tiny_config(AutoTokenizer.from_pretrained(out), LLM_LAYERS, VISION_LAYERS)
    text = config.text_config
    text.linear_key_head_dim = text.linear_value_head_dim = 128   # tiny:4.6's heads (8 key, 16 value) kept
    torch.manual_seed(0)
    model = MiniCPMV4_6ForConditionalGeneration(config).to(torch.bfloat16)
    model.generation_config = MiniCPMV4_6ForConditionalGeneration.from_pretrained(
        resolve_tiny("tiny:4.6")).generation_config
    model.save_pretrained(out)
    return out


@pytest.mark.slow
def test_vllm_serves_4_6(vllm_python, int4_native, tmp_path):
    """MiniCPM-V 4.6 in vLLM (mcq's plugin stands in for torchvision, which vLLM's 4.6 imports and processes with):
    vLLM's bf16 (its CPU build's only dtype for the Gated DeltaNet layers) builds the reference's prompts and
    reproduces mcq's float32 transformers reference (measured: KL 4.1e-6, vision cosine 0.99998), the video sample
    included (its frames' features as video embeddings, vLLM's placeholder equal to the reference's, token for
    token: the runner checks it; its KL 3.4e-6). The whole model in int4 (rtn-w4g128 for
    vLLM's CPU build: vision tower, vit_merger attention, both LLM layer kinds) loads under vLLM's own module names
    (`quantization_config` names modules plainly: vLLM maps no pattern) and is served within 1.5x (+1e-4) of mcq's
    KL (measured: 0.00488 in both, every kind of sample within 0.5%)."""
    from mcq.quantize.api import quantize

    runtime = _runtime(vllm_python)
    reference = _tiny46_for_vllm_cpu(tmp_path / "tiny46")
    int4 = tmp_path / "rtn-w4g128"
    quantize(reference, int4, recipe="rtn-w4g128", target=[CPU_TARGET], progress=False)
    results = _validate(str(reference), [(reference, "vllm"), (int4, "transformers"), (int4, "vllm")])
    rows = {row["name"]: row for row in results["variants"]}
    bf16 = rows["tiny46 (vllm)"]
    assert bf16["status"] == "ok", bf16["error"]
    assert bf16["runtime"].startswith(runtime) and "bfloat16" in bf16["runtime"]
    assert bf16["metrics"]["kl_mean"] < 1e-4 and bf16["metrics"]["top1_agreement"] > 0.99
    assert bf16["metrics"]["vision_cosine"] > 0.999 and bf16["kl_vision_path"] < 1e-4
    assert bf16["metrics"]["gen_exact_match"] == 1.0
    assert bf16["skipped_samples"] == {} and bf16["kl_by_kind"]["video"] < 1e-4, bf16["kl_by_kind"]
    _check_served(rows["rtn-w4g128 (transformers)"], rows["rtn-w4g128 (vllm)"], runtime, not int4_native)
    # Quantized, not left in bf16 by vLLM: the int4 output moves the model a thousand times more than bf16 does.
    assert rows["rtn-w4g128 (vllm)"]["metrics"]["kl_mean"] > 100 * bf16["metrics"]["kl_mean"]
