"""Every output directory mcq writes (quantized variants, and later GGUF / ONNX / Core ML exports) goes through here.

The rules, in one place:
- `check_output` refuses bad destinations before any work starts (exists without force, unwritable parent, inside
  the source model, or the source inside it);
- `staged_output` builds the output in a hidden sibling directory (same filesystem) and renames it into place only
  when everything succeeded, so an error or Ctrl-C never leaves a half-written output, and a replaced output is
  moved aside rather than deleted until the new one is in place;
- `write_manifest` records what produced the output (versions, input and output hashes, recipe, settings) and
  `write_model_card` writes the README.md the Hugging Face Hub reads. Both are deterministic: the same inputs give
  the same bytes (no timestamps, no absolute paths).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from mcq import __version__
from mcq.errors import McqError

MANIFEST_NAME = "mcq-manifest.json"
MODEL_CARD_NAME = "README.md"

# Distributions whose versions decide what an output holds; the optional ones are listed when installed. Read from
# package metadata so that writing a manifest never imports (and initialises) torch, onnxruntime or coremltools.
REQUIRED_TOOLS = ("torch", "transformers", "safetensors", "tokenizers")
OPTIONAL_TOOLS = ("llmcompressor", "compressed-tensors", "bitsandbytes", "accelerate", "gguf", "onnx", "onnxruntime",
                  "onnxscript", "coremltools")

_HASH_CHUNK = 1 << 20  # weights are many GB: hash them in 1 MiB reads, never whole


# -- destination checks and atomic writing -----------------------------------------------------------------------

def check_output(out: Path, force: bool, source: Path | None = None) -> None:
    """Fail before any work if `out` cannot (or must not) receive a new output directory."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise McqError(f"output {out} exists and is not a directory; choose another output path")
        if not force:
            raise McqError(f"output {out} already exists (pass --force to replace it)")
    if source is not None:
        resolved_out, resolved_source = out.resolve(), Path(source).resolve()
        if resolved_out == resolved_source or resolved_out.is_relative_to(resolved_source):
            raise McqError(f"output {out} is inside the source model {source}; write it somewhere else")
        if resolved_source.is_relative_to(resolved_out):
            # Replacing `out` would delete the source model with it.
            raise McqError(f"the source model {source} is inside the output {out}; write it somewhere else")
    _check_parent_writable(out)


