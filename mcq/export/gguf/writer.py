"""Writing GGUF files tensor by tensor, and re-quantizing them with libllama.

A file is written in gguf-py's streaming order (header, metadata, tensor table, then each tensor's data as it is
produced), and each tensor's data a block of rows at a time (`mcq.export.rows`: every GGML type encodes rows
independently), so memory holds one block of one tensor. The float types and the block types gguf-py implements
(Q8_0, Q4_0/1, Q5_0/1) are encoded here; K-quants and i-quants have no Python encoder, so those files are written
as F16 first and re-quantized by libllama's `llama_model_quantize` (llama-cpp-python), which applies llama.cpp's
own per-tensor mixes (Q4_K_M's Q6_K rows, its fallbacks) and takes mcq's importance matrix.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mcq.errors import McqError

from mcq.models.ggufspec import GgufTensor

# Encoded here (gguf-py); everything else llama.cpp knows goes through libllama.
PYTHON_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def known_types() -> list[str]:
    import gguf

    return sorted(name.removeprefix("MOSTLY_") for name in gguf.LlamaFileType.__members__
                  if name.startswith("MOSTLY_") and name != "MOSTLY_MXFP4_MOE") + ["F32"]


def check_type(name: str, what: str) -> str:
    upper = name.upper()
    if upper not in known_types():
        raise McqError(f"{what} {name!r} is not a type llama.cpp can apply; choose one of {', '.join(known_types())}")
    return upper


def file_type(name: str) -> int:
    import gguf

    return int(gguf.LlamaFileType.ALL_F32 if name == "F32" else gguf.LlamaFileType[f"MOSTLY_{name}"])


@dataclass(frozen=True)
class Placement:
    """How one tensor is stored, and why when it is not the file's type."""

    ggml_type: str
    fallback: str | None = None


def row_divides(shape: tuple[int, ...], block: int) -> bool:
    """GGUF blocks run along a row (the last numpy dimension, ggml's ne[0])."""
    return shape[-1] % block == 0


def place(tensor: GgufTensor, file_type_name: str) -> Placement:
    """The type of one tensor in a file of `file_type_name` (a Python type): vectors, tables that are not a
    `.weight` (the resampler's queries) and what the layout marks float32 stay F32 as llama.cpp's converters keep
    them, except the computed position table (F16); other matrices llama.cpp never quantizes (patch and position
    embeddings) are F16; a matrix whose rows no block of the type divides falls back to F16, as llama-quantize
    does."""
    import gguf

    if tensor.float32:
        return Placement("F32")
    if file_type_name != "F32" and not tensor.source and len(tensor.shape) == 2:
        # The resampler's position table: clip.cpp requires it but recomputes it at run time, so F32 (as the
        # legacy converter writes it) would spend 4900 x 4096 x 4 bytes (80 MB at 4.5 size) on values never read.
        return Placement("F16")
    if len(tensor.shape) == 1 or file_type_name == "F32" or not tensor.name.endswith(".weight"):
        return Placement("F32")
    if not tensor.quantizable:
        return Placement("F16")
    if file_type_name in ("F16", "BF16"):
        return Placement(file_type_name)
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[file_type_name]]
    if not row_divides(tensor.shape, block):
        return Placement("F16", f"rows of {tensor.shape[-1]} are not a multiple of {file_type_name}'s block of "
                                f"{block}")
    return Placement(file_type_name)


def _add_metadata(writer, metadata: dict[str, tuple[str, object]]) -> None:
    import gguf

    arrays = {"strs": gguf.GGUFValueType.STRING, "i32s": gguf.GGUFValueType.INT32,
              "f32s": gguf.GGUFValueType.FLOAT32, "bools": gguf.GGUFValueType.BOOL}
    scalars = {"str": writer.add_string, "u32": writer.add_uint32, "i32": writer.add_int32,
               "f32": writer.add_float32, "bool": writer.add_bool}
    for key, (kind, value) in metadata.items():
        if kind in arrays:
            writer.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=arrays[kind])
        else:
            scalars[kind](key, value)


