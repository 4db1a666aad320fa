"""Where an exporter reads weights from: a bf16 checkpoint, or an `mcq quantize` output of it (`--from`).

Exporters walk the model tensor by tensor (memory holds one tensor, never the model). From a compressed-tensors
output, a quantized Linear's weight is handed out two ways: dequantized (`tensor`), which is what a format with
its own quantizer re-quantizes (GGUF: the AWQ-smoothed, calibrated values carry into it), and as the integer
levels with their scales and zero points (`quantized`), which a format that stores the same kind of
grouped integers (ONNX MatMulNBits) writes as they are, with no second rounding. Either way the other tensors
come from the same output, so AWQ's rescaled norms and biases stay with the weights they were smoothed against.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mcq.errors import McqError
from mcq.models.loading import (PACKED_LINEAR_SUFFIXES, check_layout, meta_skeleton, open_checkpoint, resampler_spec,
                                stored_tensors)
from mcq.models.weights import CheckpointReader


@dataclass(frozen=True)
class QuantizedLinear:
    """One Linear's stored quantization: weight ≈ (levels - zero) * scale, per group of `group_size` inputs.

    `levels` are signed integers in [-2^(bits-1), 2^(bits-1)) as compressed-tensors stores them; `zero` is None
    for symmetric schemes (then the zero point is 0). `group_size` is None for one scale per output channel."""

    bits: int
    group_size: int | None
    symmetric: bool
    levels: torch.Tensor       # int8 [out, in]
    scale: torch.Tensor        # [out, groups]
    zero: torch.Tensor | None  # int8 [out, groups]


class ExportWeights:
    """Tensors of a MiniCPM-V checkpoint by model parameter name (mcq naming: `resampler.attn.q_proj.weight`).

    `model` names the checkpoint; `from_dir`, when given, is an `mcq quantize` output of it, and every tensor comes
    from there instead. The config is the one the tensors belong to (the output's: `non_divisible: pad` may have
    widened the MLPs), after checking both describe the same model.

    `every_family`: an exporter that reads the family's facts (`checkpoint.family`) serves every family; the others
    write mcq's own resampler-family graphs, read `spec`, and refuse another family here, before any work."""

    def __init__(self, model: str | Path, from_dir: str | Path | None = None, every_family: bool = False):
        checkpoint = open_checkpoint(model)
        self.model_path = checkpoint.path
        if from_dir is not None:
            source = open_checkpoint(from_dir)
            _check_same_model(checkpoint.path, checkpoint.config, source.path, source.config)
            checkpoint = source
        self.checkpoint = checkpoint
        self.path, self.config = checkpoint.path, checkpoint.config
        if not every_family:
            resampler_spec(checkpoint)
        skeleton = meta_skeleton(self.config)
        check_layout(self.path, skeleton, stored_tensors(self.path))
        self.reader = CheckpointReader(self.path)
        self._schemes = _quantized_modules(self.config, self.reader.stored_names)
        self.shapes = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
        self._param_names = list(self.shapes)

    @property
    def spec(self):
        """The resampler release's `VersionSpec` (a McqError for another family)."""
        return resampler_spec(self.checkpoint)

    def check_output(self, out: Path, force: bool) -> None:
        """`out` may replace neither source: the checkpoint nor the quantize output the tensors come from."""
        from mcq.outputs import check_output

        for source in dict.fromkeys((self.model_path, self.path)):
            check_output(out, force, source=source)

    @property
    def quantized_from(self) -> dict[str, Any] | None:
        """The stored quantization config when the tensors come from a quantized output."""
        return getattr(self.config, "quantization_config", None) or None

    def names(self) -> list[str]:
        """Every model parameter, in the model's order."""
        return list(self._param_names)

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") in self._schemes

    def tensor(self, name: str) -> torch.Tensor:
        """A parameter in its stored floating dtype (float32 when stored quantized: dequantizing in the scales'
        bf16 would round every weight a second time)."""
        if self.is_quantized(name):
            from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

            module = name.removesuffix(".weight")
            packed = self._packed(module)
            packed["weight_scale"] = packed["weight_scale"].float()
            return PackedQuantizationCompressor.decompress(packed, self._schemes[module])["weight"]
        return self.reader.read_params([name])[name]

    def quantized(self, module: str) -> QuantizedLinear | None:
        """The stored integer levels of a quantized Linear (None when it is stored unquantized)."""
        if module not in self._schemes:
            return None
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        args = self._schemes[module].weights
        packed = self._packed(module)
        shape = torch.Size(packed["weight_shape"].tolist())
        scale = packed["weight_scale"]
        zero = None
        if not args.symmetric:
            zero = unpack_from_int32(packed["weight_zero_point"], args.num_bits, (shape[0], scale.shape[-1]),
                                     packed_dim=0)
        group = args.group_size if str(args.strategy).endswith("group") else None
        return QuantizedLinear(bits=args.num_bits, group_size=group, symmetric=bool(args.symmetric),
                               levels=unpack_from_int32(packed["weight_packed"], args.num_bits, shape),
                               scale=scale, zero=zero)

    def _packed(self, module: str) -> dict[str, torch.Tensor]:
        names = set(self.reader.stored_names)
        return {suffix: self.reader.read_stored(f"{module}.{suffix}") for suffix in PACKED_LINEAR_SUFFIXES
                if f"{module}.{suffix}" in names}

    def close(self) -> None:
        self.reader.close()


