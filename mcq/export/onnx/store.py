"""The weights of an ONNX graph, streamed to disk as they are made, and the graph saved with them.

`TensorStore` appends each weight's bytes to the graph's external-data file the moment it is made, so an export
holds one tensor in memory at a time (a large one, `Rows`, not even that: a block of rows at a time); `save_graph`
then either folds the bytes back into the .onnx file (when the graph fits protobuf's 2 GiB limit, what most
runtimes load fastest: the file is written in protobuf's wire format with each weight copied from the data file,
never a whole serialized model in memory) or keeps them external. The weights are written in the order the graph
reads them, so the same weights give the same bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from mcq.errors import McqError

MS_DOMAIN = "com.microsoft"   # MatMulNBits
# protobuf refuses to serialize a message of 2 GiB or more; weights beyond this stay in the external-data file.
PROTOBUF_LIMIT = 2**31 - 1
# Weights are folded into the .onnx file when their total leaves this much room for the graph itself.
INLINE_WEIGHTS_LIMIT = PROTOBUF_LIMIT - (64 << 20)
# Tensors smaller than this stay inside the graph even when the rest is external (onnx.save's default threshold).
EXTERNAL_MIN_BYTES = 1024
# Alignment of large tensors in the data file: page-aligned offsets let onnxruntime memory-map them.
PAGE_ALIGN, ALIGN = 4096, 64

ONNX_DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


@dataclass(frozen=True)
class Rows:
    """A weight too large to hold twice (an embedding table, lm_head), produced as consecutive blocks of rows:
    `blocks()` yields arrays of `dtype` whose first dimensions add up to `shape[0]`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Callable[[], Iterator[np.ndarray]]


class TensorStore:
    """Weights of one graph, their bytes appended to `data_path` as they are added."""

    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self._file = open(self.data_path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray | Rows) -> TensorProto:
        if not isinstance(array, Rows):
            array = np.ascontiguousarray(array)
        dtype, shape = np.dtype(array.dtype), tuple(array.shape)
        if dtype not in ONNX_DTYPES:
            raise TypeError(f"{name}: no ONNX type for {dtype}")
        proto = TensorProto(name=name, data_type=ONNX_DTYPES[dtype], dims=list(shape))
        size = math.prod(shape) * dtype.itemsize
        if size < EXTERNAL_MIN_BYTES:
            proto.raw_data = array.tobytes() if not isinstance(array, Rows) else \
                b"".join(np.ascontiguousarray(block).tobytes() for block in array.blocks())
            return proto
        align = PAGE_ALIGN if size >= (1 << 20) else ALIGN
        padding = -self.offset % align
        self._file.write(b"\0" * padding)
        self.offset += padding
        written = 0
        for block in (array.blocks() if isinstance(array, Rows) else (array,)):
            block = np.ascontiguousarray(block, dtype=dtype)
            if block.shape[1:] != shape[1:]:
                raise ValueError(f"{name}: a block of shape {block.shape} in a tensor of shape {shape}")
            self._file.write(block.data)
            written += block.nbytes
        if written != size:
            raise ValueError(f"{name}: {written} bytes written for a tensor of {size}")
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(self.offset)), ("length", str(size))):
            proto.external_data.add(key=key, value=value)
        self.offset += size
        return proto

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def external_field(tensor: TensorProto, key: str) -> str:
    """One entry (`location`, `offset`, `length`) of an initializer stored as external data."""
    return next(entry.value for entry in tensor.external_data if entry.key == key)


def save_graph(model: onnx.ModelProto, path: Path, store: TensorStore) -> bool:
    """Write `model` to `path`; returns whether its weights stay in the external-data file beside it.

    The data file is `store.data_path` (named `<graph>.onnx_data`, the name transformers.js looks for). When the
    weights fit under `INLINE_WEIGHTS_LIMIT` they are copied into the graph file as it is written and the data file
    is removed.
    """
    store.close()
    external = store.offset > INLINE_WEIGHTS_LIMIT
    size = model.ByteSize()
    if external:
        if size > PROTOBUF_LIMIT:
            raise McqError(f"{path.name}: the graph is {size / 2**30:.2f} GiB without its external weights, over "
                           "protobuf's 2 GiB limit for one .onnx file; it cannot be saved")
        Path(path).write_bytes(model.SerializeToString())
    else:
        _write_inline(model, Path(path), store.data_path)
        os.remove(store.data_path)
    return external


