"""The build's code keys cover the code each step runs: every mcq module a step's entry point imports (at the top or
inside a function) is under that step's `STEP_SOURCES`, so an edit to it cannot be answered with a stale variant."""

from __future__ import annotations

import pytest

from mcq.build.digest import STEP_SOURCES
from mcq_imports import PACKAGE, mcq_imports, mcq_modules  # tests/mcq_imports.py

# Where each cached thing's code starts.
ENTRY_POINTS = {
    "calibration": ["mcq.calibration", "mcq.build.calibration"],
    "quantize": ["mcq.quantize.api"],
    "gguf": ["mcq.export.gguf.api"],
    "onnx": ["mcq.export.onnx.api"],
    "coreml": ["mcq.export.coreml.api"],
    "validation": ["mcq.validate.api", "mcq.validate.worker"],
}
# Imports a step makes that the build never runs through, each with the reason (the build hands the step their
# result, keyed on its own code).
NOT_FOLLOWED = {
    "quantize": {("mcq.quantize.api", "mcq.calibration"): "the build passes the encoded calibration set"},
    "gguf": {("mcq.export.gguf.api", "mcq.calibration"): "the build passes the importance matrix as a file"},
    "onnx": {("mcq.export.onnx.runtime", "mcq.export.onnx.program_runtime"): "`mcq chat` on a traced export, which "
             "the export does not run", ("mcq.export.onnx.runtime", "mcq.export.generation"): "generation, which the "
             "export does not run"},
    "validation": {(f"mcq.validate.{runner}", target): "a runtime lives with its exporter, keyed with the "
                   "variant it wrote" for runner, target in [
                       ("runners.coreml_runner", "mcq.export.coreml.api"),
                       ("runners.coreml_runner", "mcq.export.coreml.program"), ("coreml.runtime", "mcq.export.coreml.api"),
                       ("coreml.runtime", "mcq.export.coreml.host"), ("coreml.runtime", "mcq.export.coreml.program"),
                       ("coreml.interpreter", "mcq.export.coreml.program"),
                       ("runners.gguf_runner", "mcq.export.gguf.writer"),
                       ("runners.onnx_runner", "mcq.export.onnx"), ("runners.onnx_runner", "mcq.export.onnx.store"),
                       ("runners.onnx_runner", "mcq.export.onnx.runtime"),
                       ("runners.onnx_runner", "mcq.export.onnx.program_runtime")]},
}
# Modules that cannot change what a step makes: the package root (the version is keyed on its own) and the
# exception class.
IGNORED = {"mcq", "mcq.errors"}


def _reached(step: str) -> set[str]:
    known = mcq_modules()
    skipped = NOT_FOLLOWED.get(step, {})
    seen, todo = set(), list(ENTRY_POINTS[step])
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [target for target in mcq_imports(module, known[module], known) if (module, target) not in skipped]
    return seen - IGNORED


def _covered(module: str, parts: tuple[str, ...]) -> bool:
    relative = mcq_modules()[module].relative_to(PACKAGE).as_posix()
    return any(relative == part or relative.startswith(part.rstrip("/") + "/") for part in parts)


@pytest.mark.parametrize("step", sorted(ENTRY_POINTS))
def test_step_sources_cover_every_module_the_step_imports(step):
    missing = sorted(module for module in _reached(step) if not _covered(module, STEP_SOURCES[step]))
    assert missing == [], f"{step} runs {missing}: add them to STEP_SOURCES[{step!r}] in mcq/build/digest.py"


def test_every_keyed_step_is_checked_and_names_real_sources():
    assert set(ENTRY_POINTS) == set(STEP_SOURCES)
    for parts in STEP_SOURCES.values():
        assert all((PACKAGE / part).exists() for part in parts), parts


def test_the_import_walk_sees_lazy_imports():
    """The check is only as good as the walk: a function-level import (how mcq defers torch) must be followed."""
    assert "mcq.calibration" in mcq_imports("mcq.export.gguf.api", mcq_modules()["mcq.export.gguf.api"],
                                         mcq_modules())
    assert not _covered("mcq.export.gguf.api", STEP_SOURCES["onnx"])
