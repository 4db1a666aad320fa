"""Core ML export: saved packages checked structurally, weight by weight, and numerically through the numpy
reference interpreter (on macOS also through Core ML itself) against the torch model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
import torch

from mcq.errors import McqError
from mcq.export.coreml import api
from mcq.export.coreml.convert import MAX_PATCHES, kmeans_palette
from mcq.export.coreml.host import vision_inputs
from mcq.export.coreml.program import Operation, Program, load_program, materialized
from mcq.validate.coreml.interpreter import Interpreter, check_supported

MODEL = "tiny:4.5"
# Slices of the test: one with much padding (600 patches), one of the processor's slices past 32 x 32 patches (37 x 28
# = 1036, of a 4:3 image), and one that fills the package.
SLICES = ((20, 30), (37, 28), (34, 32))
SPEC_VERSION = {"iOS17": 8, "iOS18": 9}      # Core ML specification version each deployment target writes
# tiny:4.5's resampler packs video frames: its vision package is the tower (vision width 128), the resampler package
# takes 1 to 6 frames (None: the flexible frame count).
TOWER_INPUTS = {"pixel_values": ("FLOAT16", [1, 3, 14, 14 * MAX_PATCHES]), "position_ids": ("INT32", [1, MAX_PATCHES]),
                "patch_mask": ("FLOAT16", [1, MAX_PATCHES])}
RESAMPLER_INPUTS = {"vision_features": ("FLOAT16", [None, MAX_PATCHES, 128]),
                    "key_positions": ("FLOAT16", [None, MAX_PATCHES, 256]),
                    "patch_mask": ("FLOAT16", [None, MAX_PATCHES])}
SLICE_INPUTS = ("pixel_values", "position_ids", "patch_mask", "key_positions")     # `VisionSlice`'s
COMPRESSED_OP = {"int8": {"iOS17": "constexpr_affine_dequantize", "iOS18": "constexpr_blockwise_shift_scale"},
                 "palettize4": {"iOS17": "constexpr_lut_to_dense", "iOS18": "constexpr_lut_to_dense"},
                 "palettize6": {"iOS18": "constexpr_lut_to_dense"}}


def as_declared(inputs: dict, program) -> dict:
    """Inputs in the dtypes the package declares (what Core ML's predict is given on macOS)."""
    dtypes = {"FLOAT16": np.float16, "FLOAT32": np.float32, "INT32": np.int32}
    return {name: np.asarray(value).astype(dtypes[program.inputs[name][0]]) for name, value in inputs.items()}


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def weights():
    from mcq.export.weights_source import ExportWeights

    source = ExportWeights(MODEL)
    yield source
    source.close()


@pytest.fixture(scope="module")
def reference(weights):
    """The torch model's resampled features and the host inputs, per test slice."""
    from transformers import AutoModel

    import mcq  # noqa: F401  (registers the model type)

    model = AutoModel.from_pretrained(str(weights.path), dtype=torch.float32).eval()
    config = weights.config
    cases = []
    generator = torch.Generator().manual_seed(0)
    for height, width in SLICES:
        pixels = torch.randn(3, 14, 14 * height * width, generator=generator)
        with torch.no_grad():
            expected = model.get_vision_embedding([pixels], torch.tensor([[height, width]])).numpy()
        inputs = vision_inputs(pixels, height, width, patch=14, patches_per_side=config.vision_config.image_size // 14,
                               hidden=config.hidden_size, max_patches=MAX_PATCHES)
        cases.append((inputs, expected))
    return cases


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One export per (vision compression, target) the tests look at, made once."""
    made = {}

    def export(vision: str, target: str) -> Path:
        if (vision, target) not in made:
            out = tmp_path_factory.mktemp("coreml") / f"{vision}-{target}"
            api.export_coreml(MODEL, out, target=target, vision=vision, llm="none", progress=False)
            made[vision, target] = out
        return made[vision, target]

    return export


def _interpreted(out: Path, inputs: dict) -> np.ndarray:
    """`image_features` of one slice (host inputs of `vision_inputs`) through an export's vision packages: the vision
    package, or where the export has a group resampler, the tower and then the resampler with one frame."""
    vision = Interpreter(load_program(out / api.VISION_PACKAGE)).predict(inputs)
    if not (out / api.RESAMPLER_PACKAGE).is_dir():
        return vision["image_features"].astype(np.float32)
    resampler = Interpreter(load_program(out / api.RESAMPLER_PACKAGE))
    return resampler.predict({"vision_features": vision["vision_features"], "key_positions": inputs["key_positions"],
                              "patch_mask": inputs["patch_mask"]})["image_features"].astype(np.float32)


def test_vision_fp16_package_structure(exports):

    out = exports("fp16", "iOS17")
    package = out / api.VISION_PACKAGE
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    assert spec.specificationVersion == SPEC_VERSION["iOS17"]
    program = load_program(package)
    assert program.inputs == TOWER_INPUTS
    assert program.outputs == ["vision_features"]
    output = spec.description.output[0].type.multiArrayType
    assert list(output.shape) == [1, MAX_PATCHES, 128]
    assert output.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    ops = program.op_types()
    assert not any(op.startswith("constexpr_") for op in ops)     # fp16: nothing compressed
    assert {"linear", "layer_norm", "softmax", "gather"} <= ops
    resampler = load_program(out / api.RESAMPLER_PACKAGE)
    assert resampler.inputs == RESAMPLER_INPUTS and resampler.outputs == ["image_features"]
    # The tower's weights in its package only, the resampler's in its own: each stored once.
    tower_prefixes, resampler_prefixes = ("tower_",), ("resampler_",)     # `VisionSlice`'s two halves
    tower_names, resampler_names = [n for n, _ in program.stored()], [n for n, _ in resampler.stored()]
    assert any(n.startswith(tower_prefixes) for n in tower_names)
    assert not any(n.startswith(resampler_prefixes) for n in tower_names)
    assert any(n.startswith(resampler_prefixes) for n in resampler_names)
    assert not any(n.startswith(tower_prefixes) for n in resampler_names)
    frames = list(range(1, 7))       # 4.5's temporal groups hold 1 to 6 frames
    # The frame count: a bounded range on iOS17 (one enumerated input at most below iOS18), enumerated on iOS18.
    for target in ("iOS17", "iOS18"):
        spec = ct.models.MLModel(str(exports("fp16" if target == "iOS17" else "int8", target)
                                     / api.RESAMPLER_PACKAGE), skip_model_load=True).get_spec()
        for feature in spec.description.input:
            array = feature.type.multiArrayType
            if target == "iOS17":
                bounds = array.shapeRange.sizeRanges[0]
                assert (bounds.lowerBound, bounds.upperBound) == (1, 6), feature.name
            else:
                assert [list(shape.shape)[0] for shape in array.enumeratedShapes.shapes] == frames, feature.name
        output = spec.description.output[0].type.multiArrayType
        assert list(output.shape) == [1, 64, 256]
    sidecar = json.loads((out / api.SIDECAR).read_text())
    assert sidecar["vision"]["max_patches"] == MAX_PATCHES and sidecar["vision"]["query_num"] == 64
    assert set(sidecar["vision"]["host"]) == set(TOWER_INPUTS) and sidecar["vision"]["outputs"] == ["vision_features"]
    assert sidecar["resampler"]["package"] == api.RESAMPLER_PACKAGE and sidecar["resampler"]["frames"] == frames
    assert sidecar["tokens"]["image_placeholder"] != sidecar["tokens"]["im_start"]
    manifest = json.loads((out / "mcq-manifest.json").read_text())
    assert manifest["kind"] == "coreml" and manifest["settings"]["vision"] == "fp16"
    assert any(name.startswith(api.VISION_PACKAGE) for name in manifest["outputs"])


def test_vision_fp16_package_agrees_with_torch(exports, reference):
    out = exports("fp16", "iOS17")
    for inputs, expected in reference:
        got = _interpreted(out, inputs)
        assert got.shape == expected.shape == (1, 64, 256)
        assert cosine(got, expected) > 0.999
    if sys.platform == "darwin":    # the same check through Core ML itself (the macOS CI job)
        tower = ct.models.MLModel(str(out / api.VISION_PACKAGE), compute_units=ct.ComputeUnit.CPU_ONLY)
        resampler = ct.models.MLModel(str(out / api.RESAMPLER_PACKAGE), compute_units=ct.ComputeUnit.CPU_ONLY)
        program = load_program(out / api.VISION_PACKAGE)
        for inputs, expected in reference:
            features = tower.predict(as_declared({k: inputs[k] for k in TOWER_INPUTS}, program))["vision_features"]
            got = resampler.predict({"vision_features": features, "patch_mask": inputs["patch_mask"].astype(np.float16),
                                     "key_positions": inputs["key_positions"].astype(np.float16)})["image_features"]
            assert cosine(got, expected) > 0.999


def test_padding_is_masked(exports, reference):
    """Changing the pixels of padded patches must not change the output (the port without a mask fails this)."""
    out = exports("fp16", "iOS17")
    inputs, _ = reference[0]
    noisy = dict(inputs)
    noisy["pixel_values"] = inputs["pixel_values"].copy()
    noisy["pixel_values"][..., 14 * 600:] = 3.0
    np.testing.assert_array_equal(_interpreted(out, inputs), _interpreted(out, noisy))


@pytest.fixture(scope="module")
def video():
    """A 4.5 video: 7 frames at 1 fps in temporal groups of 3, 3 and 1 (the second group's frames 37 x 28 patches, so
    a group's packed keys have padding between frames), processed as `chat()` does; the torch model's blocks, and
    what it gives with the temporal term dropped (every id -1) and without the grouping (one block per frame)."""
    from onnx_helpers import chat_inputs, image

    from mcq.models.loading import load_model, load_processor

    model, processor = load_model(MODEL, dtype="float32"), load_processor(MODEL)
    frames = [image(448, 448, s) for s in range(3)] + [image(560, 420, s) for s in range(3, 6)] + [image(448, 448, 9)]
    inputs = chat_inputs(model, processor, [{"role": "user", "content": frames + ["What happens?"]}],
                         use_image_id=False, max_slice_nums=1, temporal_ids=[[0, 10, 20], [30, 40, 50], [90]])
    slices, sizes, groups = inputs["pixel_values"][0], inputs["tgt_sizes"][0], inputs["temporal_ids"][0]
    with torch.no_grad():
        expected = model.get_vision_embedding(slices, sizes, groups).numpy()
        no_temporal = model.get_vision_embedding(slices, sizes, [[-1] * len(g) for g in groups]).numpy()
        ungrouped = model.get_vision_embedding(slices, sizes).numpy()
    return (slices, sizes, groups), expected, {"no temporal term": no_temporal, "ungrouped": ungrouped}


def test_video_groups_agree_with_torch(exports, video):
    """Each temporal group through the tower frame by frame and the resampler once over its packed frames gives the
    torch 3D resampler's block: measured on the fp16 packages, max |diff| 2.7e-3 (max |x| 3.2), cosine 0.9999998.
    Dropping the temporal term moves torch's blocks by 0.062 (20x that), and without the grouping there is a block
    per frame, so either loss fails here."""
    from mcq.validate.coreml.runtime import CoremlMiniCPMV

    (slices, sizes, groups), expected, broken = video
    out = exports("fp16", "iOS17")
    for native in (False, True) if sys.platform == "darwin" else (False,):
        got = CoremlMiniCPMV(out, native=native).encode_slices(slices, sizes, groups)
        assert got.shape == expected.shape == (3, 64, 256)
        error = np.abs(got - expected).max()
        assert error < 1e-2 and cosine(got, expected) > 0.99999
    for other in broken.values():
        assert other.shape != expected.shape or np.abs(other - expected).max() > 10 * error
    with pytest.raises(McqError, match="takes 1, 2, 3, 4, 5, 6"):
        CoremlMiniCPMV(out, native=False).encode_slices([slices[0]] * 7, [sizes[0].tolist()] * 7, [list(range(7))])


@pytest.mark.parametrize(("vision", "target"), [("int8", "iOS17"), ("int8", "iOS18"), ("palettize4", "iOS17"),
                                                ("palettize4", "iOS18"), ("palettize6", "iOS18")])
def test_vision_compression(exports, reference, weights, vision, target):
    """Weights as the package decompresses them are close to torch's, and the whole program, run on them, is the
    torch wrapper with those weights (so the interpreter and the conversion are checked apart from the rounding)."""
    from mcq.models.minicpmv.programs import VisionSlice
    from mcq.models.traceable import as_linear_ops

    out = exports(vision, target)
    programs = [load_program(out / package) for package in (api.VISION_PACKAGE, api.RESAMPLER_PACKAGE)]
    assert all(COMPRESSED_OP[vision][target] in program.op_types() for program in programs)
    decompressed = {name: value for program in programs for name, value in Interpreter(program).weights().items()}
    module = as_linear_ops(VisionSlice(weights, MAX_PATCHES)).eval()
    compressed_names = 0
    for name, parameter in module.state_dict().items():
        key = name.replace(".", "_") + "_to_fp16"
        found = [value for stored, value in decompressed.items() if stored.startswith(key) and stored != key]
        if not found:
            continue
        compressed_names += 1
        original = parameter.numpy()
        stored = found[0].astype(np.float32).reshape(original.shape)
        error = np.abs(stored - original)
        if vision == "int8":   # symmetric per output channel: at most half a step of max|w| / 127, plus fp16
            bound = np.abs(original).max(axis=1, keepdims=True) / 127 * 0.5 + np.abs(original) * 2**-10 + 1e-6
            assert (error <= bound).all(), name
        else:                  # at most 2^bits palette entries per group, each weight on its nearest entry
            levels = 2 ** int(vision.removeprefix("palettize"))
            group = 16 * original.shape[1] if target == "iOS18" else original.size   # per_grouped_channel: 16 rows
            for stored_group, original_group in zip(stored.reshape(-1, group), original.reshape(-1, group)):
                palette = np.unique(stored_group)
                assert len(palette) <= levels, name
                nearest = np.abs(original_group[:, None] - palette[None, :]).min(axis=1)
                assert (np.abs(stored_group - original_group) <= nearest + 1e-4).all(), name
        parameter.copy_(torch.from_numpy(stored))
    assert compressed_names >= 10     # every Linear of the tower and the resampler
    for inputs, expected in reference:
        got = _interpreted(out, inputs)
        with torch.no_grad():
            wrapped = module(*(torch.from_numpy(inputs[k]) for k in SLICE_INPUTS)).numpy()
        assert cosine(got, wrapped) > 0.999
        assert cosine(got, expected) > {"int8": 0.999, "palettize6": 0.99, "palettize4": 0.95}[vision]


def test_export_is_deterministic(exports, tmp_path):
    first = exports("palettize4", "iOS18")
    again = tmp_path / "again"
    api.export_coreml(MODEL, again, target="iOS18", vision="palettize4", llm="none", progress=False)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for file in files:
        assert (first / file).read_bytes() == (again / file).read_bytes(), file


@pytest.mark.parametrize(("options", "message"), [
    ({"target": "iOS16"}, "--target 'iOS16'"),
    ({"vision": "int4"}, "--vision 'int4'"),
    ({"llm": "int3"}, "--llm 'int3'"),
    ({"llm": "int4-block32", "target": "iOS17"}, "needs --target iOS18"),
    ({"llm": "fp16", "target": "iOS17"}, "needs --target iOS18"),
])
def test_bad_options_fail_before_any_work(tmp_path, options, message):
    out = tmp_path / "out"
    with pytest.raises(McqError, match=message.replace("'", ".").replace("-", ".")):
        api.export_coreml(MODEL, out, progress=False, **{"llm": "none", **options})
    assert not out.exists()


def test_failure_leaves_no_output(tmp_path, monkeypatch):
    from mcq.export.coreml import convert

    saved = []
    real = convert.save_package

    def fails_on_the_second_package(model, path):
        if saved:
            raise McqError("disk full (simulated) while saving a package")
        saved.append(path)
        real(model, path)

    monkeypatch.setattr(convert, "save_package", fails_on_the_second_package)
    out = tmp_path / "out"
    with pytest.raises(McqError, match="simulated"):
        api.export_coreml(MODEL, out, llm="int4-block32", progress=False)
    # The first package was written into the staging folder, which is gone with it.
    assert saved and not saved[0].exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(exports):
    out = exports("fp16", "iOS17")
    with pytest.raises(McqError, match="--force"):
        api.export_coreml(MODEL, out, vision="fp16", target="iOS17", llm="none", progress=False)


def test_interpreter_names_missing_ops(tmp_path):
    program = Program(tmp_path / "x.mlpackage", "CoreML7", {}, {}, [Operation("einsum", "e", {}, [("y", "FLOAT16")])],
                      ["y"])
    with pytest.raises(McqError, match="'einsum'"):
        check_supported(program)



@pytest.mark.parametrize("chunk", [None, 64, 24])      # a chunk of 64 elements: one row; 24: rows split
@pytest.mark.parametrize("blocks", [(8, 2), (1, 64), (8, 64), (2, 4)])
def test_blockwise_dequantization_is_each_element_s_block(blocks, chunk, monkeypatch):
    """The interpreter's iOS18 blockwise dequantization (scales broadcast over their blocks, a chunk of rows at a
    time) against the definition written per element: (data[i, j] - offset[block]) * scale[block], block = (i //
    rows per block, j // cols), computed in float32 and stored in the scale's type (fp16) as MIL declares it."""
    from mcq.validate.coreml import interpreter

    if chunk:
        monkeypatch.setattr(interpreter, "CHUNK_ELEMENTS", chunk)
    dequantize = interpreter.OPS["constexpr_blockwise_shift_scale"]
    rng = np.random.default_rng(0)
    data = rng.integers(-8, 8, size=(8, 64)).astype(np.int8)
    scale = rng.random(blocks).astype(np.float16)
    offset = rng.integers(-3, 3, size=blocks).astype(np.int8)
    rows, cols = np.arange(8)[:, None] // (8 // blocks[0]), np.arange(64)[None, :] // (64 // blocks[1])
    expected = (data.astype(np.float32) - offset.astype(np.float32)[rows, cols]) * scale.astype(np.float32)[rows, cols]
    assert np.array_equal(dequantize(data, scale, offset), expected.astype(np.float16))
    assert dequantize(data, scale).dtype == np.float16
    assert np.array_equal(dequantize(data, scale),
                          (data.astype(np.float32) * scale.astype(np.float32)[rows, cols]).astype(np.float16))


@pytest.mark.parametrize("chunk", [64, 24, 8])
def test_dequantization_and_linear_in_chunks_equal_whole(chunk, monkeypatch):
    """Chunking the widening of large weights changes no value: iOS16 affine and palette (packed 3-bit indices
    across chunk borders too) and iOS18 palette decompress to the same arrays, and a linear over fp16 weights
    widened a chunk of rows at a time gives the whole product's values."""
    from mcq.validate.coreml import interpreter

    ops, rng = interpreter.OPS, np.random.default_rng(1)
    levels = rng.integers(0, 16, size=(12, 32)).astype(np.uint8)
    cases = {
        "affine per row": lambda: ops["constexpr_affine_dequantize"](
            levels, rng.integers(0, 16, 12).astype(np.uint8), rng.random(12).astype(np.float16), 0),
        "affine per column": lambda: ops["constexpr_affine_dequantize"](
            levels, np.uint8(7), rng.random(32).astype(np.float16), 1),
        "palette iOS16, 3 bits": lambda: ops["constexpr_lut_to_dense"](
            np.packbits(rng.integers(0, 2, 12 * 32 * 3).astype(np.uint8), bitorder="little"),
            rng.random(8).astype(np.float16), shape=np.array([12, 32])),
        "palette iOS18": lambda: ops["constexpr_lut_to_dense"](
            levels, rng.random((3, 1, 16, 1)).astype(np.float16)),
    }
    weight = rng.standard_normal((40, 16)).astype(np.float16)
    x = rng.standard_normal((3, 16)).astype(np.float16)
    whole = {}
    for name, make in cases.items():
        rng = np.random.default_rng(2)
        whole[name] = make()
    whole_linear = interpreter._linear(x, weight)
    monkeypatch.setattr(interpreter, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(interpreter, "WHOLE_PRODUCT_ELEMENTS", chunk)
    for name, make in cases.items():
        rng = np.random.default_rng(2)
        chunked = make()
        assert chunked.dtype == np.float16 and np.array_equal(chunked, whole[name]), name
    assert np.allclose(interpreter._linear(x, weight), whole_linear, rtol=1e-6, atol=1e-6)


def test_interpreter_holds_a_large_quantized_weight_in_fp16_only(monkeypatch):
    """Running a linear on a blockwise int4 weight holds its fp16 values and one chunk, not a float32 copy (on the
    151,748-row LM head of a real-vocabulary export that copy was 2.5 GB per call): under 2.6 bytes per element
    beside the levels (before: 6.1)."""
    import tracemalloc

    from mcq.validate.coreml import interpreter
    from mcq.validate.coreml.interpreter import OPS, _linear

    # The 8M-element weight as an LM head: 32 chunks
    monkeypatch.setattr(interpreter, "CHUNK_ELEMENTS", 1 << 18)
    monkeypatch.setattr(interpreter, "WHOLE_PRODUCT_ELEMENTS", 1 << 18)

    rows, columns = 4096, 2048
    data = np.random.default_rng(0).integers(-8, 8, size=(rows, columns)).astype(np.int8)
    scale = np.full((rows, columns // 32), 0.01, dtype=np.float16)
    x = np.ones((1, 4, columns), dtype=np.float16)
    tracemalloc.start()          # numpy reports its buffers to tracemalloc
    try:
        _linear(x, OPS["constexpr_blockwise_shift_scale"](data, scale))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.6 * data.size, f"interpreter peak {peak / data.size:.1f} bytes per weight element"


def test_interpreter_rejects_wrong_input_shape(exports, reference):
    interpreter = Interpreter(load_program(exports("fp16", "iOS17") / api.VISION_PACKAGE))
    inputs = dict(reference[0][0])
    inputs["patch_mask"] = inputs["patch_mask"][:, :512]
    with pytest.raises(McqError, match="patch_mask"):
        interpreter.predict(inputs)


def test_kmeans_palette_is_exact_on_few_values_and_deterministic():
    values = np.array([0.5, -1.0, 0.25, 0.5, -1.0, 2.0] * 10, dtype=np.float32)
    palette, indices = kmeans_palette(values, 2)
    assert palette.shape == (4,) and indices.dtype == np.uint8
    np.testing.assert_array_equal(palette[indices], values)
    weight = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    first, second = kmeans_palette(weight, 4), kmeans_palette(weight, 4)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    # Lloyd iterations from quantiles beat a uniform grid on Gaussian weights.
    grid = np.linspace(weight.min(), weight.max(), 16)
    uniform_error = np.abs(grid[np.abs(weight.reshape(-1, 1) - grid).argmin(1)] - weight.ravel()).mean()
    assert np.abs(first[0][first[1]] - weight.ravel()).mean() < uniform_error


class _Head(torch.nn.Module):
    """An LM head's shape of program (norm, then a wide Linear), seeded."""

    def __init__(self, vocab: int, hidden: int, scale: float = 3.0, norm: float = 1.0):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight.data = torch.randn(vocab, hidden, generator=generator) * scale
        self.norm = torch.nn.Parameter(torch.full((hidden,), norm), requires_grad=False)

    def forward(self, hidden_states):
        normed = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.lm_head(normed * self.norm)


def _convert_head(head: _Head):
    from mcq.export.coreml.convert import _convert

    hidden = head.norm.shape[0]
    length = ct.RangeDim(lower_bound=1, upper_bound=8, default=1, symbol="length")
    return _convert(ct, head, (torch.zeros(1, 2, hidden),),
                    [ct.TensorType("hidden_states", shape=(1, length, hidden), dtype=np.float16)],
                    [ct.TensorType("logits", dtype=np.float16)], "iOS18")


def test_conversion_holds_a_large_weight_about_once(monkeypatch):
    """coremltools' fp16 cast pass checks a float32 constant's range with np.where over all of it (about 8x the
    weight: 20 GB for 4.5's 151,748-row LM head); mcq's pass reads it a block of rows at a time."""
    import tracemalloc

    head = _Head(vocab=4096, hidden=1024)
    weight_bytes = head.lm_head.weight.numel() * 4
    tracemalloc.start()          # numpy reports its buffers to tracemalloc
    try:
        _convert_head(head)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * weight_bytes, f"conversion peak {peak / weight_bytes:.1f}x the float32 weight"


# 1e5: the weight overflows fp16, so the op is kept in fp32; a norm of 1e-9 (under 400 values) underflows fp16, which
# the stock pass turns into fp16's smallest value rather than 0.
@pytest.mark.parametrize("scale, norm", [(3.0, 1.0), (1e5, 1.0), (3.0, 1e-9)])
def test_row_block_fp16_cast_gives_the_stock_program(tmp_path, monkeypatch, scale, norm):
    from mcq.export.coreml import convert

    made = {}
    for label in ("mcq", "stock"):
        if label == "stock":
            monkeypatch.setattr(convert, "_pass_pipeline", lambda ct: None)
        convert.save_package(_convert_head(_Head(vocab=256, hidden=64, scale=scale, norm=norm)),
                             tmp_path / f"{label}.mlpackage")
        made[label] = {path.relative_to(tmp_path / f"{label}.mlpackage"): path.read_bytes()
                       for path in sorted((tmp_path / f"{label}.mlpackage").rglob("*")) if path.is_file()}
    assert made["mcq"] == made["stock"]


def test_fits_fp16_is_coremltools_rule():
    from mcq.export.coreml.convert import _fits_fp16

    rows = np.zeros((3000, 8), np.float32)
    assert _fits_fp16(rows) and _fits_fp16(np.float32(65504)) and _fits_fp16(np.array([1.0, np.inf, -1e39]))
    rows[2999, 7] = -70000.0                 # in the last block of rows
    assert not _fits_fp16(rows) and not _fits_fp16(np.float32(65505.0))
    assert not _fits_fp16(np.full((2, 3, 4), 1e37, np.float32))


def test_host_inputs_refuse_oversized_slices():
    with pytest.raises(McqError, match="exceeds"):
        vision_inputs(np.zeros((3, 14, 14 * 35 * 32)), 35, 32, patch=14, patches_per_side=70, hidden=256,
                      max_patches=MAX_PATCHES)


# -- LLM -------------------------------------------------------------------------------------------------------------

PROMPT = [5, 17, 300, 42, 9, 1000, 77, 3]
CALLS = ((0, 4), (4, 3), (7, 1))     # (past, new tokens): a prefill, a chunk, then one decode step


@pytest.fixture(scope="module")
def llm_reference(weights):
    """Embeddings and the torch LLM's logits for PROMPT (teacher forced, one pass)."""
    from transformers import AutoModel

    import mcq  # noqa: F401

    model = AutoModel.from_pretrained(str(weights.path), dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        embeds = model.llm.get_input_embeddings()(ids)
        logits = model.llm(inputs_embeds=embeds).logits
    return embeds.numpy(), logits.numpy()


@pytest.fixture(scope="module")
def llm_exports(tmp_path_factory):
    made = {}

    def export(llm: str) -> Path:
        if llm not in made:
            out = tmp_path_factory.mktemp("coreml-llm") / llm
            api.export_coreml(MODEL, out, target="iOS18", vision="fp16", llm=llm, progress=False)
            made[llm] = out
        return made[llm]

    return export


def _llm_feeds(embeds: np.ndarray, past: int, length: int, config) -> dict[str, np.ndarray]:
    from mcq.export.coreml.convert import rope_theta
    from mcq.export.coreml.host import causal_mask, rotary_inputs

    cos, sin = rotary_inputs(np.arange(past, past + length), config.head_dim, rope_theta(config))
    return {"inputs_embeds": embeds[:, past : past + length], "position_cos": cos, "position_sin": sin,
            "causal_mask": causal_mask(past, length)}


class InterpretedLlm:
    """An export's decoder packages and head package through the interpreter, called as the runtime calls them:
    `predict` takes the embeddings with the host inputs of one call and returns its logits."""

    def __init__(self, out: Path):
        llm = json.loads((out / api.SIDECAR).read_text())["llm"]
        self.decoders = [Interpreter(load_program(out / chunk["package"])) for chunk in llm["decoder"]]
        self.head = Interpreter(load_program(out / llm["head_package"]))

    def reset_state(self) -> None:
        for decoder in self.decoders:
            decoder.reset_state()

    def predict(self, feeds: dict) -> dict:
        hidden = feeds["inputs_embeds"]
        for decoder in self.decoders:
            hidden = decoder.predict({"hidden_states": hidden, "position_cos": feeds["position_cos"],
                                      "position_sin": feeds["position_sin"],
                                      "causal_mask": feeds["causal_mask"]})["output_hidden_states"]
        return self.head.predict({"hidden_states": hidden})

    def weights(self) -> dict:
        return {name: value for interpreter in (*self.decoders, self.head)
                for name, value in interpreter.weights().items()}


def _run_calls(interpreter, embeds, config) -> np.ndarray:
    interpreter.reset_state()
    return np.concatenate([interpreter.predict(_llm_feeds(embeds, past, length, config))["logits"]
                           for past, length in CALLS], axis=1).astype(np.float32)


def test_llm_package_structure(llm_exports, weights):
    out = llm_exports("int4-block32")
    config = weights.config
    decoder, head = out / api.decoder_package(0), out / api.HEAD_PACKAGE
    assert sorted(p.name for p in out.glob("*.mlpackage")) == [   # tiny: one decoder chunk
        api.EMBED_PACKAGE, head.name, decoder.name, api.RESAMPLER_PACKAGE, api.VISION_PACKAGE]
    for package in (decoder, head):
        assert ct.models.MLModel(str(package), skip_model_load=True).get_spec().specificationVersion == \
            SPEC_VERSION["iOS18"]
    program = load_program(decoder)
    cache = [config.num_hidden_layers, 1, config.num_key_value_heads, 4096, config.head_dim]
    assert program.states == {"key_cache": ("FLOAT16", cache), "value_cache": ("FLOAT16", cache)}
    assert program.inputs == {"hidden_states": ("FLOAT16", [1, None, 256]),
                              "position_cos": ("FLOAT16", [1, 1, None, 64]),
                              "position_sin": ("FLOAT16", [1, 1, None, 64]),
                              "causal_mask": ("FLOAT16", [1, 1, None, None])}
    assert program.outputs == ["output_hidden_states"]
    head_program = load_program(head)
    assert head_program.inputs == {"hidden_states": ("FLOAT16", [1, None, 256])} and not head_program.states
    assert head_program.outputs == ["logits"]
    ops = program.op_types()
    assert {"constexpr_blockwise_shift_scale", "read_state", "write_state", "slice_update"} <= ops
    # Every Linear (7 per layer) and the LM head, stored as int4 with one scale per block of 32 inputs.
    blockwise = {package: [op for op in p.operations if op.type == "constexpr_blockwise_shift_scale"]
                 for package, p in ((decoder, program), (head, head_program))}
    assert len(blockwise[decoder]) == 7 * config.num_hidden_layers and len(blockwise[head]) == 1
    for package, ops in blockwise.items():
        interpreter = Interpreter(load_program(package))
        env = interpreter.weights()
        for op in ops:
            data, scale = (env[ref] if kind == "var" else materialized(ref)
                           for kind, ref in (op.inputs[key][0] for key in ("data", "scale")))
            assert data.min() >= -8 and data.max() <= 7
            assert scale.shape == (data.shape[0], data.shape[1] // 32)
    sidecar = json.loads((out / api.SIDECAR).read_text())["llm"]
    assert sidecar["kv_heads"] == config.num_key_value_heads
    assert sidecar["decoder"] == [{"package": decoder.name, "layers": [0, config.num_hidden_layers],
                                   "states": {name: {"dtype": "float16", "shape": cache}
                                              for name in ("key_cache", "value_cache")}}]




def test_chat_refuses_a_resampler_family_export_in_one_line(llm_exports, capsys):
    from mcq.cli import main

    assert main(["chat", "--model", str(llm_exports("fp16")), "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mcq validate --variant" in err

@pytest.mark.parametrize("llm", ["int8", "palettize4"])
def test_llm_compressions_run_in_the_interpreter(llm_exports, llm_reference, weights, llm):
    """Every LLM compression's packages hold only ops the interpreter knows (Linux validation runs them there) and
    compute the decoder: close to the float model, as close as their rounding allows."""
    embeds, expected = llm_reference
    got = _run_calls(InterpretedLlm(llm_exports(llm)), embeds, weights.config)
    assert cosine(got, expected) > (0.999 if llm == "int8" else 0.95)     # measured 0.99985, 0.972

def test_llm_fp16_package_agrees_with_torch_across_calls(llm_exports, llm_reference, weights):
    embeds, expected = llm_reference
    interpreter = InterpretedLlm(llm_exports("fp16"))
    got = _run_calls(interpreter, embeds, weights.config)
    assert cosine(got, expected) > 0.9999
    np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    # The cache carries the context: the second call alone, on an empty cache, gives other logits.
    interpreter.reset_state()
    alone = interpreter.predict(_llm_feeds(embeds, 4, 3, weights.config))["logits"].astype(np.float32)
    assert cosine(alone, expected[:, 4:7]) < 0.999
    if sys.platform == "darwin":
        from mcq.validate.coreml.runtime import CoremlMiniCPMV

        model = CoremlMiniCPMV(llm_exports("fp16"), native=True)
        native = np.concatenate([model.decode(embeds[0, past: past + length], past) for past, length in CALLS])
        assert cosine(native[None], expected) > 0.9999


def test_llm_in_chunk_packages_computes_what_one_package_computes(llm_exports, llm_reference, weights, tmp_path,
                                                                  monkeypatch):
    """The decoder split into one package per layer (what real widths get: ≤ 1 GiB of fp16 weights a package)
    gives the same weights and bit for bit the same logits as the tiny model's single decoder package."""
    from mcq.export.coreml import convert

    monkeypatch.setattr(convert, "LLM_PACKAGE_BYTES", 1)
    out = tmp_path / "chunks"
    result = api.export_coreml(MODEL, out, vision="fp16", llm="int4-block32", progress=False)
    layers = weights.config.num_hidden_layers
    assert [Path(p.path).name for p in result.llm] == [api.decoder_package(i) for i in range(layers)] + \
        [api.HEAD_PACKAGE]
    sidecar = json.loads((out / api.SIDECAR).read_text())["llm"]
    assert [chunk["layers"] for chunk in sidecar["decoder"]] == [[i, i + 1] for i in range(layers)]
    assert sidecar["decoder"][0]["states"]["key_cache"]["shape"][0] == 1
    whole, chunked = InterpretedLlm(llm_exports("int4-block32")), InterpretedLlm(out)
    embeds, _ = llm_reference
    assert np.array_equal(_run_calls(chunked, embeds, weights.config), _run_calls(whole, embeds, weights.config))
    per_chunk = [decoder.weights() for decoder in chunked.decoders]
    head = chunked.head.weights()
    compared = 0
    for name, value in whole.weights().items():
        if name.startswith("layers_"):
            # coremltools names a chunk's weights after its own module path: layer i is layers_0 of chunk i
            index, rest = name.split("_", 2)[1:]
            ours = per_chunk[int(index)][f"layers_0_{rest}"]
        elif name.startswith(("lm_head_", "norm_")):
            ours = head[name]
        else:
            continue    # small constants of the ops (axes, shapes), named by position in each program
        assert ours.dtype == value.dtype and np.array_equal(ours, value), name
        compared += 1
    assert compared > 7 * layers


def test_an_export_of_the_single_llm_package_layout_is_refused(llm_exports, tmp_path):
    from mcq.validate.coreml.runtime import read_sidecar

    out = tmp_path / "old"
    shutil.copytree(llm_exports("fp16"), out)
    sidecar = json.loads((out / api.SIDECAR).read_text())
    (out / api.SIDECAR).write_text(json.dumps({**sidecar, "format": "mcq-coreml-1"}))
    with pytest.raises(McqError, match="earlier layout .*export it again"):
        read_sidecar(out)


def test_llm_int4_package_is_its_torch_program(llm_exports, llm_reference, weights):
    """The int4 packages compute what the torch decoder computes with the packages' own dequantized weights."""
    from mcq.models.minicpmv.programs import DecoderHead, StatefulDecoder
    from mcq.models.traceable import as_linear_ops

    embeds, expected = llm_reference
    interpreter = InterpretedLlm(llm_exports("int4-block32"))
    decompressed = interpreter.weights()
    decoder = as_linear_ops(StatefulDecoder(weights, 4096, range(weights.config.num_hidden_layers))).eval()
    head = as_linear_ops(DecoderHead(weights)).eval()
    replaced = 0
    for module in (decoder, head):
        for name, parameter in module.state_dict().items():
            key = name.replace(".", "_") + "_to_fp16"
            found = [value for stored, value in decompressed.items() if stored.startswith(key) and stored != key
                     and value.shape == tuple(parameter.shape)]
            if found and name.endswith("weight") and parameter.dim() == 2:
                original = parameter.numpy()
                stored = found[0].astype(np.float32)
                # symmetric int4 per block of 32: at most half a step (max |w| of the block / 7), plus fp16 rounding
                peak = np.abs(original.reshape(original.shape[0], -1, 32)).max(-1, keepdims=True)
                bound = np.repeat(peak / 7 * 0.5, 32, axis=-1).reshape(original.shape) * 1.01 + 1e-6
                assert (np.abs(stored - original) <= bound).all(), name
                parameter.copy_(torch.from_numpy(stored))
                replaced += 1
    assert replaced == 7 * weights.config.num_hidden_layers + 1
    got = _run_calls(interpreter, embeds, weights.config)
    with torch.no_grad():
        wrapped = np.concatenate([head(decoder(*(torch.from_numpy(np.asarray(v, np.float32)) for v in
                                                 _llm_feeds(embeds, past, length, weights.config).values()))).numpy()
                                  for past, length in CALLS], axis=1)
    assert cosine(got, wrapped) > 0.9999
    assert cosine(got, expected) > 0.95     # int4 rounding of random tiny weights, against the float model


# An LLM wide enough that the program description (~33 KB of op records per decoder layer, whatever the width)
# weighs what it does at real sizes: ~0.5 % of a 1024-wide layer's weights, 0.03 % of Qwen3-8B's, 7 % of tiny:4.5's.
WIDE_LLM = {"hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16, "num_key_value_heads": 4}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """tiny:4.5 with a 1024-wide, one-layer LLM (make-tiny has no width option between tiny and real widths, and a
    real-width LLM layer takes a minute to convert)."""
    from mcq.models import tiny
    from mcq.models.minicpmv import tiny as resampler_tiny

    real_config = resampler_tiny.tiny_config
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resampler_tiny, "tiny_config", lambda spec, *args: {**real_config(spec, *args), **WIDE_LLM})
        return tiny.make_tiny(tmp_path_factory.mktemp("wide") / "model", tiny.TinySpec(version="4.5", llm_layers=1))


def test_llm_int4_package_is_within_5_percent_of_the_physical_minimum(wide_model, tmp_path):
    """The whole int4 package (program, weights, manifest) ≤ 1.05 x (4 bits per Linear weight + an fp16 scale per
    32, norms at fp16), the minimum counted here from the checkpoint, not from the package."""
    from mcq.export.weights_source import ExportWeights

    source = ExportWeights(wide_model)
    try:
        assert source.config.hidden_size == 1024
        linear = other = 0
        for name in source.names():
            if not name.startswith("llm.") or name == "llm.model.embed_tokens.weight":
                continue
            count = source.tensor(name).numel()
            if name.endswith("_proj.weight") or name == "llm.lm_head.weight":
                linear += count
            else:
                other += count
    finally:
        source.close()
    minimum = linear * 4 // 8 + linear // 32 * 2 + other * 2
    result = api.export_coreml(wide_model, tmp_path / "out", vision="fp16", llm="int4-block32", progress=False)
    total, weights, physical = (sum(getattr(p, key) for p in result.llm)
                                for key in ("bytes", "weights_bytes", "physical_min_bytes"))
    assert total == sum(f.stat().st_size for p in result.llm for f in Path(p.path).rglob("*") if f.is_file())
    assert minimum <= weights <= total <= 1.05 * minimum
    # The packages' own count (from the programs' declared shapes) is the same minimum, up to what the checkpoint
    # and the programs hold differently: coremltools' zero biases, norms of ones folded away.
    assert abs(physical - minimum) <= 0.01 * minimum
    assert "x the physical minimum" in result.summary()


def test_physical_minimum_reads_no_weight(llm_exports, monkeypatch):
    """Sizing an 8B package must not decompress (or even read) its weights: every read fails here."""
    from mcq.export.coreml import program as stored_program

    program = load_program(llm_exports("int4-block32") / api.decoder_package(0))

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(stored_program._BlobFiles, "read", no_reads)
    minimum = api.physical_minimum(program, "int4-block32")
    blockwise = [op for op in program.operations if op.type == "constexpr_blockwise_shift_scale"]
    weights = sum(op.inputs["data"][0][1].size for op in blockwise)
    assert minimum >= weights * 4.5 / 8
    assert api.physical_minimum(program, "int8") is None


def test_embed_package_gathers_the_table(llm_exports, weights):
    table = weights.tensor("llm.model.embed_tokens.weight").float().numpy()
    ids = np.array([[0, 5, 17, table.shape[0] - 1]], dtype=np.int32)
    for llm, tolerance in (("fp16", 1e-3), ("int4-block32", None)):
        program = load_program(llm_exports(llm) / api.EMBED_PACKAGE)
        got = Interpreter(program).predict({"input_ids": ids})["inputs_embeds"].astype(np.float32)[0]
        expected = table[ids[0]]
        if tolerance is None:     # int4 blocks of 32 along the hidden axis: half a step of each block's max
            peak = np.abs(expected.reshape(len(expected), -1, 32)).max(-1, keepdims=True)
            tolerance = np.repeat(peak / 14, 32, axis=-1).reshape(expected.shape) * 1.01 + 1e-6
            assert "constexpr_blockwise_shift_scale" in program.op_types()
        assert (np.abs(got - expected) <= tolerance).all()


@pytest.mark.parametrize("llm", ["fp16", "int4-block32", "int8", "palettize4"])
def test_embed_lookups_read_only_their_rows(llm_exports, llm):
    """The interpreter makes only the looked-up rows of an embedding table (`RowsOnDemand`: the stored levels read
    by row, their blocks' scales): equal bytes to decompressing the whole table and gathering from it, with
    repeated and negative ids; the row reads themselves equal the whole reads' rows for every stored type here."""
    program = load_program(llm_exports(llm) / api.EMBED_PACKAGE)
    ids = {"input_ids": np.array([[0, 5, 17, 5, -1, 3]], dtype=np.int32)}
    by_rows = Interpreter(program)
    whole = Interpreter(program)
    whole._by_rows = set()
    expected = whole.predict(ids)["inputs_embeds"]
    assert by_rows._by_rows or llm == "palettize4"   # palettized tables are decompressed whole
    assert np.array_equal(by_rows.predict(ids)["inputs_embeds"], expected)
    rows = np.array([3, 0, 3, 7])
    for _, tensor in program.stored():
        if tensor.shape:
            assert np.array_equal(tensor.read_rows(rows % tensor.shape[0]), tensor.read()[rows % tensor.shape[0]])


@pytest.mark.parametrize("llm", ["fp16", "int4-block32", "int8", "palettize4"])
def test_large_head_products_read_their_weight_by_rows(llm_exports, llm, monkeypatch):
    """A linear whose weight is too large to widen whole (the real vocabulary's LM head; lowered here) makes it a
    block of rows at a time from the stored levels (`RowsOnDemand`), never the whole fp16 weight: equal bytes to
    dequantizing it whole and multiplying it by the same blocks."""
    from mcq.validate.coreml import interpreter

    monkeypatch.setattr(interpreter, "WHOLE_PRODUCT_ELEMENTS", 1 << 10)
    monkeypatch.setattr(interpreter, "CHUNK_ELEMENTS", 1 << 12)
    program = load_program(llm_exports(llm) / api.HEAD_PACKAGE)
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal([3 if dim is None else dim for dim in shape]).astype(np.float16)
             for name, (_, shape) in program.inputs.items()}
    by_rows, whole = Interpreter(program), Interpreter(program)
    whole._by_rows = set()
    assert by_rows._by_rows or llm == "palettize4"   # a palettized weight is decompressed whole
    expected = whole.predict(feeds)
    assert all(np.array_equal(by_rows.predict(feeds)[name], value) for name, value in expected.items())


@pytest.fixture(scope="module")
def rtn_export(tmp_path_factory):
    from mcq.quantize.api import quantize

    root = tmp_path_factory.mktemp("coreml-from")
    variant = quantize(MODEL, root / "w4", method="rtn", progress=False).out
    out = root / "coreml"
    result = api.export_coreml(MODEL, out, target="iOS18", vision="fp16", llm="int4-block32", from_dir=variant,
                               progress=False)
    return variant, out, result


def test_from_dir_carries_the_stored_int4_levels(rtn_export):
    """Every Linear the RTN output stores as int4 is in the package exactly: (levels - zero) * scale."""
    from mcq.export.coreml.convert import linear_sources
    from mcq.export.weights_source import ExportWeights
    from mcq.models.minicpmv.programs import StatefulDecoder
    from mcq.models.traceable import as_linear_ops

    variant, out, result = rtn_export
    assert set(result.llm_fallbacks) == {"llm.lm_head"}      # the recipe leaves the LM head unquantized
    program = load_program(out / api.decoder_package(0))
    stored_ops = [op for op in program.operations if op.outputs and op.outputs[0][0].endswith("_stored_int4")]
    assert not [op for op in load_program(out / api.HEAD_PACKAGE).operations
                if op.outputs and op.outputs[0][0].endswith("_stored_int4")]
    source = ExportWeights(MODEL, variant)
    try:
        module = as_linear_ops(StatefulDecoder(source, 4096, range(source.config.num_hidden_layers))).eval()
        assert len(stored_ops) == len(linear_sources(module))
        decompressed = Interpreter(program).weights()
        for prefix, checkpoint_module in linear_sources(module).items():
            got = decompressed[f"{prefix}_stored_int4"].astype(np.float32)
            expected = source.tensor(f"{checkpoint_module}.weight").numpy()
            np.testing.assert_allclose(got, expected, rtol=2**-10, atol=1e-7)
    finally:
        source.close()
    manifest = json.loads((out / "mcq-manifest.json").read_text())
    assert manifest["settings"]["from"] == "w4" and manifest["settings"]["llm_fallbacks"] == result.llm_fallbacks
    assert [p["compression"] for p in json.loads(json.dumps(result.to_dict()))["llm"]] == ["int4-block32"] * 2
    assert "requantized: llm.lm_head" in result.summary() and api.decoder_package(0) in result.summary()
    assert manifest["settings"]["llm_requantized"] is None and "every LLM Linear" not in result.summary()


@pytest.mark.parametrize(("llm", "expected"), [("int8", "rounds the --from output's dequantized weights again"),
                                               ("palettize4", "rounds"), ("fp16", "at fp16, not its int4 levels"),
                                               ("int4-block32", None), ("none", None)])
def test_from_dir_with_another_llm_compression_is_recorded(llm, expected):
    """Only int4-block32 carries --from's levels; any other --llm is said to re-round (or widen) them."""
    note = api._requantized("w4", llm)
    assert (note is None) if expected is None else expected in note
    assert api._requantized(None, llm) is None


def test_from_dir_note_reaches_summary_and_manifest(rtn_export, tmp_path):
    variant, _, _ = rtn_export
    out = tmp_path / "int8"
    result = api.export_coreml(MODEL, out, vision="fp16", llm="int8", from_dir=variant, progress=False)
    manifest = json.loads((out / "mcq-manifest.json").read_text())
    assert manifest["settings"]["llm_requantized"] == result.llm_requantized
    assert "requantized: every LLM Linear (--llm int8 rounds" in result.summary()
    # The sidecar carries the --from output's config (with its quantization_config): still the same model.
    from mcq.models.loading import model_spec
    from mcq.validate.runners.base import config_identity
    from mcq.validate.runners.coreml_runner import CoremlRunner

    assert CoremlRunner.describe(out) == config_identity(model_spec(MODEL)[1])


def test_conversion_failure_names_the_op():
    from mcq.export.coreml.convert import _convert, import_coremltools

    class Bucketing(torch.nn.Module):
        def forward(self, x):
            return torch.bucketize(x, torch.tensor([0.25, 0.5, 0.75]), right=True).to(torch.float32)

    ct = import_coremltools()
    with pytest.raises(McqError, match="Bucketing failed: .*'bucketize'"):
        _convert(ct, Bucketing(), (torch.rand(4),), [ct.TensorType("x", shape=(4,), dtype=np.float32)],
                 [ct.TensorType("y")], "iOS17")


def _copied_model(tmp_path, drop: str) -> Path:
    """tiny:4.5's files in tmp_path, the file `drop` left out."""
    from mcq.models.loading import model_spec

    model = tmp_path / "model"
    shutil.copytree(model_spec(MODEL)[0], model, ignore=shutil.ignore_patterns(drop))
    return model


def _no_conversion(monkeypatch):
    from mcq.export.coreml import convert

    def converted(*args, **kwargs):
        raise AssertionError("conversion started")

    monkeypatch.setattr(convert, "_convert", converted)


def test_missing_preprocessor_config_fails_before_converting(tmp_path, monkeypatch):
    model = _copied_model(tmp_path, "preprocessor_config.json")
    _no_conversion(monkeypatch)
    with pytest.raises(McqError, match="preprocessor_config.json is missing"):
        api.export_coreml(model, tmp_path / "out", llm="none", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scaling", [{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                                     {"rope_type": "linear", "factor": 2.0}])
def test_scaled_rope_is_refused_before_converting(tmp_path, monkeypatch, scaling):
    """host.rotary_inputs computes plain RoPE; a long-context rope_scaling edit would get wrong angles. (Set on the
    loaded config: mcq's config loader cannot read a config.json with rope_scaling under transformers 5 yet.)"""
    from mcq.export import weights_source

    class Scaled(weights_source.ExportWeights):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.config.rope_parameters = dict(scaling)

    monkeypatch.setattr(weights_source, "ExportWeights", Scaled)
    _no_conversion(monkeypatch)
    with pytest.raises(McqError, match=f"rope_scaling '{scaling['rope_type']}'"):
        api.export_coreml(MODEL, tmp_path / "out", llm="int4-block32", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("damage", "file"), [("truncate weights", "weight.bin"), ("truncate program", "model.mlmodel"),
                                              ("garbage program", "model.mlmodel")])
def test_damaged_package_is_one_line_error_naming_the_file(llm_exports, tmp_path, damage, file):
    package = tmp_path / api.decoder_package(0)
    shutil.copytree(llm_exports("int4-block32") / api.decoder_package(0), package)
    target = next(package.rglob(file))
    data = target.read_bytes()
    target.write_bytes(b"\x07not a protobuf" * 64 if damage == "garbage program" else data[: len(data) * 2 // 3])
    with pytest.raises(McqError, match=f"{file}") as error:
        load_program(package)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("version", ["2.6", "4.0"])
def test_other_versions_packages_agree_with_torch(tmp_path, version):
    """2.6: Qwen2 decoder (q/k/v biases, no q/k norms) and the 2D resampler; 4.0: the Llama decoder of MiniCPM4,
    whose text embeddings (never the image features) are multiplied by `scale_emb` (12 in tiny 4.0) in the
    embeddings package. The same programs as 4.5's, built from the version's facts."""
    from transformers import AutoModel

    import mcq  # noqa: F401
    from mcq.export.coreml.convert import rope_theta
    from mcq.export.coreml.host import causal_mask, rotary_inputs
    from mcq.validate.coreml.runtime import CoremlMiniCPMV
    from mcq.models.loading import model_spec

    path, config, _ = model_spec(f"tiny:{version}")
    out = tmp_path / "out"
    api.export_coreml(f"tiny:{version}", out, vision="fp16", llm="fp16", progress=False)
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    pixels = torch.randn(3, 14, 14 * 10 * 12, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        expected_features = model.get_vision_embedding([pixels], torch.tensor([[10, 12]])).numpy()
        embeds = model.llm.get_input_embeddings()(ids) * model.embedding_scale
        expected_logits = model.llm(inputs_embeds=embeds).logits.numpy()
    inputs = vision_inputs(pixels, 10, 12, patch=14, patches_per_side=config.vision_config.image_size // 14,
                           hidden=config.hidden_size, max_patches=MAX_PATCHES)
    assert not (out / api.RESAMPLER_PACKAGE).exists()    # no 3D resampler: the one-slice vision package
    assert cosine(_interpreted(out, inputs), expected_features) > 0.999
    with pytest.raises(McqError, match="need a group resampler package"):
        CoremlMiniCPMV(out, native=False).encode_slices([pixels] * 2, [[10, 12]] * 2, [[0, 1]])
    packaged_embeds = Interpreter(load_program(out / api.EMBED_PACKAGE)).predict(
        {"input_ids": ids.numpy().astype(np.int32)})["inputs_embeds"].astype(np.float32)
    np.testing.assert_allclose(packaged_embeds, embeds.numpy(), rtol=1e-2, atol=1e-2 * np.abs(embeds.numpy()).max())
    interpreter = InterpretedLlm(out)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    logits = []
    for past, length in ((0, 3), (3, 2)):
        cos, sin = rotary_inputs(np.arange(past, past + length), head_dim, rope_theta(config))
        logits.append(interpreter.predict({"inputs_embeds": embeds[:, past : past + length].numpy(),
                                           "position_cos": cos, "position_sin": sin,
                                           "causal_mask": causal_mask(past, length)})["logits"])
    got = np.concatenate(logits, axis=1).astype(np.float32)
    assert cosine(got, expected_logits) > 0.9999
    assert (got.argmax(-1) == expected_logits.argmax(-1)).all()
