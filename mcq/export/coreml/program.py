"""Reading a saved Core ML ML-program (`.mlpackage`) without running it: its inputs, states, operations and
outputs from the protobuf in `Data/com.apple.CoreML/model.mlmodel`, its weights left in `weights/weight.bin` as
`StoredTensor`s that are read on first use.

The export reads its own packages back with it (the op list and weight sizes it reports, the physical minimum of an
int4 package); `mcq.validate.coreml` runs them (Core ML on macOS, the numpy interpreter elsewhere).
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

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """`read()[rows]` (rows along the first axis), reading only those rows from the file where each row is
        whole bytes of a type laid out plainly or as 4-bit pairs: an embedding lookup in a 151,748-row table reads
        its few rows, not the table."""
        return self.blobs.read_rows(self.file_name, self.offset, self.mil_type, list(self.shape), rows)


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


# Types whose rows `read_rows` reads alone (bits per value): laid out plainly, or two 4-bit values a byte.
_ROW_READ_BITS = {"FLOAT16": 16, "FLOAT32": 32, "INT8": 8, "UINT8": 8, "INT16": 16, "UINT16": 16, "INT32": 32,
                  "UINT32": 32, "INT4": 4, "UINT4": 4}

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
        return self._record(file_name, offset)[0]

    def _record(self, file_name: str, offset: int) -> tuple[int, int]:
        """(size, offset in the file) of the data of the blob at `offset`, checked to lie inside the file."""
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
        return size, data_offset

    def read_rows(self, file_name: str, offset: int, dtype: str, shape: list[int], rows: np.ndarray) -> np.ndarray:
        bits = _ROW_READ_BITS.get(dtype)
        row_elements = math.prod(shape[1:])
        if bits is None or row_elements * bits % 8:
            return self.read(file_name, offset, dtype, shape)[rows]
        row_bytes = row_elements * bits // 8
        size, data_offset = self._record(file_name, offset)
        if size < shape[0] * row_bytes:
            raise McqError(f"{self.path(file_name)}: the weight at offset {offset} is smaller than its shape")
        stored = np.memmap(self.path(file_name), dtype=np.uint8, mode="r", offset=data_offset,
                           shape=(shape[0], row_bytes))
        picked = np.array(stored[np.asarray(rows)])
        del stored
        if bits == 4:   # two values a byte, the first in the low half
            values = np.stack([picked & 0x0F, picked >> 4], axis=-1).reshape(len(picked), row_elements)
            if dtype == "INT4":
                values = (values.astype(np.int8) ^ 8) - 8
            return values.astype(_NUMPY_TYPES[dtype], copy=False).reshape([len(picked), *shape[1:]])
        return picked.view(_NUMPY_TYPES[dtype]).reshape([len(picked), *shape[1:]])

    def read(self, file_name: str, offset: int, dtype: str, shape: list[int]) -> np.ndarray:
        from coremltools.libmilstoragepython import _BlobStorageReader

        path = self.path(file_name)
        if dtype not in _BLOB_READERS:
            raise McqError(f"{self.package.name}: weights of type {dtype} cannot be read here")
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
