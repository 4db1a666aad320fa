"""The build's one calibration: the encoded calibration set and the activation statistics, cached on disk.

Every calibrated variant of a build reads the same encoded samples (AWQ and GPTQ through `quantize(calibration=)`),
and the importance matrix, a full-precision forward over the whole set (`write_calibration_imatrix`), is computed
once and read by every GGUF K-quant (`export_gguf(imatrix=FILE)`). Both live under
`MCQ_CACHE/calibration/<key>/`, where the key is a digest of the model's files, the data (for the built-in set, its
generator's code and the Pillow and numpy versions), the sampling settings, the tool versions and the mcq code that
encodes it, so a later build (or another output folder) with the same inputs reads them back instead of
recomputing. The importance matrix is named by a key of the code that computes it as well
(`imatrix-<key>.safetensors`): an edit to the GGUF exporter recomputes it from the same encoded set.

The encoded set is saved without pickle: tensors go to one safetensors file and the nesting (dicts, lists, tuples,
numbers) to JSON beside it, with each tensor leaf replaced by its key.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mcq.errors import McqError

SAMPLES_FILE = "samples.safetensors"
STRUCTURE_FILE = "samples.json"


@dataclass(frozen=True)
class CalibrationSettings:
    data: str | None          # None: the built-in set
    num_samples: int
    max_slice_nums: int
    seed: int


@dataclass
class CalibrationSet:
    samples: list[dict[str, Any]]
    description: dict[str, Any]
    directory: Path            # the cache entry
    reused: bool               # read back from the cache rather than encoded now

    def imatrix(self, code_key: str) -> Path:
        """The importance matrix of this set computed by the code `code_key` names."""
        return self.directory / f"imatrix-{code_key}.safetensors"


def calibration_set(model_dir: Path, settings: CalibrationSettings, key: str, root: Path) -> CalibrationSet:
    """The encoded set for `key` from the cache under `root`, encoding and storing it on a miss."""
    directory = root / key
    if (directory / STRUCTURE_FILE).is_file():
        samples, description = load_encoded(directory)
        return CalibrationSet(samples, description, directory, reused=True)
    from mcq.calibration import calibration_samples

    samples, description = calibration_samples(model_dir, settings.data, settings.num_samples,
                                               settings.max_slice_nums, settings.seed)
    with _staged_entry(directory) as staging:
        save_encoded(staging, samples, description)
    return CalibrationSet(samples, description, directory, reused=False)


# -- the encoded set on disk -----------------------------------------------------------------------------------------

def save_encoded(directory: Path, samples: list[dict[str, Any]], description: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def flatten(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().contiguous()
            return {"tensor": path}
        if isinstance(value, dict):
            return {"dict": {key: flatten(item, f"{path}.{key}") for key, item in value.items()}}
        if isinstance(value, (list, tuple)):
            kind = "list" if isinstance(value, list) else "tuple"
            return {kind: [flatten(item, f"{path}.{i}") for i, item in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise McqError(f"cannot cache a calibration sample holding {type(value).__name__} at {path}")

    structure = [flatten(sample, str(i)) for i, sample in enumerate(samples)]
    save_file(tensors, str(directory / SAMPLES_FILE))
    (directory / STRUCTURE_FILE).write_text(json.dumps({"samples": structure, "description": description},
                                                       sort_keys=True), encoding="utf-8")


def load_encoded(directory: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from safetensors.torch import load_file

    try:
        stored = json.loads((directory / STRUCTURE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / SAMPLES_FILE))
    except Exception as err:   # a damaged cache entry: say where it is, so it can be deleted
        raise McqError(f"the calibration cache entry {directory} is unreadable ({err}); delete it to rebuild it") \
            from None

    def restore(node: dict[str, Any]) -> Any:
        (kind, value), = node.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "dict":
            return {key: restore(item) for key, item in value.items()}
        if kind in ("list", "tuple"):
            items = [restore(item) for item in value]
            return items if kind == "list" else tuple(items)
        return value

    return [restore(node) for node in stored["samples"]], stored["description"]


@contextmanager
def _staged_entry(directory: Path) -> Iterator[Path]:
    """A cache entry written beside its final place and renamed in, so a reader never sees half an entry (and of
    two builds filling the same entry at once, the first to finish wins)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield staging
        if not directory.exists():
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