def _check_parent_writable(out: Path) -> None:
    # The parent may not exist yet (it is created on write): check the closest ancestor that does.
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise McqError(f"cannot create output {out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise McqError(f"cannot create output {out}: {ancestor} is not writable")


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty staging directory beside `out`; on success it becomes `out`, on any exception (Ctrl-C
    included) it is removed and the exception propagates. An existing `out` is replaced only with `force`.
    Commands that read a model call `check_output(out, force, source=...)` first, before any slow work."""
    # Normalized so that `.` or `x/..` get a real name and parent (the staging directory goes beside, not inside).
    out = Path(os.path.abspath(out))
    check_output(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Beside `out`, so the final rename stays on one filesystem (atomic, no copy); hidden so that a listing
        # of the parent does not show a half-built output as if it were one.
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as err:
        raise McqError(f"cannot create output {out}: {err.strerror or err}") from None
    try:
        yield staging
        _normalize_permissions(staging)
        _move_into_place(staging, out, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _current_umask() -> int:
    umask = os.umask(0)   # reading the umask means setting it: put it straight back
    os.umask(umask)
    return umask


def write_file_atomically(out: Path, text: str, force: bool) -> None:
    """Write a single-file output (a results JSON): refused if `out` exists without `force`, written to a hidden
    temporary file beside it and renamed into place, so a reader never sees half a file."""
    out = Path(os.path.abspath(out))
    if out.is_dir():
        raise McqError(f"output {out} is a directory; name a file")
    if out.exists() and not force:
        raise McqError(f"output {out} already exists (pass --force to replace it)")
    _check_parent_writable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as err:
        raise McqError(f"cannot create output {out}: {err.strerror or err}") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(temporary, 0o666 & ~_current_umask())   # mkstemp makes it owner-only; give it a plain open's mode
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _normalize_permissions(root: Path) -> None:
    """mkdtemp makes the directory owner-only (0700) and some writers (safetensors) leave files 0600; give every
    entry the mode a plain mkdir/open would have under the current umask."""
    umask = _current_umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    root.chmod(dir_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            if not Path(dirpath, name).is_symlink():  # chmod would follow it out of the output
                Path(dirpath, name).chmod(dir_mode)
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            executable = path.stat().st_mode & 0o100
            path.chmod(dir_mode if executable else file_mode)


def _move_into_place(staging: Path, out: Path, force: bool) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    if not force:  # it appeared while we were working
        raise McqError(f"output {out} already exists (pass --force to replace it)")
    # Move the old output aside, put the new one in place, then delete the old one: at every instant one of the two
    # is complete on disk (a crash between the renames leaves the old output under the hidden `.replaced` name).
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".replaced", dir=out.parent))
    os.rename(out, aside / out.name)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside / out.name, out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


# -- sizes ---------------------------------------------------------------------------------------------------------

# Files of a source checkpoint that are not carried into an output: the weights (rewritten), config.json (rewritten
# with the output's quantization), and the files that describe the source itself (its card, its manifest).
_NOT_CARRIED = {"config.json", "model.safetensors.index.json", MODEL_CARD_NAME, MANIFEST_NAME}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def copy_support_files(source: Path, out: Path) -> list[str]:
    """Tokenizer, processor and generation configs, chat template, the release's code files: every file of the
    source an output needs beside its weights. Returns the names copied."""
    copied = []
    for file in sorted(Path(source).iterdir()):
        name = file.name
        if not file.is_file() or name.startswith(".") or name in _NOT_CARRIED or name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copyfile(file, Path(out) / name)
        copied.append(name)
    return copied


def directory_bytes(path: Path) -> int:
    """Bytes of all regular files under `path` (symlinks not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            file = Path(dirpath, name)
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def format_component_bytes(before: dict[str, int], after: dict[str, int]) -> str:
    """A markdown table of bytes per component before and after, with the ratio (for model cards and summaries)."""
    rows = ["| component | before (bytes) | after (bytes) | after / before |", "| --- | ---: | ---: | ---: |"]
    names = list(before) + [name for name in after if name not in before]
    for name in [*names, "total"]:
        first = sum(before.values()) if name == "total" else before.get(name, 0)
        second = sum(after.values()) if name == "total" else after.get(name, 0)
        ratio = f"{second / first:.3f}" if first else "-"
        rows.append(f"| {name} | {first:,} | {second:,} | {ratio} |")
    return "\n".join(rows)


# -- manifest ------------------------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in REQUIRED_TOOLS + OPTIONAL_TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if name in REQUIRED_TOOLS:
                versions[name] = "not installed"
    return versions


# mcq's own files that make outputs: its code and its built-in recipes and plans.
_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_SUFFIXES = (".py", ".yaml")


@functools.cache
def source_digest(*parts: str) -> str:
    """SHA-256 over mcq's own source files under `parts` (paths inside the mcq package: a file, or a folder for
    every .py and .yaml file in it, recursively), their names included.

    What a cache key holds besides mcq's version, so that an edit to the code that made a cached thing (a tiny
    checkpoint, a calibration set, a build's variant) is not answered with the stale thing. Read once per process.
    """
    package = _PACKAGE_DIR
    files: set[Path] = set()
    for part in parts:
        path = package / part
        if path.is_dir():
            files.update(p for p in path.rglob("*") if p.suffix in _SOURCE_SUFFIXES and p.is_file())
        elif path.is_file():
            files.add(path)
        else:
            raise ValueError(f"{part!r} is not a file or folder of the mcq package")
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(f"{file.relative_to(package).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _source_files(source: Path) -> list[Path]:
    # What a checkpoint is: the files at its top level (config, tokenizer, processor, weights, code). Hidden files
    # (.gitattributes, caches) are not part of it.
    return sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))


def _hashes(root: Path, files: list[Path]) -> dict[str, str]:
    return {file.relative_to(root).as_posix(): file_sha256(file) for file in files}


def write_manifest(out_dir: Path, *, kind: str, source: Path | None, recipe: dict | None, settings: dict,
                   extra: dict | None = None) -> dict:
    """Write `mcq-manifest.json` into `out_dir` and return what it holds.

    Write it last: it hashes every other file of the output (the model card included). Paths are relative and keys
    sorted, so the same inputs and settings give the same bytes; the source is named by its directory name only
    (its file hashes identify it), never by an absolute path.
    """
    out_dir = Path(out_dir)
    outputs = sorted(p for p in out_dir.rglob("*")
                     if p.is_file() and p.relative_to(out_dir).as_posix() != MANIFEST_NAME)
    manifest: dict[str, Any] = {
        "mcq_version": __version__,
        "kind": kind,
        "tools": tool_versions(),
        "source": None if source is None else {"name": Path(source).name,
                                               "files": _hashes(Path(source), _source_files(Path(source)))},
        "recipe": recipe,
        "settings": settings,
        "outputs": _hashes(out_dir, outputs),
    }
    if extra is not None:
        manifest["extra"] = extra
    # allow_nan=False: a NaN in a recipe or metric is a bug to surface, and not valid JSON for other readers.
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    (out_dir / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return json.loads(text)


# -- model card ----------------------------------------------------------------------------------------------------

def _front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a model card ({} when there is none or it is not valid YAML)."""
    import yaml

    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _one_line(text: str) -> str:
    # Titles and headings are single markdown lines: a newline in them would start a new block.
    return " ".join(str(text).split())


def write_model_card(out_dir: Path, *, title: str, base_model: str, variant: dict,
                     sections: list[tuple[str, str]], source: Path | None = None) -> None:
    """Write README.md: Hub front matter, then `# title` and one `## heading` per section (bodies are markdown).

    `variant` names what this output is: `method` (e.g. "bitsandbytes"), optionally `format` (e.g. "nf4"), `bits`,
    extra `tags`, and `library` (the Hub's `library_name`: "transformers" unless given; None for files that
    transformers does not load, such as GGUF, ONNX or Core ML). The license is copied from the source's own README
    front matter when `source` has one (with `license_name`/`license_link` for custom licenses); mcq does not guess
    a license.
    """
    import yaml

    if "method" not in variant:
        raise ValueError("variant needs a 'method'")
    tags = ["minicpm-v", "mcq", str(variant["method"])]
    if variant.get("format"):
        tags.append(str(variant["format"]))
    if variant.get("bits"):
        tags.append(f"{int(variant['bits'])}-bit")
    tags += [str(tag) for tag in variant.get("tags", ())]
    front: dict[str, Any] = {
        "base_model": base_model,
        "base_model_relation": "quantized",
        "library_name": variant.get("library", "transformers"),
        "pipeline_tag": "image-text-to-text",
        "tags": list(dict.fromkeys(tags)),
    }
    if front["library_name"] is None:
        del front["library_name"]
    if source is not None:
        source_front = _front_matter(Path(source) / MODEL_CARD_NAME)
        for key in ("license", "license_name", "license_link"):
            if isinstance(source_front.get(key), str):
                front[key] = source_front[key]
    # safe_dump quotes whatever YAML would misread (colons, leading dashes, "yes"); sort_keys=False keeps the
    # order above, which is fixed, so the bytes are deterministic.
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    parts = [f"---\n{header}---\n", f"# {_one_line(title)}\n"]
    for heading, body in sections:
        parts.append(f"## {_one_line(heading)}\n\n{body.strip()}\n")
    (Path(out_dir) / MODEL_CARD_NAME).write_text("\n".join(parts), encoding="utf-8")
