"""ONNX export of MiniCPM-V (vision encoder + token embeddings + KV-cache decoder) and an onnxruntime runner.

`export_onnx` writes the onnx-community / transformers.js layout (see `api.py`); `OnnxMiniCPMV` runs it on plain
onnxruntime with the official chat API (`runtime.py`). Every family's graphs are traced from its runtime-neutral
torch programs (`Family.graphs`, `traced.py`); a family with a generic host (`Family.programs`: 4.6) is run by
`program_runtime.OnnxProgramModel`. int4 / int8 are MatMulNBits from mcq's calibrated weights or onnxruntime's
quantizer (`quantize.py`); weights are written as they are read (`store.py`).
"""

from .api import OnnxExportResult, export_onnx
from .runtime import OnnxMiniCPMV

__all__ = ["OnnxExportResult", "OnnxMiniCPMV", "export_onnx"]