def encode(data: np.ndarray, ggml_type: str) -> np.ndarray:
    import gguf

    if ggml_type == "F32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if ggml_type == "F16":
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType[ggml_type])


class _EncodedBlocks:
    """A tensor's encoded bytes as `GGUFWriter.write_tensor_data` takes an array (its size, then `tofile`), made
    block by block of rows as the file is written."""

    def __init__(self, tensor: GgufTensor, ggml_type: str, blocks: Iterable[np.ndarray]):
        import gguf

        self.tensor, self.ggml_type, self.blocks = tensor, ggml_type, blocks
        qtype = gguf.GGMLQuantizationType[ggml_type]
        self.nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(tensor.shape, qtype)))

    def tofile(self, out) -> None:
        rows = 0
        for block in self.blocks:
            if tuple(block.shape[1:]) != self.tensor.shape[1:]:
                raise McqError(f"{self.tensor.source or self.tensor.name} has rows of shape {tuple(block.shape[1:])},"
                               f" the GGUF layout expects {self.tensor.shape}")
            encode(block, self.ggml_type).tofile(out)
            rows += block.shape[0]
        if rows != self.tensor.shape[0]:
            raise McqError(f"{self.tensor.source or self.tensor.name} has {rows} rows, the GGUF layout expects "
                           f"{self.tensor.shape}")


def write_gguf(path: Path, arch: str, metadata: dict[str, tuple[str, object]], tensors: list[GgufTensor],
               placements: dict[str, Placement], data: Callable[[GgufTensor], Iterable[np.ndarray]],
               progress: Callable[[str], None] | None = None) -> None:
    """Write one GGUF file; `data(tensor)` gives a tensor's float values in its logical (numpy) shape, as
    consecutive blocks of rows."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    _add_metadata(writer, metadata)
    for tensor in tensors:
        qtype = gguf.GGMLQuantizationType[placements[tensor.name].ggml_type]
        byte_shape = gguf.quants.quant_shape_to_byte_shape(tensor.shape, qtype)
        writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                               raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in tensors:
        if progress:
            progress(tensor.name)
        writer.write_tensor_data(_EncodedBlocks(tensor, placements[tensor.name].ggml_type, data(tensor)))
    writer.close()


def llama_quantize(source: Path, out: Path, type_name: str, imatrix: dict[str, np.ndarray] | None,
                   threads: int) -> None:
    """Re-quantize a GGUF file with libllama (llama.cpp's `llama-quantize`), passing an importance matrix (GGUF
    tensor name → mean of x² per input column) when given."""
    import llama_cpp

    quiet_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type(type_name)
    params.nthread = threads
    keep_alive = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            array = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append(array)
            entries[i].name = name.encode()
            entries[i].data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = array.size
        entries[len(imatrix)].name = None   # the list ends with a NULL name
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_alive.append(entries)
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise McqError(f"llama.cpp could not quantize {source.name} to {type_name} (llama_model_quantize "
                       f"returned {code}; --debug shows its log)")


def stored_types(path: Path) -> dict[str, str]:
    """Tensor name → the GGML type a GGUF file stores it in."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}


def require_llama_cpp() -> None:
    """llama-cpp-python is an optional dependency (it builds llama.cpp from source): one line when it is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise McqError("K-quants, i-quants and running GGUF files need llama-cpp-python: "
                       "pip install 'minicpm-quant[gguf]'") from None


def quiet_llama_cpp() -> None:
    """libllama and libmtmd log every load and quantization to stderr; mcq prints its own summary. Failures still
    surface as failed calls, which become McqErrors. `mcq --debug` (MCQ_DEBUG=1, inherited by validate workers)
    keeps the logs."""
    import os

    import llama_cpp
    from llama_cpp import mtmd_cpp

    if os.environ.get("MCQ_DEBUG") == "1":
        return
    callback = llama_cpp.llama_log_callback(lambda _level, _text, _data: None)
    quiet_llama_cpp.callback = callback   # ctypes callbacks must outlive their registration
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(callback, ctypes.c_void_p(0))
