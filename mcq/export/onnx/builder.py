"""A small ONNX graph builder: nodes named after the module they compute, weights streamed to disk as made.

The graphs are written op by op (see `graphs.py`) rather than traced, so this module is the whole toolbox:
- `TensorStore` appends each weight's bytes to the graph's external-data file the moment it is made, so an
  export holds one tensor in memory at a time; `save_graph` then either folds the bytes back into the .onnx file
  (when the graph fits protobuf's 2 GiB limit, what most runtimes load fastest) or keeps them external;
- `GraphBuilder` gives every node a name in its scope (`llm.model.layers.3.self_attn/MatMul_2`), deduplicates
  small constants and records graph inputs and outputs. Names and order depend only on the model, so the same
  weights give the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from mcq import __version__
from mcq.errors import McqError

OPSET = 21   # LayerNormalization (17), Gelu with approximate="tanh" (20); onnxruntime ≥ 1.17 and -web run it
MS_DOMAIN = "com.microsoft"   # MatMulNBits
IR_VERSION = 10
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


class TensorStore:
    """Weights of one graph, their bytes appended to `data_path` as they are added."""

    def __init__(self, data_path: Path):
        self.data_path = Path(data_path)
        self._file = open(self.data_path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.dtype not in ONNX_DTYPES:
            raise TypeError(f"{name}: no ONNX type for {array.dtype}")
        proto = TensorProto(name=name, data_type=ONNX_DTYPES[array.dtype], dims=list(array.shape))
        data = array.tobytes()
        if len(data) < EXTERNAL_MIN_BYTES:
            proto.raw_data = data
            return proto
        align = PAGE_ALIGN if len(data) >= (1 << 20) else ALIGN
        padding = -self.offset % align
        self._file.write(b"\0" * padding)
        self.offset += padding
        self._file.write(data)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(self.offset)), ("length", str(len(data)))):
            proto.external_data.add(key=key, value=value)
        self.offset += len(data)
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
    weights fit under `INLINE_WEIGHTS_LIMIT` they are read back into the graph and the data file is removed.
    """
    store.close()
    external = store.offset > INLINE_WEIGHTS_LIMIT
    if not external:
        with open(store.data_path, "rb") as data:
            for tensor in model.graph.initializer:
                if tensor.data_location != TensorProto.EXTERNAL:
                    continue
                data.seek(int(external_field(tensor, "offset")))
                raw = data.read(int(external_field(tensor, "length")))
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
                tensor.raw_data = raw
        os.remove(store.data_path)
    size = model.ByteSize()
    if size > PROTOBUF_LIMIT:
        raise McqError(f"{path.name}: the graph is {size / 2**30:.2f} GiB without its external weights, over "
                       "protobuf's 2 GiB limit for one .onnx file; it cannot be saved")
    Path(path).write_bytes(model.SerializeToString())
    return external


class GraphBuilder:
    """Collects the nodes, inputs, outputs and initializers of one graph."""

    def __init__(self, name: str, store: TensorStore):
        self.name, self.store = name, store
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._scope: list[str] = []
        self._counts: dict[str, int] = {}
        self._constants: dict[tuple, str] = {}
        self._initializer_names: set[str] = set()
        self.uses_ms_domain = False

    # -- names -------------------------------------------------------------------------------------------------
    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _unique(self, base: str) -> str:
        # Scopes are full module names (`llm.model.layers.3.mlp.up_proj`), so only the innermost one names a node.
        key = f"{self._scope[-1]}/{base}" if self._scope else base
        count = self._counts.get(key, 0)
        self._counts[key] = count + 1
        return key if count == 0 else f"{key}_{count}"

    # -- values ------------------------------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        """Expose `value` as graph output `name` (the producing node is renamed, so no Identity is added)."""
        for node in reversed(self.nodes):
            if value in node.output:
                node.output[list(node.output).index(value)] = name
                break
        else:
            raise ValueError(f"no node produces {value}")
        for node in self.nodes:   # later consumers of the old name
            for i, item in enumerate(node.input):
                if item == value:
                    node.input[i] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A weight named as given (the model's parameter name, or one derived from it)."""
        if name in self._initializer_names:
            raise ValueError(f"initializer {name} added twice")
        self._initializer_names.add(name)
        self.initializers.append(self.store.tensor(name, array))
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A small constant (shapes, axes, scalars), shared by every node that uses the same value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            # Numbered in order of first use (deterministic); the value is in the name when short, for reading.
            value_text = "_".join(str(v) for v in array.flatten()) if array.size <= 4 else f"{array.size}values"
            self._constants[key] = self.weight(f"const_{len(self._constants)}_{array.dtype.name}_{value_text}", array)
        return self._constants[key]

    def op(self, op_type: str, *inputs: str, outputs: int = 1, domain: str = "", **attributes) -> str | list[str]:
        name = self._unique(op_type)
        names = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=name, domain=domain or None,
                                           **attributes))
        if domain == MS_DOMAIN:
            self.uses_ms_domain = True
        return names[0] if outputs == 1 else names

    # -- the model ---------------------------------------------------------------------------------------------
    def model(self, doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_ms_domain:
            opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="mcq", producer_version=__version__,
                                  doc_string=doc)
        model.ir_version = IR_VERSION
        return model
