"""What mcq's modules import, read from their source (lazy imports inside functions included): shared by the house
rules (`test_structure.py`) and the build's code keys (`build/test_keys.py`). tests/ is on sys.path through its
conftest.py (pytest's prepend import mode)."""

from __future__ import annotations

import ast
from pathlib import Path

import mcq

PACKAGE = Path(mcq.__file__).resolve().parent


def mcq_modules() -> dict[str, Path]:
    """Every module of the mcq package by dotted name (a package by its own name), with its file."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def mcq_imports(name: str, path: Path, known: dict[str, Path] | None = None) -> set[str]:
    """The mcq modules the module `name` (source `path`) imports anywhere in its file. With `known` (as
    `mcq_modules()` gives), `from package import submodule` names the submodule, and only known modules other than
    `name` itself are kept."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if known is None:
                found.add(base)
            else:
                found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                             for alias in node.names)
    if known is not None:
        return {module for module in found if module in known and module != name}
    return {module for module in found if module == "mcq" or module.startswith("mcq.")}
