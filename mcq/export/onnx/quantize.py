"""How each Linear is written into the ONNX graphs: float MatMul, or `com.microsoft::MatMulNBits` (int4 / int8).

Two sources of quantized weights:
- `mcq`: the integer levels, scales and zero points of an `mcq quantize` output (AWQ / GPTQ / RTN), written as they
  are, so calibration carries into ONNX with no second rounding. MatMulNBits stores unsigned levels in blocks of a
  power of two ≥ 16 inputs with one scale (and zero point) per block; a group of g inputs becomes g / block blocks
  that repeat its scale, and one scale per channel repeats over every block of the row, so both are exact.
- `onnxruntime`: no mcq quantization given: each weight is quantized as it is written, by the functions
  onnxruntime's `MatMulNBitsQuantizer` applies to each MatMul of a float graph (its default round-to-nearest
  kernel, or the RTN / k-quant of its neural-compressor port), so the tensors are the ones that quantizer writes
  (tests compare them), without the quantizer's need for the whole float graph in memory (4 bytes a parameter).
  Which Linears, and at which block size, comes from a recipe built from the export's options
  (`export_recipe`), planned by `mcq.quantize.recipe.plan_quantization`: the same rules as `mcq quantize` (lm_head
  kept, a layer whose width the block size does not divide falls back to the largest dividing power of two).

Every large weight is read from the memory-mapped checkpoint and written a block of rows at a time
(`builder.Rows`, `mcq.export.rows`): both kinds of quantization treat each output channel on its own, so blocks of rows give the same
bytes as the whole tensor.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, replace

import numpy as np

from mcq.errors import McqError

from ..rows import row_ranges
from .store import Rows

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


def precision_dtype(bits: set[int], precision: str) -> str:
    """The transformers.js dtype of a graph whose MatMulNBits have `bits` (empty: none)."""
    if bits:
        return "q4" if 4 in bits else "int8"
    return "fp16" if precision == "fp16" else "fp32"


# -- plans -----------------------------------------------------------------------------------------------------

def export_recipe(bits: int, block_size: int, symmetric: bool, family: str):
    """The recipe an onnxruntime-quantized export follows: every Linear of the family's components at
    `block_size`, lm_head kept, widths the block does not divide at the largest dividing power of two
    (`fallback_group`). One rule per component prefix (the LLM's first, then the others in data-flow order), a
    prefix inside another's left to that one."""
    from mcq.models.families import family_components
    from mcq.quantize.recipe import parse_recipe

    components = family_components(family)
    ordered = [*components["llm"], *(p for c, prefixes in components.items() if c != "llm" for p in prefixes)]
    prefixes = [p for p in ordered if p.endswith(".") and not any(p != q and p.startswith(q) for q in ordered)]
    rules = [{"match": "^" + re.escape(prefix), "bits": bits, "group_size": block_size, "symmetric": symmetric,
              "non_divisible": "fallback_group"} for prefix in prefixes]
    name = f"onnx-w{bits}b{block_size}"
    # target mcq: no serving runtime's rules; MatMulNBits' own constraints are applied in plan_onnxruntime.
    return parse_recipe({"name": name, "method": "rtn", "rules": rules, "target": "mcq",
                         "description": f"onnxruntime MatMulNBits int{bits}, block {block_size}"}, name)


def float_plans(linears, reason: str) -> dict[str, LinearPlan]:
    return {info.name: LinearPlan(info.name, info.component, info.in_features, info.out_features, None, None, None,
                                  reason) for info in linears}


def plan_onnxruntime(linears, bits: int, block_size: int, symmetric: bool, family: str,
                     algorithm: str = "default") -> dict[str, LinearPlan]:
    from mcq.quantize.recipe import plan_quantization

    plan = plan_quantization(export_recipe(bits, block_size, symmetric, family), linears)
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

    def __init__(self, weights, precision: str, plans: dict[str, LinearPlan], accuracy_level: int,
                 symmetric: bool = False):
        self.weights, self.precision, self.plans = weights, precision, plans
        self.accuracy_level, self.symmetric = accuracy_level, symmetric

    def float_rows(self, name: str, transpose: bool = False, shape: tuple[int, ...] | None = None,
                   dtype=None) -> Rows:
        """A float weight (transposed: a Linear's `[in, out]` MatMul operand) in `dtype` (default: the export's),
        block by block of rows read from the mapped checkpoint. `shape`: the array's, when it is the tensor reshaped
        (a patch convolution's weight as a Linear's, `[out, in]` before the transposition)."""
        tensor = self.weights.tensor(name)
        if shape is not None:
            tensor = tensor.reshape(tuple(shape[::-1]) if transpose else tuple(shape))
        dtype = np.dtype(dtype or (np.float16 if self.precision == "fp16" else np.float32))
        shape = tuple(tensor.shape[::-1]) if transpose else tuple(tensor.shape)
        row_bytes = 4 * (shape[0] and int(np.prod(shape)) // shape[0])
        half_max = np.finfo(np.float16).max

        def blocks() -> Iterator[np.ndarray]:
            for start, stop in row_ranges(shape[0], row_bytes):
                block = tensor[:, start:stop].float().T if transpose else tensor[start:stop].float()
                # via float32, as the whole-tensor export did: bf16 → float32 is exact, float32 → float16 rounds once
                block = block.numpy()
                if dtype == np.float16 and np.abs(block).max(initial=0.0) > half_max:
                    raise McqError(f"{name} holds values beyond float16's range; export it as fp32")
                yield block.astype(dtype, copy=False)
        return Rows(shape, dtype, blocks)

    def nbits_tensors(self, module: str):
        """(packed, scales, zero points or None, (N, K)) of a Linear its plan quantizes (source mcq or
        onnxruntime)."""
        plan = self.plans[module]
        source = self._stored_tensors if plan.source == "mcq" else self._onnxruntime_tensors
        return source(module, plan)

    def _stored_tensors(self, module: str, plan: LinearPlan):
        """MatMulNBits tensors of an `mcq quantize` output's levels, block of output rows by block."""
        stored = self.weights.quantized(module)
        n, k = stored.levels.shape
        parts = [matmul_nbits_tensors(replace(stored, levels=stored.levels[start:stop], scale=stored.scale[start:stop],
                                              zero=None if stored.zero is None else stored.zero[start:stop]),
                                      plan.block)
                 for start, stop in row_ranges(n, 4 * k)]
        return (*_joined(parts), (n, k))

    def _onnxruntime_tensors(self, module: str, plan: LinearPlan):
        """MatMulNBits tensors as onnxruntime's quantizer makes them from the float weight, block of output rows by
        block (an even number of rows: its RTN / k-quant port packs zero points in pairs across the flattened
        rows)."""
        weight = self.weights.tensor(f"{module}.weight")        # [N, K], mapped
        n, k = weight.shape
        quantize = _onnxruntime_quantizer(plan, self.symmetric, self.accuracy_level)
        parts = [quantize(np.ascontiguousarray(weight[start:stop].float().numpy().T))
                 for start, stop in row_ranges(n, 4 * k, multiple=2)]
        return (*_joined(parts), (n, k))


def _joined(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]):
    packed, scales, zeros = zip(*parts)
    return (np.concatenate(packed), np.concatenate(scales),
            None if zeros[0] is None else np.concatenate(zeros))


# -- onnxruntime's quantizer, one weight at a time -----------------------------------------------------------------

def _onnxruntime_quantizer(plan: LinearPlan, symmetric: bool, accuracy_level: int):
    """A function from a float MatMul operand `[K, N]` to MatMulNBits' (packed [N, blocks, bytes], scales,
    zero points or None): what `MatMulNBitsQuantizer` writes for that MatMul, through the same onnxruntime
    functions (`DefaultWeightOnlyQuantizer.qbits_block_quant`; the neural-compressor port's `quant_tensor` /
    `quant_tensor_k_quant_cuda` and `make_matmul_weight_only_node`)."""
    if plan.algorithm in (None, "default"):
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )
        from onnxruntime.quantization.quant_utils import QuantFormat

        quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=plan.block, is_symmetric=symmetric, accuracy_level=accuracy_level or None,
            quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=plan.bits))

        def default(weight: np.ndarray):
            packed, scales, zeros = quantizer.qbits_block_quant(weight)
            return packed, scales, None if symmetric else zeros
        return default

    from onnx import helper, numpy_helper
    from onnxruntime.quantization.neural_compressor.weight_only import (
        make_matmul_weight_only_node,
        pad_tensor,
        quant_tensor,
        quant_tensor_k_quant_cuda,
    )

    block, k_quant = plan.block, plan.algorithm == "k_quant"
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")

    def neural_compressor(weight: np.ndarray):
        rows, cols = weight.shape
        k_blocks = (rows - 1) // block + 1
        padded = pad_tensor(weight, block, k_blocks)
        with _quiet("onnxruntime.quantization", "neural_compressor"), redirect_stdout(io.StringIO()):
            if k_quant:
                levels, scale, zero = quant_tensor_k_quant_cuda(padded.T, 4, block)
            else:
                levels, scale, zero = quant_tensor(padded.T, 4, block, "sym" if symmetric else "asym", "uint", 1)
        _, tensors = make_matmul_weight_only_node(
            node=node, weight_shape=(rows, cols), num_bits=4, group_size=block, k_blocks=k_blocks,
            q_weight=levels.astype("uint8"), scale=scale.astype(np.float32),
            zero_point=zero if not symmetric or k_quant else None, accuracy_level=accuracy_level)
        arrays = {t.name: numpy_helper.to_array(t) for t in tensors}
        return arrays[f"w_Q4G{block}"], arrays["w_scale"], arrays.get("w_zp")
    return neural_compressor


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """onnxruntime's quantizer logs INFO lines per weight; an export prints its own summary instead."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
