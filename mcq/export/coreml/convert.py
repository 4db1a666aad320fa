"""Trace the resampler family's torch programs (`mcq.models.minicpmv.programs`: the ones `mcq export --format onnx`
traces too), convert them with coremltools and compress their weights.

Conversion goes through `torch.jit.trace` (coremltools' mature frontend; its `torch.export` path is beta and on
torch >= 2.9 needs extra decomposition). Every failure comes out as one McqError naming the op when coremltools
names one, and nothing is written here: the caller saves into a staged output.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from mcq.errors import McqError
from mcq.models.minicpmv.video import MAX_PACKING
from mcq.models.traceable import as_linear_ops

TARGETS = ("iOS17", "iOS18")
VISION_COMPRESSIONS = ("fp16", "int8", "palettize4", "palettize6")
# Patches of the largest slice the package takes. The processor keeps a slice's area near 448 x 448 px but rounds
# each side to whole patches, so slices of 1024+ patches are common (a 37 x 28 slice: 1036); 1088 holds every slice
# of an image up to 1:20 aspect. Thinner images' slices are refused by `host.vision_inputs`.
MAX_PATCHES = 1088
# Frame counts the group resampler package takes: 1 (an image slice) to the largest temporal group of a video.
GROUP_FRAMES = tuple(range(1, MAX_PACKING + 1))
# Weights smaller than this stay fp16 (norms, biases, tiny tables): compressing them saves nothing measurable.
WEIGHT_THRESHOLD = 2048
PALETTE_GROUP = 16          # output channels sharing one palette (iOS18 per_grouped_channel)
# coremltools' metadata key whose value is the conversion date: dropped so the same inputs give the same bytes.
_DATE_KEY = "com.github.apple.coremltools.conversion_date"


def import_coremltools():
    """coremltools, imported once with its Linux noise (no libcoremlpython, untested torch version) silenced."""
    try:
        with _quiet():
            import coremltools
    except ImportError:
        raise McqError("Core ML export needs coremltools: pip install 'coremltools>=9.0,<10'") from None
    return coremltools


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("coremltools", "root")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def deployment_target(ct, target: str):
    if target not in TARGETS:
        raise McqError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    return getattr(ct.target, target)


def check_vision_compression(compression: str, target: str) -> None:
    if compression not in VISION_COMPRESSIONS:
        raise McqError(f"--vision {compression!r}: choose one of {', '.join(VISION_COMPRESSIONS)}")
    if target not in TARGETS:
        raise McqError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")


# Rows of a float32 constant the fp16 range check reads at a time (see _pass_pipeline).
_OVERFLOW_CHECK_ROWS = 1024


def _fits_fp16(value: np.ndarray) -> bool:
    """coremltools' fp16 overflow rule (every |x| below 1e38 is at most 65504; larger ones are infinities that may
    become fp16 inf), read a block of rows at a time."""
    flat = np.asarray(value).reshape(-1, value.shape[-1]) if np.ndim(value) > 1 else np.reshape(value, (1, -1))
    for start in range(0, flat.shape[0], _OVERFLOW_CHECK_ROWS):
        magnitude = np.abs(flat[start:start + _OVERFLOW_CHECK_ROWS])
        if np.max(magnitude, where=magnitude < 1e38, initial=0.0) > 65504:
            return False
    return True


def _pass_pipeline(ct):
    """coremltools' default pipeline with its fp16 cast pass replaced by one that checks the fp16 range of float32
    constants a block of rows at a time. The stock check takes `np.where` of the whole constant (three int64 index
    arrays for a 2-D weight, 24 bytes per element), about 8x the float32 weight at once: 20 GB for the 151,748-row
    LM head of 4.5; and its underflow check copies each constant whole. Same decisions, same program."""
    pipeline = ct.PassPipeline()
    pipeline.passes = [_fp16_cast_by_rows() if name == "common::add_fp16_cast" else name for name in pipeline.passes]
    return pipeline


@functools.cache
def _fp16_cast_by_rows() -> str:
    """Registers the row-block fp16 cast pass with coremltools (once) and returns its name."""
    from coremltools.converters.mil.mil.passes.defs.quantization import add_fp16_cast
    from coremltools.converters.mil.mil.passes.pass_registry import register_pass

    class add_fp16_cast_by_rows(add_fp16_cast):  # noqa: N801 - coremltools names passes in snake case
        @staticmethod
        def fp16_overflow(op) -> bool:
            for inputs in op.inputs.values():
                for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                    if (var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32")
                            and not _fits_fp16(var.op.val.val)):
                        return True
            return False

        def _check_underflow_to_zero(self, new_var, var):
            # The stock check reads the constant's length from a flattened copy of it (2.3 GiB for the LM head at
            # the real vocabulary), before looking at constants of under 400 values only: same decision, no copy.
            if new_var.val is not None and np.size(var.val) < 400:
                super()._check_underflow_to_zero(new_var, var)

    register_pass(namespace="mcq")(add_fp16_cast_by_rows)
    return "mcq::add_fp16_cast_by_rows"


def _convert(ct, module: torch.nn.Module, example: tuple, inputs: list, outputs: list, target: str, states=None):
    module = module.eval()
    try:
        with torch.no_grad(), _quiet():
            traced = torch.jit.trace(module, example, check_trace=False)
            converted = ct.convert(traced, inputs=inputs, outputs=outputs, states=states or None,
                                   convert_to="mlprogram", minimum_deployment_target=deployment_target(ct, target),
                                   compute_precision=ct.precision.FLOAT16, skip_model_load=True,
                                   pass_pipeline=_pass_pipeline(ct))
    except McqError:
        raise
    except Exception as err:  # noqa: BLE001 - every converter failure becomes one line naming the op
        raise McqError(f"Core ML conversion of {type(module).__name__} failed: {_describe(err)}") from None
    metadata = converted._spec.description.metadata.userDefined
    if _DATE_KEY in metadata:
        del metadata[_DATE_KEY]
    return converted


def _describe(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    match = re.search(r"op[s]? (?:named |type |')?['\"]?([A-Za-z_][\w.:]*)", text)
    prefix = f"op {match.group(1)!r}: " if match and "op" not in text[:3].lower() else ""
    return prefix + text[:300]


def convert_vision(weights, target: str, compression: str, max_patches: int = MAX_PATCHES):
    """The vision package as an in-memory MLModel (saved by the caller)."""
    from mcq.models.minicpmv.programs import VisionSlice

    check_vision_compression(compression, target)
    ct = import_coremltools()
    config = weights.config
    vision = config.vision_config
    patch, hidden = vision.patch_size, config.hidden_size
    module = as_linear_ops(VisionSlice(weights, max_patches))
    example = (torch.zeros(1, 3, patch, patch * max_patches), torch.zeros(1, max_patches, dtype=torch.int32),
               torch.ones(1, max_patches), torch.zeros(1, max_patches, hidden))
    inputs = [ct.TensorType("pixel_values", shape=example[0].shape, dtype=np.float16),
              ct.TensorType("position_ids", shape=example[1].shape, dtype=np.int32),
              ct.TensorType("patch_mask", shape=example[2].shape, dtype=np.float16),
              ct.TensorType("key_positions", shape=example[3].shape, dtype=np.float16)]
    model = _convert(ct, module, example, inputs, [ct.TensorType("image_features", dtype=np.float16)], target)
    model.short_description = (f"MiniCPM-V {weights.spec.version} vision tower + resampler: one slice of up to "
                               f"{max_patches} patches → [1, {config.query_num}, {hidden}]")
    return compress_vision(ct, model, compression, target)


def convert_vision_tower(weights, target: str, compression: str, max_patches: int = MAX_PATCHES):
    """The vision tower alone (one slice or frame → `vision_features`), for releases whose resampler packs video
    frames (`GroupResampler`)."""
    from mcq.models.minicpmv.programs import VisionTower

    check_vision_compression(compression, target)
    ct = import_coremltools()
    vision = weights.config.vision_config
    patch = vision.patch_size
    module = as_linear_ops(VisionTower(weights, max_patches))
    example = (torch.zeros(1, 3, patch, patch * max_patches), torch.zeros(1, max_patches, dtype=torch.int32),
               torch.ones(1, max_patches))
    inputs = [ct.TensorType("pixel_values", shape=example[0].shape, dtype=np.float16),
              ct.TensorType("position_ids", shape=example[1].shape, dtype=np.int32),
              ct.TensorType("patch_mask", shape=example[2].shape, dtype=np.float16)]
    model = _convert(ct, module, example, inputs, [ct.TensorType("vision_features", dtype=np.float16)], target)
    model.short_description = (f"MiniCPM-V {weights.spec.version} vision tower: one slice or video frame of up to "
                               f"{max_patches} patches → [1, {max_patches}, {vision.hidden_size}]")
    return compress_vision(ct, model, compression, target)


def convert_group_resampler(weights, target: str, compression: str, max_patches: int = MAX_PATCHES):
    """The resampler over the frames of one temporal group (or one image slice) → `image_features`."""
    from mcq.models.minicpmv.programs import GroupResampler

    check_vision_compression(compression, target)
    ct = import_coremltools()
    config = weights.config
    width, hidden = config.vision_config.hidden_size, config.hidden_size
    frames = GROUP_FRAMES
    module = as_linear_ops(GroupResampler(weights, max_patches))
    example = (torch.zeros(2, max_patches, width), torch.zeros(2, max_patches, hidden), torch.ones(2, max_patches))
    # Enumerated frame counts on iOS18: Core ML compiles each shape ahead, and the Neural Engine runs enumerated
    # shapes, not open ranges. Below iOS18 Core ML takes enumerated shapes on one input only, so iOS17 gets a
    # bounded range of the same counts on the three inputs.
    if target == "iOS18":
        def shape(*rest: int):
            return ct.EnumeratedShapes(shapes=[(count, *rest) for count in frames], default=(1, *rest))
    else:
        count = ct.RangeDim(lower_bound=frames[0], upper_bound=frames[-1], default=1, symbol="frames")

        def shape(*rest: int):
            return (count, *rest)
    inputs = [ct.TensorType("vision_features", shape=shape(max_patches, width), dtype=np.float16),
              ct.TensorType("key_positions", shape=shape(max_patches, hidden), dtype=np.float16),
              ct.TensorType("patch_mask", shape=shape(max_patches), dtype=np.float16)]
    model = _convert(ct, module, example, inputs, [ct.TensorType("image_features", dtype=np.float16)], target)
    model.short_description = (f"MiniCPM-V {weights.spec.version} resampler: the tower outputs of 1 to {frames[-1]} "
                               f"frames of a temporal group (1: an image slice) → [1, {config.query_num}, {hidden}]")
    return compress_vision(ct, model, compression, target)


def compress_vision(ct, model, compression: str, target: str):
    """ANE-friendly weight compression: per-channel int8 or palettization (per-block ints run badly there)."""
    if compression == "fp16":
        return model
    from coremltools.optimize import coreml as cto

    if compression == "int8":
        op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                                weight_threshold=WEIGHT_THRESHOLD)
        config = cto.OptimizationConfig(global_config=op_config, op_type_configs={"gather": None})
        with _quiet():
            return cto.linear_quantize_weights(model, config)
    bits = int(compression.removeprefix("palettize"))
    grouped = target == "iOS18"   # per_grouped_channel palettes need iOS18; iOS17 gets one palette per tensor
    op_config = cto.OpPalettizerConfig(mode="custom", lut_function=lambda w: kmeans_palette(w, bits),
                                       granularity="per_grouped_channel" if grouped else "per_tensor",
                                       group_size=PALETTE_GROUP, weight_threshold=WEIGHT_THRESHOLD)
    config = cto.OptimizationConfig(global_config=op_config, op_type_configs={"gather": None})
    with _quiet():
        return cto.palettize_weights(model, config)


def kmeans_palette(weight: np.ndarray, bits: int, iterations: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """A 2^bits-entry palette of `weight` by 1-D k-means (Lloyd), and each element's index into it.

    Ours rather than coremltools' kmeans mode: that one needs scikit-learn and its random init makes the bytes
    differ run to run; this one starts from quantiles and is deterministic. 1-D k-means is solved on sorted values:
    each cluster is a contiguous run, found by bisecting the midpoints between centroids."""
    values = np.asarray(weight, dtype=np.float32).reshape(-1)
    entries = 1 << bits
    ordered = np.sort(values)
    centroids = np.quantile(ordered, (np.arange(entries) + 0.5) / entries).astype(np.float32)
    for _ in range(iterations):
        centroids = np.unique(centroids)
        edges = np.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2)
        sums = np.add.reduceat(ordered, np.r_[0, edges]) if len(ordered) else np.zeros(0)
        counts = np.diff(np.r_[0, edges, len(ordered)])
        keep = counts > 0
        centroids = (sums[keep[: len(sums)]] / counts[keep]).astype(np.float32)
    # Pad to exactly 2^bits entries (a tensor with fewer distinct values than entries repeats its last one).
    palette = np.sort(np.unique(centroids))
    palette = np.concatenate([palette, np.full(entries - len(palette), palette[-1], dtype=np.float32)])
    boundaries = (palette[1:] + palette[:-1]) / 2
    indices = np.searchsorted(boundaries, values).astype(np.uint8)
    return palette.astype(weight.dtype), indices


def save_package(model, path) -> None:
    """Save an MLModel as `.mlpackage` with the same bytes for the same model.

    coremltools writes the protobuf with maps in hash order and names the package items with random UUIDs; both
    are rewritten: the spec serialized deterministically, the item ids derived from the item paths (Core ML only
    needs them unique within the package)."""
    import json
    import uuid
    from pathlib import Path

    from coremltools.proto import Model_pb2

    path = Path(path)
    with _quiet():
        model.save(str(path))
    spec_file = path / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))
    manifest_file = path / "Manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, f"mcq-coreml/{entry['path']}"))
               for old, entry in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[old]: entry for old, entry in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_file.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n", encoding="utf-8")


LLM_CONTEXT = 4096          # cached positions the state holds (the Swift app starts over, or slides, past it)
LLM_MAX_CHUNK = 512         # tokens one call may add (prefill in chunks of up to this many)
INT4_BLOCK = 32
# Decoder layers are converted in packages of at most this many bytes of fp16 weights (at least one layer each):
# tracing and converting a package holds its weights several times over (float32 for the trace, fp16 constants,
# the compressed copy), so the packages bound the export's memory whatever the depth. Real 4.5 widths: 2 layers
# (772 MB at fp16) per package, 18 packages for 36 layers; every tiny model fits in one.
LLM_PACKAGE_BYTES = 1 << 30


def decoder_chunks(weights) -> list[range]:
    """The LLM's decoder layers split into consecutive ranges, one per package."""
    config = weights.config
    layers = config.num_hidden_layers
    prefix = "llm.model.layers.0."
    layer_bytes = 2 * sum(weights.tensor(name).numel() for name in weights.names() if name.startswith(prefix))
    step = max(1, LLM_PACKAGE_BYTES // max(layer_bytes, 1))
    return [range(start, min(start + step, layers)) for start in range(0, layers, step)]


def rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def check_rope(config) -> None:
    """The LLM package's host computes plain RoPE from `rope_theta` (`host.rotary_inputs`), which is what MiniCPM-V
    2.6, 4.0 and 4.5 ship (no rope_scaling). A scaled RoPE (YaRN, linear, dynamic: a long-context edit of config.json)
    changes the frequencies at every position, so it is refused rather than exported with the wrong angles."""
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
    if kind not in (None, "default"):
        raise McqError(f"config.json rope_scaling {kind!r}: the Core ML LLM package computes plain RoPE (rope_theta "
                       "only); remove rope_scaling (MiniCPM-V 2.6 / 4.5 ship without it) or pass --llm none")


def _decoder_inputs(ct, shape, max_chunk: int, context: int, first: str):
    length = ct.RangeDim(lower_bound=1, upper_bound=max_chunk, default=1, symbol="length")
    cached = ct.RangeDim(lower_bound=1, upper_bound=context, default=1, symbol="end")
    return [ct.TensorType(first, shape=(1, length, shape.hidden), dtype=np.float16),
            ct.TensorType("position_cos", shape=(1, 1, length, shape.head_dim), dtype=np.float16),
            ct.TensorType("position_sin", shape=(1, 1, length, shape.head_dim), dtype=np.float16),
            ct.TensorType("causal_mask", shape=(1, 1, length, cached), dtype=np.float16)]


def convert_llm(weights, target: str, compression: str, layers: range, context: int = LLM_CONTEXT,
                max_chunk: int = LLM_MAX_CHUNK):
    """Decoder layers `layers` with their stateful KV cache as an in-memory MLModel (iOS18: states), and the Linears
    whose `--from` levels could not be carried into int4 blocks (module → reason; empty without `--from`)."""
    from mcq.models.minicpmv.programs import StatefulDecoder

    ct = import_coremltools()
    module = as_linear_ops(StatefulDecoder(weights, context, layers))
    shape = module.shape
    chunk, seen = 2, 5       # example sizes ≥ 2, so tracing specializes nothing to 1
    example = (torch.zeros(1, chunk, shape.hidden), torch.ones(1, 1, chunk, shape.head_dim),
               torch.zeros(1, 1, chunk, shape.head_dim), torch.zeros(1, 1, chunk, seen))
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=shape.cache_shape, dtype=np.float16), name=name)
              for name in ("key_cache", "value_cache")]
    sources = linear_sources(module)
    model = _convert(ct, module, example, _decoder_inputs(ct, shape, max_chunk, context, "hidden_states"),
                     [ct.TensorType("output_hidden_states", dtype=np.float16)], target, states)
    del module   # its float32 weights, not needed to compress (1.5 GiB for two real-width 4.5 layers)
    model.short_description = (f"MiniCPM-V {weights.spec.version} LLM decoder layers {layers.start}-{layers.stop - 1} "
                               f"with their stateful KV cache of {context} positions; up to {max_chunk} new tokens "
                               "per call")
    return _with_stored_levels(weights, compress_llm(ct, model, compression), compression, sources)


