"""Core ML export (`mcq export --format coreml`): vision package for the Neural Engine, stateful LLM packages (run
and checked by `mcq.validate.coreml`)."""

from .api import CoremlExportResult, export_coreml

__all__ = ["CoremlExportResult", "export_coreml"]
