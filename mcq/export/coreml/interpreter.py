"""A small numpy interpreter of Core ML ML-programs, for checking saved `.mlpackage`s numerically on Linux.

coremltools on Linux can convert and save but not predict (the Core ML framework is macOS only), so the tests
would otherwise compare nothing past the torch wrapper. This reads the program exactly as saved — the protobuf
in `Data/com.apple.CoreML/model.mlmodel` and the weights in `weights/weight.bin` — and runs it op by op.

It implements only the MIL ops mcq's exports contain, and refuses any other op by name before running anything,
so a converter change that brings a new op shows up as a clear error instead of a silent skip. Arithmetic follows
the declared types: a value typed fp16 is rounded to float16 after every op (the op itself is computed in
float32, as the Neural Engine and GPU accumulate in wider precision than they store), so fp16 overflow and
rounding show up here as they would on a device.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mcq.errors import McqError

_MODEL_FILE = Path("Data/com.apple.CoreML/model.mlmodel")
_WEIGHTS_DIR = Path("Data/com.apple.CoreML")

# MIL DataType enum value → (numpy storage dtype, blob reader method). Sub-byte types come unpacked as uint8.
_NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_, "FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "INT4": np.int8,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "UINT1": np.uint8, "UINT2": np.uint8, "UINT3": np.uint8, "UINT4": np.uint8, "UINT6": np.uint8,
}
_BLOB_READERS = {
    "FLOAT16": "read_fp16_data", "FLOAT32": "read_float_data", "INT8": "read_int8_data", "UINT8": "read_uint8_data",
    "INT16": "read_int16_data", "UINT16": "read_uint16_data", "INT32": "read_int32_data",
    "UINT32": "read_uint32_data", "INT4": "read_int4_data", "UINT4": "read_uint4_data", "UINT1": "read_uint1_data",
    "UINT2": "read_uint2_data", "UINT3": "read_uint3_data", "UINT6": "read_uint6_data",
}


@dataclass(frozen=True)
class StoredTensor:
    """A constant kept in a weights file: its type and shape come from the program, its values are read on first
    use, so loading a program (or sizing its weights) never holds all of an 8B model's weights in memory."""

    blobs: "_BlobFiles" = field(repr=False, compare=False)
    file_name: str
    offset: int
    mil_type: str
    shape: tuple[int, ...]
    nbytes: int                        # what the data takes in the file (sub-byte types packed)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_NUMPY_TYPES[self.mil_type])

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def read(self) -> np.ndarray:
        return self.blobs.read(self.file_name, self.offset, self.mil_type, list(self.shape))


def materialized(value: Any) -> Any:
    """A bound value as an array (a StoredTensor read from its file; anything else as it is)."""
    return value.read() if isinstance(value, StoredTensor) else value


@dataclass
class Operation:
    type: str
    name: str
    inputs: dict[str, list[Any]]       # parameter → bound values: ("var", name) or ("value", array | StoredTensor)
    outputs: list[tuple[str, str]]     # (name, declared MIL dtype name)
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Program:
    """The `main` function of a saved ML-program: its inputs, operations in order, outputs and states."""

    path: Path
    target: str                        # opset of main, e.g. "CoreML8" (= iOS18)
    inputs: dict[str, tuple[str, list[int | None]]]
    states: dict[str, tuple[str, list[int]]]
    operations: list[Operation]
    outputs: list[str]

    def op_types(self) -> set[str]:
        return {op.type for op in self.operations}

    def stored(self) -> list[tuple[str, StoredTensor]]:
        """Every weight kept in a weights file (unread), named by what it makes: a const's output, or the output of
        the constexpr op (dequantization, palette) it feeds, since an op's bound inputs have no name of their own."""
        found = []
        for op in self.operations:
            bound = [op.attributes.get("val")] if op.type == "const" else \
                [ref for values in op.inputs.values() for kind, ref in values if kind == "value"]
            found += [(op.outputs[0][0], value) for value in bound if isinstance(value, StoredTensor)]
        return found


