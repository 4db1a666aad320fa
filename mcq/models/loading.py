"""From a model spec (a checkpoint directory or `tiny:VERSION`) to a loaded model and processor, with every
problem with the checkpoint reported as one clear `McqError` before transformers gets to raise something obscure."""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mcq.errors import McqError

from .familyspec import Family
from .minicpmv import MiniCPMV, checkpoint_names
from .minicpmv.configuration import MiniCPMVConfig
from .minicpmv.versions import VersionSpec, version_spec
from .tiny import TINY_PREFIX, resolve_tiny

SUPPORTED_MODEL_TYPES = {"minicpmv": "MiniCPM-V 2.6, 4.0, 4.5", "minicpmv4_6": "MiniCPM-V 4.6"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str) -> None:
    """A device string that torch parses and that this machine has, or a one-line McqError."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise McqError(f"unknown device {device!r}, which is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise McqError(f"device {device!r} is not available on this machine")


def resolve_model_path(model: str | Path) -> Path:
    text = str(model)
    if text.startswith(TINY_PREFIX):
        return resolve_tiny(text)
    path = Path(text).expanduser()
    if not path.exists():
        raise McqError(f"model path {path} does not exist")
    if not path.is_dir():
        raise McqError(f"model path {path} is not a directory (expected a checkpoint folder with config.json)")
    return path


def read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise McqError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise McqError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise McqError(f"{config_path} must hold a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        listed = "; ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise McqError(f"{config_path}: model_type {model_type!r} is not supported; supported: {listed}")
    from .family import family_for

    family_for(model_type).describe(config)   # a McqError for a release the family lacks
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint, each checked to exist and to hold all the bytes its header names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise McqError(f"{index} is not a valid safetensors index: {err}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise McqError(f"{path} has only pickle weights (.bin/.pt); mcq loads safetensors only (pickle can run code)")
    else:
        raise McqError(f"{path} has no weights: expected model.safetensors or model.safetensors.index.json")
    return files


def check_safetensors(file: Path) -> dict[str, Any]:
    """The tensor table of one shard (name → dtype, shape, offsets), after checking the file holds all of it."""
    if not file.is_file():
        raise McqError(f"weight shard {file} is missing (named in the index)")
    size = file.stat().st_size
    with open(file, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise McqError(f"{file} is truncated: no safetensors header")
        header_len = struct.unpack("<Q", raw)[0]
        if header_len > size - 8:
            raise McqError(f"{file} is corrupt or truncated: header length {header_len} exceeds the file")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise McqError(f"{file} is corrupt: its safetensors header is not JSON") from None
    header.pop("__metadata__", None)
    data_end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise McqError(f"{file} is truncated: the header names {data_end} bytes of tensors, the file holds "
                       f"{size - 8 - header_len}")
    return header


def safetensors_component_bytes(path: Path) -> dict[str, int]:
    """Tensor bytes per component of its family (vision / resampler / llm, plus `other` when some name has none of
    their prefixes) of the checkpoint in `path`, from the safetensors headers only (no tensor data is read)."""
    from .family import component_or_other, family_for

    sizes = dict.fromkeys(family_for(read_config(Path(path))["model_type"]).components, 0)
    for file in weight_files(Path(path)):
        for name, entry in check_safetensors(file).items():
            begin, end = entry["data_offsets"]
            component = component_or_other(name)
            sizes[component] = sizes.get(component, 0) + end - begin
    return sizes


def stored_tensors(path: Path) -> dict[str, dict[str, Any]]:
    """Every tensor the checkpoint stores, from the shard headers (no data is read)."""
    return {name: entry for file in weight_files(path) for name, entry in check_safetensors(file).items()}


def check_finite(tensor: torch.Tensor, stored: str, file: Path) -> None:
    """Refuse a floating tensor that holds a NaN or an infinity: quantizers and exporters would carry it into
    every output (a NaN scale, a NaN row of logits) and finish with exit 0. Every tensor mcq reads from a checkpoint
    passes through here (`CheckpointReader.read_stored`, `check_weights_finite`).

    The test is the tensor's minimum and maximum: NaN propagates into both, an infinity is one of them. One
    reduction, no temporary the size of the tensor, and several times faster than `isfinite(...).all()` on bf16
    (measured: about 1-2.6 GB/s against 0.03-0.08 GB/s on a loaded 2-core machine)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)
    if math.isfinite(low.item()) and math.isfinite(high.item()):
        return
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    found = ", ".join(f"{count} {what}" for count, what in ((nan, "NaN"), (inf, "infinite")) if count)
    raise McqError(f"{file}: tensor {stored} holds non-finite values ({found}); the checkpoint is corrupt or "
                   "diverged, and mcq does not load it")


