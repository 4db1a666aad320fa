"""Core ML export (`mcq export --format coreml`): vision package for the Neural Engine, stateful LLM package, and a
numpy reference interpreter that checks saved packages on Linux."""

from .api import CoremlExportResult, export_coreml

__all__ = ["CoremlExportResult", "export_coreml"]
