"""Runners, one per runtime, and the format detection that picks one for a variant path."""

from __future__ import annotations

from pathlib import Path

from mcq.errors import McqError

from .base import Runner
from .coreml_runner import CoremlRunner
from .gguf_runner import GgufRunner
from .onnx_runner import OnnxRunner
from .transformers_runner import TransformersRunner
from .vllm_runner import VllmRunner

#: the runner of each format by default, tried in order by `detect_format`
RUNNERS: list[type[Runner]] = [TransformersRunner, GgufRunner, OnnxRunner, CoremlRunner]
#: every runtime by name (`mcq validate --runtime`): the defaults, and vLLM for the formats it serves
RUNTIMES: dict[str, type[Runner]] = {runner.name: runner for runner in [*RUNNERS, VllmRunner]}


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


def runtime_runner(path: str | Path, runtime: str) -> tuple[str, type[Runner]]:
    """(format, runner class) of a variant run in the runtime named `runtime` ("auto": the format's own)."""
    format_name, runner = detect_format(path)
    if runtime == "auto":
        return format_name, runner
    chosen = RUNTIMES.get(runtime)
    if chosen is None:
        raise McqError(f"--runtime {runtime}: unknown runtime; runtimes: auto, {', '.join(RUNTIMES)}")
    if chosen.detect(str(path)) != format_name:
        raise McqError(f"--runtime {runtime} does not serve {path} ({format_name}); it serves "
                       f"{', '.join(chosen.formats)}")
    return format_name, chosen


def runner_class(format_name: str) -> type[Runner]:
    for runner in RUNNERS:
        if format_name in runner.formats:
            return runner
    raise McqError(f"no runner serves format {format_name!r}")
