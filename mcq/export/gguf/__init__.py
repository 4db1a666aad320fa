"""GGUF export (llama.cpp / Ollama): the LLM file and the mmproj file, from a checkpoint or an mcq quantize output."""

from .api import GgufExportResult, export_gguf, write_calibration_imatrix

__all__ = ["GgufExportResult", "export_gguf", "write_calibration_imatrix"]
