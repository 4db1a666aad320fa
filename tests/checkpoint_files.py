"""Every tensor of a safetensors checkpoint directory, by name (all shards): what the quantize tests compare."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def stored_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in handle.keys()})
    return tensors