def check_weights_finite(path: Path) -> None:
    """Read every floating tensor of the checkpoint once and refuse a non-finite one: for transformers' loading,
    which reads the shards itself (and, with a quantizer, turns weights into codes before anyone could check)."""
    from safetensors import safe_open

    for file in weight_files(path):
        with safe_open(file, "pt") as handle:
            for stored in handle.keys():
                check_finite(handle.get_tensor(stored), stored, file)


def meta_skeleton(config) -> torch.nn.Module:
    """The module tree the config describes (its family's model class), with no memory behind its weights."""
    from .family import family_for

    with torch.device("meta"):
        return family_for(config.model_type).model_class(config)


# Tensors compressed-tensors' pack-quantized format stores for one Linear (`<module>.<suffix>`) in place of `weight`.
PACKED_LINEAR_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")

# Tensors a quantized Linear stores in place of (or beside) its `weight`, per on-disk format.
QUANTIZED_WEIGHT_SUFFIXES = (
    # compressed-tensors pack-quantized / int-quantized (and the global scale of its fp4 schemes)
    *PACKED_LINEAR_SUFFIXES, "weight_global_scale",
    # bitsandbytes 4-bit (quant state beside a packed `weight`) and LLM.int8
    "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4", "SCB", "weight_format",
)
_QUANTIZED_KEY = re.compile(r"^(.*)\.(" + "|".join(re.escape(s) for s in QUANTIZED_WEIGHT_SUFFIXES) + ")$")


def _split_quantized(shapes: dict[str, list[int]]) -> tuple[dict[str, list[int]], set[str]]:
    """Stored shapes without quantization tensors, and the modules whose weight is stored quantized."""
    plain, quantized = {}, set()
    for name, shape in shapes.items():
        match = _QUANTIZED_KEY.match(name)
        if match:
            quantized.add(match.group(1))
        else:
            plain[name] = shape
    # A quantized weight has the packed shape (bitsandbytes keeps the `weight` name) or is absent (compressed-tensors).
    return {k: v for k, v in plain.items() if k.removesuffix(".weight") not in quantized}, quantized


