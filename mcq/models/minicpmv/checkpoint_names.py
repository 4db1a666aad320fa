"""Official on-disk tensor names ↔ the parameters of mcq's modules.

The official resampler keeps its attention as `nn.MultiheadAttention` (a packed `in_proj_weight` Parameter) and
its output projection as a bare Parameter applied as `x @ proj`. Quantizers, exporters and hooks all work on
`nn.Linear`s, so mcq's resampler holds `attn.{q,k,v}_proj` and `proj` as Linears instead. This table is the one
place that says how the stored tensors map onto them; transformers' loader/saver (checkpoint conversion mapping)
and mcq's own readers (layout checks, layer-by-layer loading) are both derived from it, so checkpoints on disk keep
the official names in both directions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StoredAs:
    stored: str                 # the official tensor name
    params: tuple[str, ...]     # the model parameters it holds, split evenly along dim 0 when there are several
    transposed: bool = False    # stored as the transpose of a Linear weight (applied as x @ W)


RENAMES = (
    StoredAs("resampler.attn.in_proj_weight",
             ("resampler.attn.q_proj.weight", "resampler.attn.k_proj.weight", "resampler.attn.v_proj.weight")),
    StoredAs("resampler.attn.in_proj_bias",
             ("resampler.attn.q_proj.bias", "resampler.attn.k_proj.bias", "resampler.attn.v_proj.bias")),
    StoredAs("resampler.proj", ("resampler.proj.weight",), transposed=True),
)
_BY_STORED = {rename.stored: rename for rename in RENAMES}


def params_of(stored: str) -> tuple[str, ...]:
    """The model parameters a stored tensor holds (itself when it is not renamed)."""
    rename = _BY_STORED.get(stored)
    return rename.params if rename else (stored,)


def param_shapes(stored: str, shape: list[int]) -> dict[str, list[int]]:
    """The model parameter shapes a stored tensor of `shape` becomes."""
    rename = _BY_STORED.get(stored)
    if rename is None:
        return {stored: list(shape)}
    rows, *rest = list(reversed(shape)) if rename.transposed else list(shape)
    return {param: [rows // len(rename.params), *rest] for param in rename.params}


def to_params(stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored tensors → model parameters (for readers that bypass transformers' loader)."""
    params = {}
    for name, tensor in stored.items():
        rename = _BY_STORED.get(name)
        if rename is None:
            params[name] = tensor
            continue
        tensor = tensor.t() if rename.transposed else tensor
        params.update(zip(rename.params, (chunk.contiguous() for chunk in tensor.chunk(len(rename.params)))))
    return params


def to_stored(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model parameters → stored tensors: parts of a renamed tensor are joined back when all of them are given;
    the rest keep their parameter names (a partly quantized in-projection stores its remaining parts by name)."""
    stored = dict(params)
    for rename in RENAMES:
        if all(p in stored for p in rename.params):
            parts = [stored.pop(p) for p in rename.params]
            tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
            stored[rename.stored] = (tensor.t() if rename.transposed else tensor).contiguous()
    return stored


def stored_name(param: str) -> str:
    """The official tensor that holds a model parameter."""
    for rename in RENAMES:
        if param in rename.params:
            return rename.stored
    return param


def official_module(linear: str) -> bool:
    """Whether an mcq Linear is a module of its own in the official layout (the resampler's attention input
    projections and `proj` are not: they are parts of a packed Parameter, or a bare one)."""
    return stored_name(f"{linear}.weight") == f"{linear}.weight"


def transformers_conversions() -> list:
    """The same table as transformers checkpoint conversions (applied on from_pretrained, reversed on save)."""
    from transformers.core_model_loading import Chunk, Transpose, WeightConverter

    def anchored(name: str) -> str:
        return "^" + name.replace(".", r"\.") + "$"

    return [WeightConverter(anchored(rename.stored), [anchored(p) for p in rename.params],
                            operations=[Transpose(dim0=0, dim1=1) if rename.transposed else Chunk(dim=0)])
            for rename in RENAMES]