def load_program(package: str | Path) -> Program:
    """Parse a saved `.mlpackage` (nothing is run). Weights stay in their file as `StoredTensor`s, each checked to
    lie whole inside it, so a truncated package is refused here, naming the file, rather than mid-run."""
    from coremltools.proto import MIL_pb2, Model_pb2

    from google.protobuf.message import DecodeError

    package = Path(package)
    model_file = package / _MODEL_FILE
    if not model_file.is_file():
        raise McqError(f"{package} is not an ML-program package (no {_MODEL_FILE})")
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(model_file.read_bytes())
    except DecodeError as err:
        raise McqError(f"{model_file} is not a readable Core ML model (truncated or corrupt: {err})") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise McqError(f"{package} holds a {spec.WhichOneof('Type')} model; only ML programs are interpreted")
    if "main" not in spec.mlProgram.functions:
        raise McqError(f"{model_file} has no `main` function (truncated or corrupt)")
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    blobs = _BlobFiles(package)
    dtype_name = MIL_pb2.DataType.Name

    def decode_value(value) -> Any:
        if value.HasField("blobFileValue"):
            tensor, blob = value.type.tensorType, value.blobFileValue
            return StoredTensor(blobs, blob.fileName, blob.offset, dtype_name(tensor.dataType),
                                tuple(d.constant.size for d in tensor.dimensions), blobs.data_size(blob.fileName,
                                                                                                  blob.offset))
        return _immediate(value, dtype_name)

    operations = []
    for op in block.operations:
        inputs = {}
        for parameter, argument in op.inputs.items():
            inputs[parameter] = [("var", binding.name) if binding.WhichOneof("binding") == "name"
                                 else ("value", decode_value(binding.value)) for binding in argument.arguments]
        attributes = {key: decode_value(value) for key, value in op.attributes.items() if key != "name"}
        name = op.attributes["name"].immediateValue.tensor.strings.values[0] if "name" in op.attributes else ""
        outputs = [(out.name, dtype_name(out.type.tensorType.dataType) if out.type.HasField("tensorType") else "STATE")
                   for out in op.outputs]
        operations.append(Operation(op.type, name, inputs, outputs, attributes))
    program_inputs, states = {}, {}
    for named in function.inputs:
        if named.type.HasField("stateType"):
            tensor = named.type.stateType.wrappedType.tensorType
            states[named.name] = (dtype_name(tensor.dataType), [d.constant.size for d in tensor.dimensions])
        else:
            tensor = named.type.tensorType
            program_inputs[named.name] = (dtype_name(tensor.dataType),
                                          [d.constant.size if d.HasField("constant") else None
                                           for d in tensor.dimensions])
    return Program(package, function.opset, program_inputs, states, operations, list(block.outputs))


# A weights file (MIL blob storage) holds, at each blob's offset, a 64-byte record that starts with this sentinel,
# the blob's MIL type, its size in bytes and the offset of its data (little endian).
_BLOB_RECORD = struct.Struct("<IIQQ")
_BLOB_SENTINEL = 0xDEADBEEF


class _BlobFiles:
    def __init__(self, package: Path):
        self.package, self.readers, self.sizes = package, {}, {}

    def path(self, file_name: str) -> Path:
        return self.package / _WEIGHTS_DIR / file_name.replace("@model_path/", "")

    def data_size(self, file_name: str, offset: int) -> int:
        """Bytes of the blob at `offset`, after checking that its record and data lie inside the file (so a truncated
        or foreign weights file is refused when the program is loaded, naming the file)."""
        path = self.path(file_name)
        if path not in self.sizes:
            if not path.is_file():
                raise McqError(f"{path} is missing (the program's weights file)")
            self.sizes[path] = path.stat().st_size
        with open(path, "rb") as file:
            file.seek(offset)
            record = file.read(_BLOB_RECORD.size)
        if len(record) < _BLOB_RECORD.size:
            raise McqError(f"{path} is truncated: the program has a weight at offset {offset}, past its end")
        sentinel, _, size, data_offset = _BLOB_RECORD.unpack(record)
        if sentinel != _BLOB_SENTINEL or data_offset + size > self.sizes[path]:
            raise McqError(f"{path} is truncated or corrupt: no whole weight at offset {offset}")
        return size

    def read(self, file_name: str, offset: int, dtype: str, shape: list[int]) -> np.ndarray:
        from coremltools.libmilstoragepython import _BlobStorageReader

        path = self.path(file_name)
        if dtype not in _BLOB_READERS:
            raise McqError(f"{self.package.name}: weights of type {dtype} cannot be read by the interpreter")
        try:
            if path not in self.readers:
                self.readers[path] = _BlobStorageReader(str(path))
            data = np.asarray(getattr(self.readers[path], _BLOB_READERS[dtype])(offset))
        except (RuntimeError, ValueError) as err:    # the reader's own errors: unreadable or changed since loading
            raise McqError(f"{path}: cannot read the weight at offset {offset} ({err})") from None
        count = int(np.prod(shape)) if shape else 1
        data = data[:count]
        if dtype == "FLOAT16":   # the reader hands fp16 out as its uint16 bit patterns
            return data.view(np.float16).reshape(shape)
        return data.astype(_NUMPY_TYPES[dtype], copy=False).reshape(shape)


