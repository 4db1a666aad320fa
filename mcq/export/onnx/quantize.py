"""How each Linear is written into the ONNX graphs: float MatMul, or `com.microsoft::MatMulNBits` (int4 / int8).

Two sources of quantized weights:
- `mcq`: the integer levels, scales and zero points of an `mcq quantize` output (AWQ / GPTQ / RTN), written as they
  are, so calibration carries into ONNX with no second rounding. MatMulNBits stores unsigned levels in blocks of a
  power of two ≥ 16 inputs with one scale (and zero point) per block; a group of g inputs becomes g / block blocks
  that repeat its scale, and one scale per channel repeats over every block of the row, so both are exact.
- `onnxruntime`: no mcq quantization given: the float graph goes through onnxruntime's own
  `MatMulNBitsQuantizer` (its default round-to-nearest kernel, or the RTN / k-quant of its neural-compressor port).
  Which Linears, and at which block size, comes from a recipe built from the export's options
  (`export_recipe`), planned by `mcq.quantize.recipe.plan_quantization`: the same rules as `mcq quantize` (lm_head
  kept, a layer whose width the block size does not divide falls back to the largest dividing power of two).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from mcq.errors import McqError

from .builder import MS_DOMAIN, GraphBuilder

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PRECISION_BITS = {"int8": 8, "int4": 4}
# MatMulNBits accepts power-of-two blocks from 16 inputs; onnxruntime's CPU kernels cover 16 to 256.
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32
MIN_BLOCK = 16
# Block used for one-scale-per-channel weights (their scale is repeated over every block of the row).
CHANNEL_BLOCK = 128
ORT_ALGORITHMS = ("default", "rtn", "k_quant")


@dataclass(frozen=True)
class LinearPlan:
    """How one Linear is written. `source` is "mcq" (stored levels), "onnxruntime" (quantized by its quantizer)
    or None (a float MatMul)."""

    name: str
    component: str
    in_features: int
    out_features: int
    source: str | None
    bits: int | None
    block: int | None
    reason: str
    algorithm: str | None = None   # onnxruntime's quantizer algorithm for this layer (source "onnxruntime")
    fallback: bool = False         # not written as asked: another group/block, algorithm, or kept in float

    def to_dict(self) -> dict:
        return {"name": self.name, "component": self.component, "in_features": self.in_features,
                "out_features": self.out_features, "source": self.source, "bits": self.bits, "block": self.block,
                "algorithm": self.algorithm, "reason": self.reason, "fallback": self.fallback}


def check_options(precision: str, block_size: int | None, algorithm: str, from_quantized: bool = False) -> None:
    """Refuse values onnxruntime's quantizer does not take, and a block size where it does not run (None: the
    default block, DEFAULT_BLOCK_SIZE)."""
    if precision not in PRECISIONS:
        raise McqError(f"unsupported ONNX precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE
    elif precision not in PRECISION_BITS:
        raise McqError(f"--block-size applies to int4 and int8; {precision} weights are not quantized in blocks")
    elif from_quantized:
        raise McqError("--block-size does not apply with --from: each layer keeps the group size it was quantized "
                       "with")
    if block_size not in BLOCK_SIZES:
        raise McqError(f"unsupported block size {block_size!r} for MatMulNBits; choose one of "
                       f"{', '.join(map(str, BLOCK_SIZES))}")
    if algorithm not in ORT_ALGORITHMS:
        raise McqError(f"unknown onnxruntime quantization algorithm {algorithm!r}; choose one of "
                       f"{', '.join(ORT_ALGORITHMS)}")
    if algorithm != "default" and precision != "int4":
        raise McqError(f"onnxruntime's {algorithm} quantizer writes int4 only; use --precision int4 or the default "
                       "algorithm")


def matmul_nbits_block(group_size: int | None, in_features: int) -> int | None:
    """The MatMulNBits block that represents groups of `group_size` inputs exactly (None: it cannot)."""
    if group_size is None:
        return CHANNEL_BLOCK if in_features >= CHANNEL_BLOCK else (MIN_BLOCK if in_features >= MIN_BLOCK else None)
    if group_size < MIN_BLOCK:
        return None
    return min(group_size, max(BLOCK_SIZES))


# -- plans -----------------------------------------------------------------------------------------------------

def export_recipe(bits: int, block_size: int, symmetric: bool):
    """The recipe an onnxruntime-quantized export follows: every Linear of the three components at `block_size`,
    lm_head kept, widths the block does not divide at the largest dividing power of two (`fallback_group`)."""
    from mcq.quantize.recipe import parse_recipe

    rules = [{"match": rf"^{prefix}\.", "bits": bits, "group_size": block_size, "symmetric": symmetric,
              "non_divisible": "fallback_group"} for prefix in ("llm", "vpm", "resampler")]
    name = f"onnx-w{bits}b{block_size}"
    # target mcq: no serving runtime's rules; MatMulNBits' own constraints are applied in plan_onnxruntime.
    return parse_recipe({"name": name, "method": "rtn", "rules": rules, "target": "mcq",
                         "description": f"onnxruntime MatMulNBits int{bits}, block {block_size}"}, name)


def float_plans(linears, reason: str) -> dict[str, LinearPlan]:
    return {info.name: LinearPlan(info.name, info.component, info.in_features, info.out_features, None, None, None,
                                  reason) for info in linears}


def plan_onnxruntime(linears, bits: int, block_size: int, symmetric: bool,
                     algorithm: str = "default") -> dict[str, LinearPlan]:
    from mcq.quantize.recipe import plan_quantization

    plan = plan_quantization(export_recipe(bits, block_size, symmetric), linears)
    plans = {}
    for layer in plan.layers:
        source, block, reason, method, fallback = None, None, layer.reason, None, layer.fallback
        if layer.scheme is not None:
            block = layer.scheme.group_size
            if block is None or block < MIN_BLOCK:
                reason += f"; kept in float: MatMulNBits blocks are powers of two ≥ {MIN_BLOCK} inputs"
                block, fallback = None, True
            else:
                source, method = "onnxruntime", algorithm
                blocks = -(-layer.in_features // block)
                if algorithm != "default" and blocks % 2 and (algorithm == "k_quant" or not symmetric):
                    # onnxruntime's neural-compressor port packs the zero points of an odd number of blocks per
                    # row into the wrong shape (and fails); its default round-to-nearest kernel packs them right.
                    method, fallback = "default", True
                    reason += f"; {blocks} blocks per row: onnxruntime's default quantizer instead of {algorithm}"
        plans[layer.name] = LinearPlan(layer.name, layer.component, layer.in_features, layer.out_features, source,
                                       bits if source else None, block, reason, method, fallback)
    return plans


def plan_from_mcq(weights, linears, precision: str) -> dict[str, LinearPlan]:
    """Plans for an export of an `mcq quantize` output: its quantized Linears keep their levels (int precisions) or
    are written dequantized (fp32 / fp16); the Linears its recipe kept stay float."""
    bits = PRECISION_BITS.get(precision)
    plans, other_bits = {}, set()
    for info in linears:
        stored = weights.quantized(info.name)
        source, block, reason, fallback = None, None, "kept unquantized by the --from recipe", False
        if stored is not None:
            scheme = f"int{stored.bits} " + (f"group {stored.group_size}" if stored.group_size else "per channel")
            if bits is None:
                reason = f"{scheme} in --from, written dequantized ({precision})"
            elif stored.bits != bits:
                other_bits.add(stored.bits)
            else:
                block = matmul_nbits_block(stored.group_size, stored.levels.shape[1])
                if block is None:
                    reason = (f"{scheme} in --from, written dequantized: MatMulNBits blocks are powers of two ≥ "
                              f"{MIN_BLOCK} inputs")
                    fallback = True
                else:
                    source, reason = "mcq", f"{scheme} from --from as MatMulNBits block {block}"
        plans[info.name] = LinearPlan(info.name, info.component, info.in_features, info.out_features, source,
                                      bits if source else None, block, reason, fallback=fallback)
    if other_bits:
        stored_precisions = " and ".join(f"int{b}" for b in sorted(other_bits))
        raise McqError(f"--from stores {stored_precisions} weights but --precision is {precision}; export it with "
                       f"--precision {stored_precisions.split()[0]} (or fp32 / fp16 for its dequantized weights)")
    return plans


# -- MatMulNBits tensors from stored levels ----------------------------------------------------------------------

def matmul_nbits_tensors(stored, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(packed levels [N, blocks, block*bits/8] uint8, scales [N, blocks] float32, zero points or None) of a
    stored quantized Linear (`weights_source.QuantizedLinear`: signed levels, weight ≈ (levels - zero) * scale).

    Levels are stored unsigned in MatMulNBits, shifted by 2^(bits-1); without a zero-point input MatMulNBits
    assumes exactly that shift, so a symmetric scheme needs none.
    """
    bits = stored.bits
    shift = 1 << (bits - 1)
    levels = stored.levels.numpy().astype(np.int32) + shift          # [N, K], now in [0, 2^bits)
    n, k = levels.shape
    if levels.min() < 0 or levels.max() >= (1 << bits):
        raise McqError(f"stored levels outside the int{bits} range")
    blocks = -(-k // block)
    scale = stored.scale.float().numpy()
    per_group = block if stored.group_size is None else stored.group_size
    repeat = blocks if stored.group_size is None else stored.group_size // block
    if stored.group_size is not None and (k % per_group or scale.shape[1] * per_group != k):
        raise McqError(f"stored groups of {per_group} do not tile {k} inputs")
    scales = np.repeat(scale, repeat, axis=1).astype(np.float32)      # [N, blocks]
    padded = np.zeros((n, blocks * block), dtype=np.int32)
    padded[:, :k] = levels                                            # the tail past K is never read
    padded = padded.reshape(n, blocks, block)
    zeros = None
    if stored.zero is not None:
        zeros = np.repeat(stored.zero.numpy().astype(np.int32) + shift, repeat, axis=1)   # [N, blocks]
        if zeros.min() < 0 or zeros.max() >= (1 << bits):
            raise McqError(f"stored zero points outside the int{bits} range")
    if bits == 8:
        return padded.astype(np.uint8), scales, None if zeros is None else zeros.astype(np.uint8)
    packed = (padded[..., 0::2] | (padded[..., 1::2] << 4)).astype(np.uint8)   # element 2j low nibble, 2j+1 high
    if zeros is not None:
        if blocks % 2:
            zeros = np.concatenate([zeros, np.zeros((n, 1), dtype=np.int32)], axis=1)
        zeros = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8)
    return packed, scales, zeros


