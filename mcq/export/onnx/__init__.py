"""ONNX export of MiniCPM-V (vision encoder + token embeddings + KV-cache decoder) and an onnxruntime runner.

`export_onnx` writes the onnx-community / transformers.js layout (see `api.py`); `OnnxMiniCPMV` runs it on plain
onnxruntime with the official chat API (`runtime.py`). The resampler family's graphs are written op by op
(`graphs.py`); a family with runtime-neutral torch programs (4.6) has them traced (`traced.py`) and run by
`program_runtime.OnnxProgramModel`. int4 / int8 are MatMulNBits from mcq's calibrated weights or onnxruntime's
quantizer (`quantize.py`).
"""

from .api import OnnxExportResult, export_onnx
from .runtime import OnnxMiniCPMV

__all__ = ["OnnxExportResult", "OnnxMiniCPMV", "export_onnx"]
