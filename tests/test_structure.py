"""The house rules that code review alone keeps losing: data flows one way (docs/design.md: each layer imports only
from the layers before it, lazy imports inside functions included, and the shared base imports no layer), each
function lives in the layer it belongs to, and nothing defined is left unused."""

from __future__ import annotations

import ast
import re

from mcq_imports import PACKAGE, mcq_imports, mcq_modules  # tests/mcq_imports.py

# In data-flow order; `mcq.cli` sits on top of all of them, and vLLM's entry point (`vllm_plugin`, run by vLLM,
# imported by no layer) beside it.
LAYERS = ("models", "calibration", "quantize", "export", "validate", "reports", "build", "cli", "vllm_plugin")
BASE = ("errors", "outputs", "extras")


def _layer(module: str) -> int:
    """-1 for the base, else the position in LAYERS."""
    first = module.split(".")[1] if "." in module else ""
    return -1 if first in ("", *BASE) else LAYERS.index(first)


def test_every_import_goes_to_an_earlier_layer_or_the_base():
    wrong = []
    for name, path in sorted(mcq_modules().items()):
        own = _layer(name)
        for target in sorted(mcq_imports(name, path)):
            layer = _layer(target)
            # The package root registers the model with transformers (its one job besides the version).
            allowed = layer <= own if own >= 0 else (layer < 0 or (name == "mcq" and target == "mcq.models"))
            if not allowed:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_the_check_sees_a_lazy_import_of_a_later_layer():
    # mcq.export.gguf.api imports the calibration set inside a function only.
    assert "mcq.calibration" in mcq_imports("mcq.export.gguf.api", mcq_modules()["mcq.export.gguf.api"])
    assert _layer("mcq.build.api") > _layer("mcq.export.gguf") > _layer("mcq.models.loading") > _layer("mcq.outputs")


def test_only_the_commands_run_the_quantize_job():
    """`mcq.quantize.api` is the `mcq quantize` job; what other layers share (calibration sets, recipes) lives in
    its own module, so an exporter never depends on the quantize job."""
    importers = sorted(name for name, path in mcq_modules().items() if "mcq.quantize.api" in mcq_imports(name, path))
    assert [name for name in importers if not name.startswith(("mcq.build.", "mcq.cli"))] == []


# Called by a library, not by mcq: PreTrainedModel's and nn.Module's interface, coremltools' add_fp16_cast pass.
FRAMEWORK_HOOKS = {"get_output_embeddings", "set_output_embeddings", "extra_repr", "fp16_overflow",
                   # vLLM's processing info calls these (mcq.models.minicpmv4_6.vllm_plugin overrides them)
                   "get_hf_processor", "get_supported_mm_limits"}


def test_nothing_defined_is_unused():
    """Every function, method and class mcq defines is named somewhere besides its definition (mcq, its tests or
    the benchmarks)."""
    root = PACKAGE.parent
    sources = {path: path.read_text(encoding="utf-8") for folder in ("mcq", "tests", "benchmarks")
               for path in (root / folder).rglob("*.py")}
    words: dict[str, int] = {}
    for text in sources.values():
        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text):
            words[word] = words.get(word, 0) + 1
    unused = sorted(f"{path.relative_to(root)}: {node.name}" for path in PACKAGE.rglob("*.py")
                    for node in ast.walk(ast.parse(sources[path]))
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    and not node.name.startswith("__") and node.name not in FRAMEWORK_HOOKS
                    and words[node.name] < 2)
    assert unused == []


def test_no_version_branch_outside_the_model_families():
    """A release's facts live in its family's folder (`mcq/models/`); every other layer reads them from there, so
    adding a release touches no exporter, runner or command. No string constant in code (docstrings aside) outside
    `mcq/models/` names a release."""
    found = []
    for name, path in sorted(mcq_modules().items()):
        if name.startswith("mcq.models"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        found += [f"{name}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and re.fullmatch(r"\d\.\d", node.value)]
    assert found == []
