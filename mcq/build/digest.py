"""Content digests of models and data, for the build's cache keys, without re-reading unchanged gigabytes.

A MiniCPM-V 4.5 checkpoint is ~16 GB; hashing it on every `mcq build` would cost a minute before any cache can say
"nothing changed". So a file's SHA-256 is remembered against its (size, mtime_ns, inode) in a small JSON index
under the mcq cache, as git's index does: a file whose stat is unchanged is not read again, and any change to it
(rewrite, copy, touch) makes it hashed afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mcq.outputs import file_sha256

INDEX_NAME = "file-digests.json"


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(self._entries, sort_keys=True), encoding="utf-8")
        os.replace(temporary, self.path)
        self._changed = False


def model_digests(index: DigestIndex, model_dir: Path) -> dict[str, str]:
    """{"weights": digest of the safetensors files, "processor": digest of everything else at the top level
    (config, tokenizer, preprocessor)}: encoding calibration data depends on the second only."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    weights = [p for p in files if p.name.endswith(".safetensors")]
    return {"weights": index.tree(model_dir, weights),
            "processor": index.tree(model_dir, [p for p in files if p not in weights])}


def data_digest(index: DigestIndex, source: str | Path | None) -> str:
    """Digest of calibration data: the built-in set is named by mcq's version (its generator ships with mcq); a
    user folder or saved dataset by every file in it."""
    from mcq import __version__

    if source is None or str(source) == "builtin":
        return f"builtin-{__version__}"
    root = Path(source)
    if root.is_file():
        return index.tree(root.parent, [root])
    files = [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                     p.relative_to(root).parts)]
    return index.tree(root, files)


def key_of(value: Any) -> str:
    """A short stable key for a JSON-able value (settings, digests)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:20]
