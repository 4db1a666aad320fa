"""The importance matrix llama.cpp's K-quants weigh rounding errors with, from mcq's multimodal calibration.

`llama-imatrix` runs text through the LLM only. Here the statistics come from the same calibration set and the same
block-by-block forward as AWQ/GPTQ (`mcq.quantize.sequential`): images, multi-image and video samples, so the
vision tower and resampler get theirs, and the LLM sees image tokens among the text. For every Linear that becomes
a GGUF weight: the mean of x² over all calibration rows, per input column (what `llama_model_quantize` reads).
The LM head is not run by the calibration forward and gets no entry; llama.cpp then quantizes it unweighted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mcq.errors import McqError
from mcq.quantize.sequential import BlockHandler, SequentialDriver


class _SquaredInputs:
    """Per Linear: sum of x² per input column and the number of rows seen."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._hooks: list = []

    def attach(self, block_name: str, block: nn.Module) -> None:
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                full = f"{block_name}.{name}" if name else block_name
                self._hooks.append(module.register_forward_pre_hook(self._hook(full)))

    def _hook(self, name: str):
        def record(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            squared = (x * x).sum(0)
            self.sums[name] = self.sums[name] + squared if name in self.sums else squared
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        return record

    def detach(self, *_args) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def means(self) -> dict[str, np.ndarray]:
        return {name: (self.sums[name] / self.rows[name]).numpy().astype(np.float32) for name in sorted(self.sums)}


def compute_imatrix(path: Path, config, samples: list[dict], gguf_names: dict[str, str],
                    progress=None) -> dict[str, np.ndarray]:
    """GGUF weight name → mean x² per input column. `gguf_names` maps Linear weights (mcq parameter names) to
    GGUF tensor names; `samples` are encoded calibration samples."""
    from mcq.models.weights import CheckpointReader, shell_model

    model = shell_model(config)
    stats = _SquaredInputs()
    reader = CheckpointReader(path)
    # Statistics only: nothing is quantized, and hooks record the inputs of the run that makes the next block's.
    handler = BlockHandler(quantize=lambda name, block, _calls: stats.attach(name, block), emit=stats.detach)
    try:
        SequentialDriver(model, reader, samples, torch.float32, "cpu").run(handler, progress)
    finally:
        reader.close()
    return {gguf_names[f"{name}.weight"]: values for name, values in stats.means().items()
            if f"{name}.weight" in gguf_names}


def write_imatrix_file(path: Path, imatrix: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    """Save an importance matrix as safetensors (tensor per GGUF name), so `--imatrix FILE` can reuse it."""
    from safetensors.numpy import save_file

    save_file({name: np.ascontiguousarray(values) for name, values in imatrix.items()}, str(path), metadata=meta)


def read_imatrix_file(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not path.is_file():
        raise McqError(f"--imatrix {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as err:   # safetensors raises several types for a file that is not one of its own
        raise McqError(f"--imatrix {path} is not an imatrix mcq wrote (safetensors): {err}") from None