# -- writing Linears and weights ---------------------------------------------------------------------------------

class WeightWriter:
    """Reads the model's tensors (`mcq.export.weights_source.ExportWeights`) and writes them into graphs."""

    def __init__(self, weights, precision: str, plans: dict[str, LinearPlan], accuracy_level: int):
        self.weights, self.precision, self.plans = weights, precision, plans
        self.accuracy_level = accuracy_level
        self._names = set(weights.names())

    def has(self, name: str) -> bool:
        return name in self._names

    def array(self, name: str) -> np.ndarray:
        return self.weights.tensor(name).float().numpy()

    def _float(self, b: GraphBuilder, name: str, array: np.ndarray) -> str:
        """A large float weight; fp16 exports store it in half precision and compute in float32 after a Cast."""
        if self.precision == "fp16":
            return b.op("Cast", b.weight(f"{name}.fp16", array.astype(np.float16)), to=TensorProto.FLOAT)
        return b.weight(name, array)

    def large_weight(self, b: GraphBuilder, name: str) -> str:
        return self._float(b, name, self.array(name))

    def linear(self, b: GraphBuilder, x: str, module: str) -> str:
        plan = self.plans[module]
        with b.scope(module):
            if plan.source == "mcq":
                out = self._matmul_nbits(b, x, module, plan)
            else:
                # MatMul takes B as [in, out]: the transposed weight. The onnxruntime path finds these MatMuls by
                # node name (`<module>/MatMul`) and replaces them.
                weight = np.ascontiguousarray(self.array(f"{module}.weight").T)
                out = b.op("MatMul", x, self._float(b, f"{module}.weight.T", weight))
            if self.has(f"{module}.bias"):
                out = b.op("Add", out, b.weight(f"{module}.bias", self.array(f"{module}.bias")))
        return out

    def _matmul_nbits(self, b: GraphBuilder, x: str, module: str, plan: LinearPlan) -> str:
        stored = self.weights.quantized(module)
        packed, scales, zeros = matmul_nbits_tensors(stored, plan.block)
        inputs = [x, b.weight(f"{module}.weight_q{stored.bits}", packed), b.weight(f"{module}.weight_scales", scales)]
        if zeros is not None:
            inputs.append(b.weight(f"{module}.weight_zero_points", zeros))
        attributes = {"K": int(stored.levels.shape[1]), "N": int(stored.levels.shape[0]), "bits": stored.bits,
                      "block_size": plan.block}
        if self.accuracy_level:
            attributes["accuracy_level"] = self.accuracy_level
        return b.op("MatMulNBits", *inputs, domain=MS_DOMAIN, **attributes)