def convert_head(weights, target: str, compression: str, max_chunk: int = LLM_MAX_CHUNK):
    """The final norm and the LM head (hidden states → logits) as an in-memory MLModel, and its `--from`
    fallbacks."""
    from mcq.models.minicpmv.programs import DecoderHead

    ct = import_coremltools()
    module = as_linear_ops(DecoderHead(weights))
    length = ct.RangeDim(lower_bound=1, upper_bound=max_chunk, default=1, symbol="length")
    hidden = weights.config.hidden_size
    sources = linear_sources(module)
    model = _convert(ct, module, (torch.zeros(1, 2, hidden),),
                     [ct.TensorType("hidden_states", shape=(1, length, hidden), dtype=np.float16)],
                     [ct.TensorType("logits", dtype=np.float16)], target)
    del module   # its float32 weights, not needed to compress (2.3 GiB for the real-vocabulary LM head)
    model.short_description = f"MiniCPM-V {weights.spec.version} LLM final norm and LM head (hidden states → logits)"
    return _with_stored_levels(weights, compress_llm(ct, model, compression), compression, sources)


def linear_sources(module: torch.nn.Module) -> dict[str, str]:
    """Weight name prefix in the converted program (coremltools names consts after the torch parameter path) →
    checkpoint module of that Linear (`mcq_source`, set by `as_linear_ops`)."""
    return {f"{name.replace('.', '_')}_weight": linear.mcq_source for name, linear in module.named_modules()
            if isinstance(linear, torch.nn.Linear) and hasattr(linear, "mcq_source")}


