"""A small numpy interpreter of Core ML ML-programs, for checking saved `.mlpackage`s numerically on Linux.

coremltools on Linux can convert and save but not predict (the Core ML framework is macOS only), so the tests
would otherwise compare nothing past the torch wrapper. This runs a program exactly as saved (as
`mcq.export.coreml.program.load_program` reads it: the protobuf and the weights file) op by op.

It implements only the MIL ops mcq's exports contain, and refuses any other op by name before running anything,
so a converter change that brings a new op shows up as a clear error instead of a silent skip. Arithmetic follows
the declared types: a value typed fp16 is rounded to float16 after every op (the op itself is computed in
float32, as the Neural Engine and GPU accumulate in wider precision than they store), so fp16 overflow and
rounding show up here as they would on a device.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from mcq.errors import McqError
from mcq.export.coreml.program import Operation, Program, StoredTensor, materialized

# -- ops -------------------------------------------------------------------------------------------------------------

def _fp(x: np.ndarray) -> np.ndarray:
    """Float values widened for computation (fp16 inputs are computed in float32)."""
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _widened(weight: np.ndarray) -> np.ndarray:
    """A weight in float32, through torch's conversion: the same values as numpy's, about 4x faster on the large
    weights a linear widens for every call."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(weight)).float().numpy() if weight.dtype == np.float16 else weight


def _axes(axes, rank: int) -> tuple[int, ...]:
    return tuple(int(a) % rank for a in np.atleast_1d(axes))


# Dequantization computes this many elements at a time in float32 (as fast as the whole weight at once, and no
# float32 copy of it: for a real-vocabulary LM head, 151,748 x 4096, that copy was 2.5 GB beside its fp16 values).
CHUNK_ELEMENTS = 1 << 24
# A linear widens a weight of up to this many elements whole for its product (a real-width MLP projection, 12288 x
# 4096: 200 MB in float32, one BLAS call), a larger one (an LM head, an embedding table) a chunk of rows at a time:
# chunked products were measured slower per element (more, smaller BLAS calls).
WHOLE_PRODUCT_ELEMENTS = 1 << 26


def _chunks(length: int, row_elements: int):
    """Slices covering range(length), each of about CHUNK_ELEMENTS elements of rows `row_elements` long."""
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    return [slice(start, min(length, start + step)) for start in range(0, length, step)]


def _linear(x, weight, bias=None):
    x = _fp(x)
    by_rows = isinstance(weight, RowsOnDemand)   # a weight over WHOLE_PRODUCT_ELEMENTS, made a block of rows at a time
    if not by_rows and (weight.dtype == np.float32 or weight.size <= WHOLE_PRODUCT_ELEMENTS):
        out = x @ _widened(weight).T
    else:
        out = np.empty(x.shape[:-1] + weight.shape[:1], dtype=np.float32)
        for rows in _chunks(weight.shape[0], weight.shape[1]):
            block = weight.rows(np.arange(rows.start, rows.stop)) if by_rows else weight[rows]
            out[..., rows] = x @ _widened(block).T
    return out + _fp(bias) if bias is not None else out


def _matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = _fp(x), _fp(y)
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-5):
    x = _fp(x)
    axes = _axes(axes, x.ndim)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + float(epsilon))
    if gamma is not None:
        out = out * _fp(gamma)
    if beta is not None:
        out = out + _fp(beta)
    return out


def _softmax(x, axis=-1):
    x = _fp(x)
    shifted = x - x.max(axis=int(axis), keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=int(axis), keepdims=True)


def _gelu(x, mode="EXACT"):
    x = _fp(x)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))