# -- onnxruntime's quantizer -------------------------------------------------------------------------------------

def quantize_with_onnxruntime(model: onnx.ModelProto, plans: dict[str, LinearPlan], *, symmetric: bool,
                              accuracy_level: int) -> onnx.ModelProto:
    """Replace the MatMuls the plans give to onnxruntime by MatMulNBits, one quantizer pass per (algorithm, bits,
    block size).

    The quantizer takes every MatMul with a constant weight unless excluded, so each pass excludes all the others.
    """
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
        RTNWeightOnlyQuantConfig,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    matmuls = [node.name for node in model.graph.node if node.op_type == "MatMul"]
    present = set(matmuls)
    passes: dict[tuple[str, int, int], set[str]] = {}
    for plan in plans.values():
        node = f"{plan.name}/MatMul"
        if plan.source == "onnxruntime" and node in present:
            passes.setdefault((plan.algorithm or "default", plan.bits, plan.block), set()).add(node)
    for (algorithm, bits, block), nodes in sorted(passes.items()):
        exclude = [name for name in matmuls if name not in nodes]
        level = accuracy_level or None
        if algorithm == "rtn":
            config = RTNWeightOnlyQuantConfig()
        elif algorithm == "k_quant":
            config = KQuantWeightOnlyQuantConfig()
        else:
            config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, accuracy_level=level,
                                                  quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
                                                  bits=bits)
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric,
                                         accuracy_level=level, nodes_to_exclude=exclude,
                                         op_types_to_quantize=("MatMul",), algo_config=config)
        # The neural-compressor port prints a progress bar on stdout, which would corrupt `--json` output.
        with _quiet("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer",
                    "neural_compressor"), \
                redirect_stdout(io.StringIO()):
            quantizer.process()
        model = quantizer.model.model
        matmuls = [node.name for node in model.graph.node if node.op_type == "MatMul"]
    return model


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """onnxruntime's quantizer logs INFO lines per node (and its neural-compressor port per weight); an export prints
    its own summary instead."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