def _with_stored_levels(weights, model, compression: str, sources: dict[str, str]):
    if not weights.quantized_from or compression != "int4-block32":
        return model, {}
    from .stored import replace_with_stored, stored_int4_blocks

    blocks, fallbacks = stored_int4_blocks(weights, sources)
    if blocks:
        model = replace_with_stored(model, blocks, model.get_spec().specificationVersion)
    return model, fallbacks


def compress_llm(ct, model, compression: str):
    """int4 per-block (block 32, the Mac GPU's format), 4-bit palettes or int8 per channel; norms stay fp16."""
    if compression == "none":
        return model
    from coremltools.optimize import coreml as cto

    if compression == "int4-block32":
        op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                                block_size=INT4_BLOCK, weight_threshold=WEIGHT_THRESHOLD)
        with _quiet():
            return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op_config))
    if compression == "int8":
        op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                                weight_threshold=WEIGHT_THRESHOLD)
        with _quiet():
            return cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=op_config))
    op_config = cto.OpPalettizerConfig(mode="custom", lut_function=lambda w: kmeans_palette(w, 4),
                                       granularity="per_grouped_channel", group_size=PALETTE_GROUP,
                                       weight_threshold=WEIGHT_THRESHOLD)
    with _quiet():
        return cto.palettize_weights(model, cto.OptimizationConfig(global_config=op_config))


def convert_embeddings(weights, target: str, compression: str, max_chunk: int = LLM_MAX_CHUNK):
    """The token embedding table as a gather program, compressed like the LLM (a quantized gather)."""
    from mcq.models.minicpmv.programs import EmbedTokens

    ct = import_coremltools()
    length = ct.RangeDim(lower_bound=1, upper_bound=max_chunk, default=1, symbol="length")
    model = _convert(ct, EmbedTokens(weights), (torch.zeros(1, 2, dtype=torch.int32),),
                     [ct.TensorType("input_ids", shape=(1, length), dtype=np.int32)],
                     [ct.TensorType("inputs_embeds", dtype=np.float16)], target)
    model.short_description = f"MiniCPM-V {weights.spec.version} token embeddings (input_ids → inputs_embeds)"
    return compress_llm(ct, model, compression)