class MetaWeights:
    """An `ExportWeights`' tensors as meta tensors (their shapes, float32): what a torch program is built from to be
    traced without its weights in memory (`mcq.export.onnx.traced`); each parameter names the checkpoint tensor it
    holds (`mcq_source`), and the exporter writes the weights from the checkpoint afterwards."""

    def __init__(self, weights: ExportWeights):
        self.config, self._shapes, self._weights = weights.config, weights.shapes, weights

    @property
    def spec(self):
        return self._weights.spec

    def names(self) -> list[str]:
        return list(self._shapes)

    def tensor(self, name: str) -> torch.Tensor:
        return torch.empty(self._shapes[name], device="meta")

    def structure(self) -> tuple[str, tuple]:
        """What a program built from these tensors depends on: the config (but where it was read from, and how its
        tensors are stored) and every tensor's shape."""
        settings = {key: value for key, value in self.config.to_dict().items()
                    if not key.startswith("_") and key not in ("quantization_config", "transformers_version")}
        return json.dumps(settings, sort_keys=True, default=str), tuple(sorted(self._shapes.items()))


def _check_same_model(model: Path, config, source: Path, source_config) -> None:
    """`--from` must be an output of `--model`: same version and shapes (an MLP widened by padding excepted)."""
    if not getattr(source_config, "quantization_config", None):
        raise McqError(f"--from {source} is not an `mcq quantize` output (its config.json has no "
                       "quantization_config); pass it as --model instead")
    fields = ("model_type", "version", "query_num")
    differ = [f"{f} {getattr(config, f, None)} vs {getattr(source_config, f, None)}" for f in fields
              if getattr(config, f, None) != getattr(source_config, f, None)]
    # The LLM's fields sit at the top level (resampler family) or under text_config (4.6).
    text, source_text = (getattr(c, "text_config", None) or c for c in (config, source_config))
    differ += [f"{f} {getattr(text, f, None)} vs {getattr(source_text, f, None)}"
               for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if getattr(text, f, None) != getattr(source_text, f, None)]
    vision, source_vision = config.vision_config, source_config.vision_config
    differ += [f"vision {f} {getattr(vision, f)} vs {getattr(source_vision, f)}"
               for f in ("hidden_size", "num_hidden_layers", "patch_size")
               if getattr(vision, f) != getattr(source_vision, f)]
    if differ:
        raise McqError(f"--from {source} is not a quantized copy of {model}: {'; '.join(differ)}")


def _quantized_modules(config, stored_names: list[str]) -> dict[str, Any]:
    """Module name → compressed-tensors scheme, for every Linear the checkpoint stores packed."""
    quantization = getattr(config, "quantization_config", None) or {}
    if not quantization:
        return {}
    if quantization.get("quant_method") != "compressed-tensors" or quantization.get("format") != "pack-quantized":
        raise McqError(f"--from: quantization {quantization.get('quant_method')!r} format "
                       f"{quantization.get('format')!r} cannot be exported; mcq exports from compressed-tensors "
                       "pack-quantized outputs (`mcq quantize --method awq|gptq|rtn`)")
    from compressed_tensors.quantization import QuantizationScheme

    packed = sorted({name.rsplit(".", 1)[0] for name in stored_names if name.endswith(".weight_packed")})
    schemes = {}
    for group in quantization.get("config_groups", {}).values():
        scheme = QuantizationScheme.model_validate(group)
        for module in packed:
            if any(_matches(target, module) for target in scheme.targets):
                schemes.setdefault(module, scheme)
    unmatched = [m for m in packed if m not in schemes]
    if unmatched:
        raise McqError(f"--from: packed weights with no quantization scheme in config.json: {', '.join(unmatched[:3])}")
    return schemes


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    # A class name ("Linear") targets every Linear; every packed module is one.
    return target == module or target == "Linear"