class RowsOnDemand:
    """A weight only read by rows (an embedding table, a large product's weight): the op that makes it, run on the
    rows asked for when they are asked for (its stored tensors read by row), so a lookup neither reads nor
    decompresses the table, and a product holds one block of its weight's rows at a time."""

    def __init__(self, op: Operation):
        self.op = op
        self.stored = op.attributes["val"] if op.type == "const" else op.inputs["data"][0][1]
        self.shape = self.stored.shape

    def rows(self, rows: np.ndarray) -> np.ndarray:
        if self.op.type == "const":
            return self.stored.read_rows(rows)

        def per_row(name: str):   # the scale (offset) of each row: per block of rows, each row its block's
            if name not in self.op.inputs:
                return None
            value = self.op.inputs[name][0][1]
            block = rows // (self.shape[0] // value.shape[0])
            return value.read_rows(block) if isinstance(value, StoredTensor) else np.asarray(value)[block]

        return _blockwise_shift_scale(self.stored.read_rows(rows), per_row("scale"), per_row("offset"))


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise McqError("interpreter: gather with batch_dims is not implemented")
    indices = np.asarray(indices).astype(np.int64)
    if isinstance(x, RowsOnDemand):   # along axis 0 (see `read_by_rows`)
        wanted, positions = np.unique(np.where(indices < 0, indices + x.shape[0], indices), return_inverse=True)
        return x.rows(wanted)[positions.reshape(indices.shape)]
    axis = int(axis) % x.ndim
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take(x, indices, axis=axis)


def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    slices = []
    for axis in range(x.ndim):
        start = None if begin_mask is not None and begin_mask[axis] else int(begin[axis])
        stop = None if end_mask is not None and end_mask[axis] else int(end[axis])
        step = 1 if stride is None else int(stride[axis])
        if squeeze_mask is not None and squeeze_mask[axis]:
            slices.append(start if start is not None else 0)
            continue
        slices.append(slice(start, stop, step))
    return x[tuple(slices)]


def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(x, copy=True)
    slices = []
    for axis in range(x.ndim):
        start = None if begin_mask is not None and begin_mask[axis] else int(begin[axis])
        stop = None if end_mask is not None and end_mask[axis] else int(end[axis])
        step = 1 if stride is None else int(stride[axis])
        slices.append(start if squeeze_mask is not None and squeeze_mask[axis] else slice(start, stop, step))
    out[tuple(slices)] = update
    return out


def _reduce(fn):
    def reduce(x, axes=None, keep_dims=False):
        x = _fp(x)
        return fn(x, axis=None if axes is None else _axes(axes, x.ndim), keepdims=bool(keep_dims))
    return reduce


def _tile(x, reps):
    return np.tile(x, [int(r) for r in reps])


def _dequantized(shape: tuple[int, ...], dtype: np.dtype, axis: int, compute) -> np.ndarray:
    """An array of `shape` and `dtype` (a constexpr op's output has its scale's or palette's type) filled a chunk at a
    time along `axis` by `compute(index)`, which computes that chunk in float32: the same values as one float32
    array cast at the end, without holding that array (4 bytes per weight element)."""
    import torch

    out = np.empty(shape, dtype=dtype)
    row = math.prod(shape) // max(1, shape[axis])
    for part in _chunks(shape[axis], row):
        index = (slice(None),) * axis + (part,)
        # torch's float32 -> float16 rounding is numpy's (round to nearest even), about 6x faster
        torch.from_numpy(out[index]).copy_(torch.from_numpy(np.ascontiguousarray(compute(index))))
    return out


def _cut(values: np.ndarray, index: tuple, axis: int) -> np.ndarray:
    """The chunk `index` of a tensor broadcast over the weight (unchanged where it has one entry along `axis`)."""
    return values[index] if values.shape[axis] > 1 else values


def _affine_dequantize(quantized_data, zero_point, scale, axis):
    """iOS16 per-channel (or per-tensor) linear dequantization: (q - zero_point) * scale along `axis`."""
    shape = [1] * quantized_data.ndim
    axis = int(axis) % quantized_data.ndim
    scale = np.asarray(scale)
    zero = np.asarray(zero_point).astype(np.float32)
    scales = scale.astype(np.float32)
    if zero.ndim == 1:
        shape[axis] = zero.shape[0]
        zero = zero.reshape(shape)
    if scales.ndim == 1:
        shape[axis] = scales.shape[0]
        scales = scales.reshape(shape)
    zero, scales = np.broadcast_to(zero, [1] * (quantized_data.ndim - zero.ndim) + list(zero.shape)), \
        np.broadcast_to(scales, [1] * (quantized_data.ndim - scales.ndim) + list(scales.shape))
    chunked = 0 if quantized_data.shape[0] > 1 or quantized_data.ndim == 1 else 1
    return _dequantized(quantized_data.shape, scale.dtype, chunked, lambda index: (
        quantized_data[index].astype(np.float32) - _cut(zero, index, chunked)) * _cut(scales, index, chunked))