# -- protobuf wire format, for the inline file --------------------------------------------------------------------
# A message serializes as its set fields in field-number order; a sub-message or bytes field is its tag, its length
# as a varint, then its bytes. So a model whose weights are inline is: the model's fields before `graph`, the graph
# (its fields before `initializer`, each initializer with its `raw_data`, its fields after), the model's fields
# after `graph`. Each part but the weights' bytes is serialized by protobuf itself (tests compare the whole file
# with `SerializeToString` of the folded model).
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_COPY_CHUNK = 16 << 20


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field: int, length: int) -> bytes:
    return _varint(field << 3 | 2) + _varint(length)


def _split(message, field: int) -> tuple[bytes, bytes]:
    """The serialized fields of `message` numbered below `field`, and those above it."""
    before, after = type(message)(), type(message)()
    before.CopyFrom(message)
    after.CopyFrom(message)
    for descriptor, _ in message.ListFields():
        if descriptor.number >= field:
            before.ClearField(descriptor.name)
        if descriptor.number <= field:
            after.ClearField(descriptor.name)
    return before.SerializeToString(), after.SerializeToString()


def _inline_tensor(tensor: TensorProto) -> tuple[bytes, int, int, bytes]:
    """(serialized fields before raw_data, data offset, data length, fields after) of an external initializer."""
    inline = TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT   # set, as folding the tensor in memory sets it (same bytes)
    before, after = _split(inline, _TENSOR_RAW_DATA)
    return before, int(external_field(tensor, "offset")), int(external_field(tensor, "length")), after


def _write_inline(model: onnx.ModelProto, path: Path, data_path: Path) -> None:
    graph = model.graph
    pieces = []      # per initializer: serialized bytes, or (before, offset, length, after) of an external one
    for tensor in graph.initializer:
        pieces.append(_inline_tensor(tensor) if tensor.data_location == TensorProto.EXTERNAL
                      else tensor.SerializeToString())

    def piece_size(piece) -> int:
        if isinstance(piece, bytes):
            return len(piece)
        before, _, length, after = piece
        return len(before) + len(_length_delimited(_TENSOR_RAW_DATA, length)) + length + len(after)

    graph_before, graph_after = _split(graph, _GRAPH_INITIALIZER)
    graph_size = len(graph_before) + len(graph_after) + sum(
        len(_length_delimited(_GRAPH_INITIALIZER, piece_size(p))) + piece_size(p) for p in pieces)
    model_before, model_after = _split(model, _MODEL_GRAPH)
    header = _length_delimited(_MODEL_GRAPH, graph_size)
    total = len(model_before) + len(header) + graph_size + len(model_after)
    if total > PROTOBUF_LIMIT:
        raise McqError(f"{path.name}: the graph is {total / 2**30:.2f} GiB with its weights inline, over protobuf's "
                       "2 GiB limit for one .onnx file; it cannot be saved")
    with open(path, "wb") as out, open(data_path, "rb") as data:
        out.write(model_before + header + graph_before)
        for piece in pieces:
            out.write(_length_delimited(_GRAPH_INITIALIZER, piece_size(piece)))
            if isinstance(piece, bytes):
                out.write(piece)
                continue
            before, offset, length, after = piece
            out.write(before + _length_delimited(_TENSOR_RAW_DATA, length))
            data.seek(offset)
            while length:
                chunk = data.read(min(length, _COPY_CHUNK))
                if not chunk:
                    raise McqError(f"{data_path.name} ended before the weights it holds for {path.name}")
                out.write(chunk)
                length -= len(chunk)
            out.write(after)
        out.write(graph_after + model_after)
