"""Runners, one per runtime, and the format detection that picks one for a variant path."""

from __future__ import annotations

from pathlib import Path

from mcq.errors import McqError

from .base import Runner
from .coreml_runner import CoremlRunner
from .gguf_runner import GgufRunner
from .onnx_runner import OnnxRunner
from .transformers_runner import TransformersRunner

#: every runner mcq has, tried in order; runners for GGUF, ONNX and Core ML register here.
RUNNERS: list[type[Runner]] = [TransformersRunner, GgufRunner, OnnxRunner, CoremlRunner]


def detect_format(path: str | Path) -> tuple[str, type[Runner]]:
    """(format, runner class) of a variant path, or a one-line McqError naming what is supported."""
    text = str(path)
    if not text.startswith("tiny:") and not Path(text).exists():
        raise McqError(f"{text} does not exist")
    for runner in RUNNERS:
        found = runner.detect(text)
        if found:
            return found, runner
    supported = ", ".join(f for runner in RUNNERS for f in runner.formats)
    raise McqError(f"{text} is not in a format mcq validates ({supported})")


def runner_class(format_name: str) -> type[Runner]:
    for runner in RUNNERS:
        if format_name in runner.formats:
            return runner
    raise McqError(f"no runner serves format {format_name!r}")