def _immediate(value, dtype_name: Callable[[int], str]) -> Any:
    immediate = value.immediateValue
    kind = immediate.WhichOneof("value")
    if kind == "tensor":
        tensor_type = value.type.tensorType
        dtype = dtype_name(tensor_type.dataType)
        which = immediate.tensor.WhichOneof("value")
        if which == "bytes":   # fp16 and 8-bit immediates are stored as one packed byte string
            return np.frombuffer(immediate.tensor.bytes.values, dtype=_NUMPY_TYPES[dtype]).reshape(
                [d.constant.size for d in tensor_type.dimensions])
        raw = list(getattr(immediate.tensor, which).values) if which else []
        if dtype == "STRING":
            return raw[0] if tensor_type.rank == 0 else raw
        shape = [d.constant.size for d in tensor_type.dimensions]
        return np.asarray(raw, dtype=_NUMPY_TYPES[dtype]).reshape(shape)
    if kind == "list":
        return [_immediate(element, dtype_name) for element in immediate.list.values]
    raise McqError(f"unsupported immediate value kind {kind!r} in the program")


# -- ops -------------------------------------------------------------------------------------------------------------

def _fp(x: np.ndarray) -> np.ndarray:
    """Float values widened for computation (fp16 inputs are computed in float32)."""
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _axes(axes, rank: int) -> tuple[int, ...]:
    return tuple(int(a) % rank for a in np.atleast_1d(axes))


def _linear(x, weight, bias=None):
    out = _fp(x) @ _fp(weight).T
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


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if int(batch_dims) != 0:
        raise McqError("interpreter: gather with batch_dims is not implemented")
    indices = np.asarray(indices).astype(np.int64)
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


def _affine_dequantize(quantized_data, zero_point, scale, axis):
    """iOS16 per-channel (or per-tensor) linear dequantization: (q - zero_point) * scale along `axis`."""
    shape = [1] * quantized_data.ndim
    axis = int(axis) % quantized_data.ndim
    zero = np.asarray(zero_point).astype(np.float32)
    scales = np.asarray(scale).astype(np.float32)
    if zero.ndim == 1:
        shape[axis] = zero.shape[0]
        zero = zero.reshape(shape)
    if scales.ndim == 1:
        shape[axis] = scales.shape[0]
        scales = scales.reshape(shape)
    return (quantized_data.astype(np.float32) - zero) * scales


def _expand_blocks(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block tensor (same rank as the weight, each dim dividing it) up to the weight's shape."""
    for axis, (have, want) in enumerate(zip(values.shape, shape)):
        if have != want:
            values = np.repeat(values, want // have, axis=axis)
    return values


def _blockwise_shift_scale(data, scale, offset=None):
    """iOS18 blockwise dequantization: (data - offset) * scale, each scale covering one block of the weight."""
    values = data.astype(np.float32)
    if offset is not None:
        values = values - _expand_blocks(np.asarray(offset).astype(np.float32), data.shape)
    return values * _expand_blocks(np.asarray(scale).astype(np.float32), data.shape)


def _lut_to_dense(indices, lut, shape=None, vector_axis=None):
    """Palettized weights. iOS16 form: flat `lut` [2^n] with bit-packed `indices` and `shape`. iOS18 form:
    `indices` [shape] and `lut` [blocks per dim..., 2^n, 1] (one table per block)."""
    if shape is not None:   # iOS16: indices come as the packed uint8 byte stream
        shape = [int(s) for s in shape]
        count, bits = int(np.prod(shape)), int(round(math.log2(lut.shape[0])))
        unpacked = np.unpackbits(np.asarray(indices, dtype=np.uint8), bitorder="little")
        levels = unpacked[: count * bits].reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits))
        return _fp(lut)[levels].reshape(shape)
    if vector_axis is not None or lut.shape[-1] != 1:
        raise McqError("interpreter: vector palettization (cluster_dim > 1) is not implemented")
    indices = np.asarray(indices).astype(np.int64)
    tables = _fp(lut)[..., 0]                        # [blocks..., 2^n]
    out = np.empty(indices.shape, dtype=np.float32)
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


class Interpreter:
    """Runs a Program on numpy inputs; `state` holds the program's states between calls (a stateful LLM's cache)."""

    def __init__(self, program: Program):
        check_supported(program)
        self.program = program
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
        for op in self.program.operations:
            self._run(op, env)
        return {name: np.asarray(env[name]) for name in self.program.outputs}

    def _argument(self, bound: list[Any], env: dict[str, Any]) -> Any:
        values = [env[ref] if kind == "var" else materialized(ref) for kind, ref in bound]
        return values[0] if len(values) == 1 else values

    def _run(self, op: Operation, env: dict[str, Any]) -> None:
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
                value = np.asarray(value).astype(_STORAGE[dtype])
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
                if op.type.startswith("constexpr_") or isinstance(env[op.outputs[0][0]], np.ndarray):
                    out[op.outputs[0][0]] = env[op.outputs[0][0]]
        return out
