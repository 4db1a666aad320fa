"""Weights on demand: a model whose parameters live on disk until a tool asks for one block of them.

Quantizing an 8B model on a 24 GB machine means never holding all of it: the quantizer builds a `shell_model`
(the module tree with parameters on the meta device and real buffers such as rotary tables), then materializes one
block at a time from the memory-mapped safetensors shards and releases it when done. Peak memory then depends on
the largest block, not on depth.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from . import loading
from .family import family_for
from .minicpmv import checkpoint_names


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def shell_model(config) -> nn.Module:
    """The module tree of the config's family, with every parameter on the meta device (no memory) and buffers
    computed for real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = family_for(config.model_type).model_class(config)
    return model.eval()


class CheckpointReader:
    """Reads a checkpoint's tensors by name from its shards (memory-mapped), in the model's parameter naming."""

    def __init__(self, path: Path):
        self.path = path
        self._file_of, self._dtype_of = {}, {}
        for file in loading.weight_files(path):
            for name, entry in loading.check_safetensors(file).items():
                self._file_of[name], self._dtype_of[name] = file, entry["dtype"]
        self._handles: dict[Path, object] = {}

    @property
    def stored_names(self) -> list[str]:
        return sorted(self._file_of)

    def dtype_of(self, stored: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._dtype_of[stored]]

    def read_stored(self, stored: str) -> torch.Tensor:
        """One stored tensor, refused (McqError) if it holds a NaN or an infinity."""
        file = self._file_of[stored]
        if file not in self._handles:
            self._handles[file] = safe_open(file, "pt")
        tensor = self._handles[file].get_tensor(stored)
        loading.check_finite(tensor, stored, file)
        return tensor

    def read_params(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Model parameters by name; a stored tensor that holds several of them is read once."""
        stored = {checkpoint_names.stored_name(name) for name in names}
        params = checkpoint_names.to_params({s: self.read_stored(s) for s in sorted(stored)})
        return {name: params[name] for name in names}

    def materialize(self, module: nn.Module, prefix: str, dtype: torch.dtype, device: torch.device | str) -> None:
        """Give `module` (named `prefix` in the model, "" for the root) its stored weights, cast to `dtype`."""
        names = list(module.state_dict())
        full = [f"{prefix}.{n}" if prefix else n for n in names]
        tensors = self.read_params(full)
        state = {name: tensors[f].to(device=device, dtype=dtype if tensors[f].is_floating_point() else None)
                 for name, f in zip(names, full)}
        module.load_state_dict(state, assign=True, strict=True)

    def close(self) -> None:
        self._handles.clear()


def release(module: nn.Module) -> None:
    """Drop a block's weights (back to the meta device) once it has been processed, and hand the freed heap back to
    the system.

    glibc keeps freed allocations of up to 32 MiB (a block's norms, scales, packed levels, the quantizers'
    temporaries) in its heap, and the pieces left between live ones are not reused for the next block's larger
    ones: measured on a real-width 4.5, RTN's anonymous memory after each LLM layer grew 33 MiB per layer without
    the trim, 0.1 MiB with it."""
    module.to("meta")
    trim_heap()


def trim_heap() -> None:
    """Hand glibc's freed heap back to the system (nothing where the C library has no `malloc_trim`)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl)."""
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def named_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's repeated blocks in data-flow order, as its family lists them (resampler family: vision encoder
    layers, the resampler, LLM decoder layers)."""
    return family_for(model.config.model_type).blocks(model)