def _per_block(values: np.ndarray) -> np.ndarray:
    """A per-block tensor (same rank as the weight, each dim dividing it) laid out to broadcast over the weight
    viewed as `_blocked(shape)`: one axis per block index, then a unit axis per position inside the block."""
    return values.reshape([size for have in values.shape for size in (have, 1)])


def _blocked(shape: tuple[int, ...], per_block: tuple[int, ...]) -> list[int]:
    """The weight's shape split into (blocks, block size) per dim, for `per_block` counts of blocks."""
    return [size for want, have in zip(shape, per_block) for size in (have, want // have)]


def _blockwise_shift_scale(data, scale, offset=None):
    """iOS18 blockwise dequantization: (data - offset) * scale, each scale covering one block of the weight. The
    scales broadcast over their blocks (not repeated to the weight's size), a chunk of rows at a time."""
    scale = np.asarray(scale)
    blocked = _blocked(data.shape, scale.shape)
    source = data.reshape(blocked)
    scales = _per_block(scale.astype(np.float32))
    offsets = None if offset is None else _per_block(np.asarray(offset).astype(np.float32))
    # Along the row blocks, or the rows inside the one block that spans them all.
    chunked = 0 if blocked[0] > 1 else 1

    def compute(index: tuple) -> np.ndarray:
        values = source[index].astype(np.float32)
        if offsets is not None:
            values -= _cut(offsets, index, chunked)
        values *= _cut(scales, index, chunked)
        return values

    return _dequantized(tuple(blocked), scale.dtype, chunked, compute).reshape(data.shape)


def _lut_to_dense(indices, lut, shape=None, vector_axis=None):
    """Palettized weights. iOS16 form: flat `lut` [2^n] with bit-packed `indices` and `shape`. iOS18 form:
    `indices` [shape] and `lut` [blocks per dim..., 2^n, 1] (one table per block)."""
    if shape is not None:   # iOS16: indices come as the packed uint8 byte stream
        shape = [int(s) for s in shape]
        count, bits = int(np.prod(shape)), int(round(math.log2(lut.shape[0])))
        packed, table, weights = np.asarray(indices, dtype=np.uint8), _fp(lut), 1 << np.arange(bits)

        def compute(index: tuple) -> np.ndarray:
            # Chunks start on whole bytes (CHUNK_ELEMENTS is a multiple of 8); the last one's bits are trimmed.
            start, stop = index[0].start, index[0].stop
            unpacked = np.unpackbits(packed[start * bits // 8: -(-stop * bits // 8)], bitorder="little")
            return table[unpacked[: (stop - start) * bits].reshape(-1, bits) @ weights]

        return _dequantized((count,), lut.dtype, 0, compute).reshape(shape)
    if vector_axis is not None or lut.shape[-1] != 1:
        raise McqError("interpreter: vector palettization (cluster_dim > 1) is not implemented")
    indices = np.asarray(indices)
    tables = _fp(lut)[..., 0]                        # [blocks..., 2^n]
    out = np.empty(indices.shape, dtype=lut.dtype)
    block = [s // b for s, b in zip(indices.shape, tables.shape[:-1])]
    for table_index in np.ndindex(*tables.shape[:-1]):
        region = tuple(slice(i * b, (i + 1) * b) for i, b in zip(table_index, block))
        out[region] = tables[table_index][indices[region]]
    return out


def _cast(x, dtype):
    return np.asarray(x).astype({"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16,
                                 "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "bool": np.bool_}[dtype])


def _concat(values, axis, interleave=False):
    if interleave:
        raise McqError("interpreter: concat with interleave is not implemented")
    # Shape arithmetic concatenates scalars (rank 0) into index vectors.
    return np.concatenate([np.atleast_1d(_fp(np.asarray(v))) for v in values], axis=int(axis))


def _rsqrt(x, epsilon=1e-12):
    return 1.0 / np.sqrt(_fp(x) + float(epsilon))


def _select(cond, a, b):
    return np.where(cond, _fp(np.asarray(a)), _fp(np.asarray(b)))


def _silu(x):
    x = _fp(x)
    return x / (1.0 + np.exp(-x))


def _fill_like(ref_tensor, value=0.0):
    return np.full(np.asarray(ref_tensor).shape, value)


def _range_1d(start, end, step):
    return np.arange(start, end, step)


OPS: dict[str, Callable[..., Any]] = {
    "add": lambda x, y: _fp(np.asarray(x)) + _fp(np.asarray(y)),
    "sub": lambda x, y: _fp(np.asarray(x)) - _fp(np.asarray(y)),
    "mul": lambda x, y: _fp(np.asarray(x)) * _fp(np.asarray(y)),
    "real_div": lambda x, y: _fp(np.asarray(x)) / _fp(np.asarray(y)),
    "pow": lambda x, y: _fp(np.asarray(x)) ** _fp(np.asarray(y)),
    "maximum": lambda x, y: np.maximum(_fp(np.asarray(x)), _fp(np.asarray(y))),
    "minimum": lambda x, y: np.minimum(_fp(np.asarray(x)), _fp(np.asarray(y))),
    "equal": lambda x, y: np.equal(x, y),
    "greater_equal": lambda x, y: np.greater_equal(x, y),
    "less": lambda x, y: np.less(x, y),
    "select": _select,
    "linear": _linear,
    "matmul": _matmul,
    "layer_norm": _layer_norm,
    "softmax": _softmax,
    "gelu": _gelu,
    "silu": _silu,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-_fp(x))),
    "softplus": lambda x: np.logaddexp(0.0, _fp(x)),
    "tanh": lambda x: np.tanh(_fp(x)),
    "exp": lambda x: np.exp(_fp(x)),
    "sqrt": lambda x: np.sqrt(_fp(x)),
    "rsqrt": _rsqrt,
    "square": lambda x: _fp(x) ** 2,
    "neg": lambda x: -_fp(x),
    "abs": lambda x: np.abs(_fp(x)),
    "inverse": lambda x, epsilon=1e-4: 1.0 / (_fp(x) + float(epsilon)),
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "cast": _cast,
    "reshape": lambda x, shape: np.reshape(x, [int(s) for s in shape]),
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "expand_dims": lambda x, axes: np.expand_dims(x, _axes(axes, np.ndim(x) + len(np.atleast_1d(axes)))),
    "squeeze": lambda x, axes=None: np.squeeze(x, axis=None if axes is None else _axes(axes, np.ndim(x))),
    "tile": _tile,
    "concat": _concat,
    "split": lambda x, axis, split_sizes=None, num_splits=None: np.split(
        x, np.cumsum([int(s) for s in split_sizes])[:-1] if split_sizes is not None else int(num_splits), int(axis)),
    "gather": _gather,
    "slice_by_index": _slice_by_index,
    "slice_by_size": lambda x, begin, size: x[tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s))
                                                    for b, s in zip(begin, size))],
    "slice_update": _slice_update,
    "shape": lambda x: np.asarray(np.shape(x), dtype=np.int32),
    "fill_like": _fill_like,
    "range_1d": _range_1d,
    "identity": lambda x: x,
    "constexpr_affine_dequantize": _affine_dequantize,
    "constexpr_blockwise_shift_scale": _blockwise_shift_scale,
    "constexpr_lut_to_dense": _lut_to_dense,
}

_STATE_OPS = {"read_state", "coreml_update_state", "write_state"}
_STORAGE = {"FLOAT16": np.float16, "FLOAT32": np.float32, "INT32": np.int32, "INT16": np.int16, "INT8": np.int8,
            "UINT8": np.uint8, "UINT16": np.uint16, "BOOL": np.bool_, "INT64": np.int64}


def check_supported(program: Program) -> None:
    """Raise naming the first op type the interpreter lacks (before anything runs)."""
    unknown = sorted(program.op_types() - set(OPS) - _STATE_OPS - {"const"})
    if unknown:
        raise McqError(f"{program.path.name}: the Core ML reference interpreter has no implementation of op "
                       f"{', '.join(repr(op) for op in unknown)}")


# Constants (and decompressed weights) up to this size are kept between calls; larger ones are read from the
# weights file again by each call, so running a package holds its weights once, during the call, and running an
# LLM's packages one after the other never holds the whole model.
CACHED_CONSTANT_BYTES = 1 << 20


def read_by_rows(program: Program) -> set[str]:
    """Names of the stored weights (a const, or blockwise dequantization of stored data) that only gather ops read
    along axis 0, or linear ops as a weight too large to widen whole (`WHOLE_PRODUCT_ELEMENTS`): `RowsOnDemand`
    makes just the rows each lookup asks for, or each block of output rows as the product reaches it (the real
    vocabulary's LM head was 1.2 GB of fp16 beside its stored levels during each call)."""
    constants = {op.outputs[0][0]: op.attributes.get("val") for op in program.operations if op.type == "const"}

    def is_zero(bound: list) -> bool:
        kind, ref = bound[0]
        value = constants.get(ref) if kind == "var" else ref
        return isinstance(value, np.ndarray) and value.size == 1 and int(value) == 0

    # A blockwise dequantization qualifies when its data, scale and offset are bound to the op (RowsOnDemand reads
    # them by row), its data from the weights file.
    stored = {op.outputs[0][0]: op.attributes["val"] if op.type == "const" else op.inputs["data"][0][1]
              for op in program.operations
              if (op.type == "const" and isinstance(op.attributes.get("val"), StoredTensor))
              or (op.type == "constexpr_blockwise_shift_scale" and isinstance(op.inputs["data"][0][1], StoredTensor)
                  and all(bound[0][0] == "value" for bound in op.inputs.values()))}
    candidates = set(stored)
    for op in program.operations:
        for parameter, bound in op.inputs.items():
            for kind, ref in bound:
                if kind != "var" or ref not in candidates:
                    continue
                gathered = (op.type == "gather" and parameter == "x" and is_zero(op.inputs["axis"])
                            and is_zero(op.inputs.get("batch_dims", [("value", np.zeros(()))])))
                multiplied = (op.type == "linear" and parameter == "weight"
                              and math.prod(stored[ref].shape) > WHOLE_PRODUCT_ELEMENTS)
                if not (gathered or multiplied):
                    candidates.discard(ref)
    candidates -= set(program.outputs)   # a weight the program returns is made whole
    return candidates & set().union(*(
        {ref for kind, ref in op.inputs.get("x" if op.type == "gather" else "weight", []) if kind == "var"}
        for op in program.operations if op.type in ("gather", "linear")))


def _dead_after(program: Program) -> list[list[str]]:
    """For each op, the values no later op reads (its inputs read for the last time, its outputs never read), which
    a call frees once the op has run: a decoder package then holds each layer's dequantized weights only until its
    product, not all its layers' until the call returns. The program's outputs are kept."""
    last: dict[str, int] = {}
    for index, op in enumerate(program.operations):
        for name, _ in op.outputs:
            last[name] = index
        for bound in op.inputs.values():
            for kind, ref in bound:
                if kind == "var":
                    last[ref] = index
    dead: list[list[str]] = [[] for _ in program.operations]
    for name, index in last.items():
        if name not in program.outputs and name not in program.inputs and name not in program.states:
            dead[index].append(name)
    return dead


class Interpreter:
    """Runs a Program on numpy inputs; `state` holds the program's states between calls (a stateful LLM's cache)."""

    def __init__(self, program: Program):
        check_supported(program)
        self.program = program
        self._by_rows = read_by_rows(program)
        self._dead_after = _dead_after(program)
        self.state = {name: np.zeros(shape, dtype=_STORAGE[dtype]) for name, (dtype, shape) in program.states.items()}
        self._constants: dict[str, Any] = {}

    def reset_state(self) -> None:
        for value in self.state.values():
            value[...] = 0

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env: dict[str, Any] = {}
        for name, (dtype, shape) in self.program.inputs.items():
            if name not in inputs:
                raise McqError(f"{self.program.path.name}: input {name!r} is missing")
            value = np.asarray(inputs[name]).astype(_STORAGE[dtype])
            if len(value.shape) != len(shape) or any(d is not None and d != s for d, s in zip(shape, value.shape)):
                raise McqError(f"{self.program.path.name}: input {name!r} has shape {list(value.shape)}, the "
                               f"program declares {shape}")
            env[name] = value
        for name in self.state:
            env[name] = ("state", name)
        for op, dead in zip(self.program.operations, self._dead_after):
            self._run(op, env)
            for name in dead:
                env.pop(name, None)
        return {name: np.asarray(env[name]) for name in self.program.outputs}

    def _argument(self, bound: list[Any], env: dict[str, Any]) -> Any:
        values = [env[ref] if kind == "var" else materialized(ref) for kind, ref in bound]
        return values[0] if len(values) == 1 else values

    def _run(self, op: Operation, env: dict[str, Any]) -> None:
        if op.outputs and op.outputs[0][0] in self._by_rows:
            env[op.outputs[0][0]] = RowsOnDemand(op)
            return
        if op.type == "const":
            name = op.outputs[0][0]
            value = self._constants[name] if name in self._constants else materialized(op.attributes["val"])
            self._keep(name, value)
            env[name] = value
            return
        kwargs = {key: self._argument(bound, env) for key, bound in op.inputs.items()}
        if op.type == "read_state":
            result = np.array(self.state[kwargs["input"][1]], copy=True)
        elif op.type in ("coreml_update_state", "write_state"):
            # coreml_update_state(state, value) returns the new value; write_state(input, data) returns nothing.
            state_name = (kwargs.get("state") or kwargs["input"])[1]
            value = kwargs["value"] if "value" in kwargs else kwargs["data"]
            self.state[state_name][...] = np.asarray(value).astype(self.state[state_name].dtype)
            result = self.state[state_name].copy()
        else:
            if op.type.startswith("constexpr_") and op.outputs[0][0] in self._constants:
                env[op.outputs[0][0]] = self._constants[op.outputs[0][0]]
                return
            kwargs.update({key: materialized(value) for key, value in op.attributes.items() if key not in kwargs})
            try:
                result = OPS[op.type](**kwargs)
            except TypeError as err:
                raise McqError(f"interpreter: op {op.type!r} ({op.name}) has parameters it does not handle: "
                               f"{err}") from None
            except (ValueError, IndexError) as err:
                raise McqError(f"interpreter: op {op.type!r} ({op.name}) failed on its inputs: {err}") from None
        results = result if isinstance(result, (list, tuple)) and len(op.outputs) > 1 else [result]
        for (name, dtype), value in zip(op.outputs, results):
            if dtype in _STORAGE:
                value = np.asarray(value).astype(_STORAGE[dtype], copy=False)
            env[name] = value
            if op.type.startswith("constexpr_"):
                self._keep(name, value)

    def _keep(self, name: str, value: Any) -> None:
        if getattr(value, "nbytes", 0) <= CACHED_CONSTANT_BYTES:
            self._constants[name] = value

    def weights(self) -> dict[str, np.ndarray]:
        """Every weight as the program uses it: constexpr ops decompressed, by output name (for weight checks)."""
        env: dict[str, Any] = {}
        out = {}
        for op in self.program.operations:
            if op.type == "const" or op.type.startswith("constexpr_"):
                self._run(op, env)
                value = env[op.outputs[0][0]]
                if isinstance(value, RowsOnDemand):   # every row, read as lookups read them
                    value = env[op.outputs[0][0]] = value.rows(np.arange(value.shape[0]))
                if op.type.startswith("constexpr_") or isinstance(value, np.ndarray):
                    out[op.outputs[0][0]] = value
        return out
