"""Content digests of models, data and mcq's own code, for the build's cache keys, without re-reading unchanged
gigabytes.

A MiniCPM-V 4.5 checkpoint is ~16 GB; hashing it on every `mcq build` would cost a minute before any cache can say
"nothing changed". So a file's SHA-256 is remembered against its (size, mtime_ns, inode) in a small JSON index
under the mcq cache, as git's index does: a file whose stat is unchanged is not read again, and any change to it
(rewrite, copy, touch) makes it hashed afresh.

mcq's own code is part of every key too (`code_key`): each cached thing names the parts of mcq that make it
(`STEP_SOURCES`), so an edit to an exporter rebuilds that exporter's variants and no others, and an edit to the
synthetic-data generator re-encodes the calibration set and rebuilds what read it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mcq import __version__
from mcq.outputs import file_sha256, source_digest, write_file_atomically

INDEX_NAME = "file-digests.json"

# The parts of mcq (paths inside the package, see `outputs.source_digest`) that make each cached thing. Every step
# runs the model code and writes through outputs.py. Each list covers every mcq module its step's entry point
# imports (tests/build/test_keys.py checks this against the imports), except those a build's step is handed the
# result of: `quantize()` and the GGUF export get their calibration samples or importance matrix from the build,
# which keys those on their own code. The build's driver (build/api.py, plan.py) is in no key: what it passes to a
# step is in the key as settings.
_COMMON = ("models", "outputs.py", "extras.py")
STEP_SOURCES = {
    "calibration": ("calibration", "build/calibration.py", *_COMMON),          # the encoded calibration set
    "quantize": ("quantize", "recipes", *_COMMON),
    # The importance matrix is computed by the GGUF exporter's code through quantize's block driver.
    "gguf": ("export/gguf", "export/weights_source.py", "export/rows.py", "quantize/sequential.py", *_COMMON),
    "onnx": ("export/onnx", "export/weights_source.py", "export/rows.py", "quantize/recipe.py", *_COMMON),
    "coreml": ("export/coreml", "export/weights_source.py", *_COMMON),
    # A variant's results: the runners (with the Core ML host and interpreter, validate/coreml), the eval set, the
    # reference run, the host code of traced exports and the generation loop's token choice. A runtime's own code
    # that lives with its exporter (export/onnx/runtime.py ...) is keyed with the variant that exporter wrote,
    # which a validation key holds.
    "validation": ("validate", "calibration", "export/program_host.py", "export/generation.py", *_COMMON),
}
# What renders the built-in calibration and eval sets: its generator, and the libraries that draw its pixels and
# random numbers (a new Pillow can anti-alias text differently).
BUILTIN_DATA_SOURCES = ("calibration/synthetic.py", "calibration/samples.py", "models/minicpmv/video.py")
BUILTIN_DATA_LIBRARIES = ("pillow", "numpy")


class DigestIndex:
    """SHA-256 of files, remembered by stat. `save()` writes the index atomically (concurrent builds may race on
    it; the loser's entries are only recomputed next time)."""

    def __init__(self, root: Path):
        self.path = Path(root) / INDEX_NAME
        try:
            self._entries: dict[str, list] = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._entries = {}
        self._changed = False

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        key, signature = str(path), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        known = self._entries.get(key)
        if known and known[:3] == signature:
            return known[3]
        digest = file_sha256(path)
        self._entries[key] = [*signature, digest]
        self._changed = True
        return digest

    def tree(self, root: Path, files: list[Path]) -> str:
        """One digest of `files` (paths under `root`), their relative names included."""
        digest = hashlib.sha256()
        for file in sorted(files):
            digest.update(f"{file.relative_to(root).as_posix()}\0{self.file(file)}\n".encode())
        return digest.hexdigest()

    def save(self) -> None:
        if not self._changed:
            return
        write_file_atomically(self.path, json.dumps(self._entries, sort_keys=True), force=True)
        self._changed = False


def model_digests(index: DigestIndex, model_dir: Path) -> dict[str, str]:
    """{"weights": digest of the safetensors files, "processor": digest of everything else at the top level
    (config, tokenizer, preprocessor)}: encoding calibration data depends on the second only."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    weights = [p for p in files if p.name.endswith(".safetensors")]
    return {"weights": index.tree(model_dir, weights),
            "processor": index.tree(model_dir, [p for p in files if p not in weights])}


def code_key(step: str) -> dict[str, str]:
    """What of mcq makes `step` (a key of STEP_SOURCES): its version and the digest of those parts' source."""
    return {"mcq": __version__, "source": source_digest(*STEP_SOURCES[step])}


def data_digest(index: DigestIndex, source: str | Path | None) -> str:
    """Digest of calibration or evaluation data: the built-in set by its generator's code and the versions of the
    libraries that render it; a user folder or saved dataset by every file in it."""
    if source is None or str(source) == "builtin":
        from importlib import metadata

        libraries = {name: metadata.version(name) for name in BUILTIN_DATA_LIBRARIES}
        return "builtin-" + key_of({"code": source_digest(*BUILTIN_DATA_SOURCES), "libraries": libraries})
    root = Path(source)
    if root.is_file():
        return index.tree(root.parent, [root])
    files = [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                     p.relative_to(root).parts)]
    return index.tree(root, files)


def key_of(value: Any) -> str:
    """A short stable key for a JSON-able value (settings, digests)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:20]