def check_layout(path: Path, skeleton: MiniCPMV, stored: dict[str, dict[str, Any]]) -> None:
    """Compare the stored tensors with the skeleton's, so a mismatch is one line that names the keys.

    Quantized checkpoints (compressed-tensors, bitsandbytes) are checked the same way, with each quantized Linear's
    weight accounted for by its quantization tensors."""
    # A tied parameter (4.6's lm_head is its embedding table) is stored once, under the name met first.
    tied = ({name for name, _ in skeleton.named_parameters(remove_duplicate=False)}
            - {name for name, _ in skeleton.named_parameters()})
    expected = {k: list(v.shape) for k, v in skeleton.state_dict().items() if k not in tied}
    shapes = {param: shape for name, entry in stored.items()
              for param, shape in checkpoint_names.param_shapes(name, entry["shape"]).items()}
    shapes, quantized = _split_quantized(shapes)
    linears = {name for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)}
    expected = {k: v for k, v in expected.items() if k.removesuffix(".weight") not in quantized}
    problems = {
        "missing": sorted({checkpoint_names.stored_name(k) for k in expected.keys() - shapes.keys()}),
        "unexpected": sorted((shapes.keys() - expected.keys())
                             | {f"{m} (quantized, but not a Linear)" for m in quantized - linears}),
        "shape mismatch": [f"{k} (stored {shapes[k]}, config implies {expected[k]})"
                           for k in sorted(expected.keys() & shapes.keys()) if shapes[k] != expected[k]],
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{kind}: {', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
                           for kind, keys in problems.items())
        from .family import family_for

        release, _ = family_for(skeleton.config.model_type).describe(skeleton.config.to_dict())
        raise McqError(f"{path} does not match the MiniCPM-V {release} layout its config.json describes: {detail}")


def load_model(model: str | Path | Checkpoint, dtype: str = "auto", device: str = "cpu",
               quantization_config: Any = None) -> torch.nn.Module:
    """Load a MiniCPM-V checkpoint (official layout) as its family's model class (`MiniCPMV`, transformers'
    `MiniCPMV4_6ForConditionalGeneration`), after checking every stored tensor.

    `quantization_config` (a transformers quantization config, e.g. `BitsAndBytesConfig`) quantizes while loading.
    """
    checkpoint = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    path, config = checkpoint.path, checkpoint.config
    check_layout(path, meta_skeleton(config), stored_tensors(path))
    check_weights_finite(path)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    stored_quantization = getattr(config, "quantization_config", None) or {}
    if stored_quantization.get("quant_method") == "bitsandbytes":
        from mcq.extras import require

        require("quantize", "bitsandbytes", f"loading {path} (a bitsandbytes variant)")
    if quantization_config is None and stored_quantization.get("quant_method") == "compressed-tensors":
        # No CPU kernels run packed int4/int8: dequantize once at load (to the compute dtype) instead of lazily
        # inside the first forward, so the loaded model is a plain one and `dtype`/`device` apply to every weight.
        from transformers import CompressedTensorsConfig

        quantization_config = CompressedTensorsConfig(dequantize=True)
    # A model quantized while loading, or stored quantized, gets its device as a device map: quantizers place each
    # weight as they load it, and bitsandbytes models refuse `.to()` afterwards.
    quantized = quantization_config is not None or getattr(config, "quantization_config", None) is not None
    placement = {"device_map": {"": device}} if quantized else {}
    if quantized:
        from .bnb_runtime import quiet_bnb_notices

        quiet_bnb_notices()
    if quantization_config is not None:
        placement["quantization_config"] = quantization_config
    try:
        with warnings.catch_warnings():
            # Passing loading attributes (dequantize) for a stored quantization config is what transformers
            # documents; its warning that the stored config wins says nothing the caller can act on.
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            loaded = checkpoint.family.model_class.from_pretrained(path, dtype=torch_dtype, **placement)
    except (RuntimeError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise McqError(f"cannot load {path}: {first_line}") from None
    if getattr(loaded, "is_loaded_in_4bit", False) or getattr(loaded, "is_loaded_in_8bit", False):
        if getattr(loaded, "is_loaded_in_4bit", False):
            # Families loaded by transformers' own classes (4.6) do not get what MiniCPMV.from_pretrained does.
            from .bnb_runtime import disable_unsupported_cpu_repacking

            disable_unsupported_cpu_repacking(loaded)
        if torch_dtype != "auto":
            # transformers leaves the tensors it rebuilt through checkpoint conversions (the resampler's q/k/v and
            # proj) in the stored dtype when a quantizer is active, and bitsandbytes models refuse `.to(dtype)`:
            # cast the plain (unquantized) floating parameters one by one.
            for parameter in loaded.parameters():
                if type(parameter).__name__ not in ("Params4bit", "Int8Params") and parameter.is_floating_point():
                    parameter.data = parameter.data.to(torch_dtype)
        return loaded.eval()
    # Dequantized compressed-tensors weights come out in their scale dtype: bring every weight to the one asked for.
    return loaded.to(device=device, dtype=None if torch_dtype == "auto" else torch_dtype).eval()


def load_processor(model: str | Path):
    from .minicpmv.processing import MiniCPMVProcessor

    path, _, _ = model_spec(model)   # mcq's processor serves the resampler family only
    return MiniCPMVProcessor.from_pretrained(path)


def model_spec(model: str | Path) -> tuple[Path, MiniCPMVConfig, VersionSpec]:
    """Path, config and version of a resampler-family checkpoint, without loading weights (the commands that run
    mcq's own `MiniCPMV`; `open_checkpoint` serves every family)."""
    checkpoint = open_checkpoint(model)
    return checkpoint.path, checkpoint.config, resampler_spec(checkpoint)


def resampler_spec(checkpoint: Checkpoint) -> VersionSpec:
    """The release's `VersionSpec`, for a command that runs mcq's own `MiniCPMV`; one line for another family."""
    if checkpoint.family.model_class is not MiniCPMV:
        raise McqError(f"{checkpoint.path} is MiniCPM-V {checkpoint.release}, which this command does not support yet "
                       f"(it runs {SUPPORTED_MODEL_TYPES['minicpmv']})")
    return version_spec(checkpoint.config.version)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint resolved once: where it is, its config (its family's config class), its family's facts."""

    path: Path
    config: Any
    family: Family
    release: str       # "4.5", "4.6"
    llm_name: str


def open_checkpoint(model: str | Path) -> Checkpoint:
    """Resolve a model spec (a directory or `tiny:VERSION`) of any family, without loading weights."""
    from .family import family_for

    path = resolve_model_path(model)
    raw = read_config(path)
    family = family_for(raw["model_type"])
    release, llm_name = family.describe(raw)
    return Checkpoint(path, family.config_class.from_pretrained(path), family, release, llm_name)
