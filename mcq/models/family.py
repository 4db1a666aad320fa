"""What a MiniCPM-V is made of, for the tools that work on it: its components and their weights.

Quantizers, exporters and `mcq inspect` all ask the same questions — which component owns a weight, which Linears
exist and which group sizes divide them, which weights are not Linears — and get the answers here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import import_module

from torch import nn

from .families import FAMILIES, component_prefixes
from .familyspec import Family, PaddableMlp
from .ggufspec import GgufLayout

GROUP_SIZES = (32, 64, 128)


def family_for(model_type: str) -> Family:
    """The facts of the family whose config.json says `model_type` (each family's package, `<name>/family.py`)."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is no family mcq supports ({', '.join(FAMILIES)})")
    return import_module(f"{__package__}.{model_type}.family").FAMILY


def gguf_layout_for(projector: str) -> GgufLayout:
    """The GGUF layout of the family whose mmproj files have `clip.projector_type` `projector` (what a GGUF export
    says of its family); ValueError for a projector no family writes."""
    layouts = [family_for(name).gguf for name in FAMILIES]
    layout = next((layout for layout in layouts if layout.projector == projector), None)
    if layout is None:
        raise ValueError(f"projector {projector!r} is no family's ({', '.join(l.projector for l in layouts)})")
    return layout


def component_of(name: str) -> str:
    component = component_or_other(name)
    if component == "other":
        prefixes = ", ".join(prefix for prefix, _ in component_prefixes())
        raise ValueError(f"{name!r} belongs to no MiniCPM-V component ({prefixes})")
    return component


def component_or_other(name: str) -> str:
    """The component of any tensor name, "other" for one outside them (sizes count it apart)."""
    return next((component for prefix, component in component_prefixes() if name.startswith(prefix)), "other")


@dataclass(frozen=True)
class LinearInfo:
    name: str
    component: str
    in_features: int
    out_features: int
    mlp: PaddableMlp | None = None   # the paddable MLP it consumes or produces the intermediate of (its family's)

    @property
    def mlp_role(self) -> str | None:
        """"consumer" / "producer" in its paddable MLP, None outside one."""
        return self.mlp.role(self.name) if self.mlp else None

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """The standard group sizes that divide the input width (what per-group int4 needs)."""
        return tuple(g for g in GROUP_SIZES if self.in_features % g == 0)

    @property
    def non_divisible(self) -> bool:
        return len(self.group_sizes) < len(GROUP_SIZES)

    @property
    def pattern(self) -> str:
        """The name with layer indices replaced by `*` (one row per kind of layer in summaries)."""
        return re.sub(r"\.\d+\.", ".*.", self.name)


def linear_layers(model: nn.Module) -> list[LinearInfo]:
    mlps = family_for(model.config.model_type).paddable_mlps
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            component = component_of(name)
            mlp = mlps.get(component)
            linears.append(LinearInfo(name, component, module.in_features, module.out_features,
                                      mlp if mlp is not None and mlp.role(name) else None))
    return linears


def _zero_padded(tensor, rows: int = 0, columns: int = 0) -> nn.Parameter:
    pad = (0, columns) if tensor.dim() == 1 else (0, columns, 0, rows)
    return nn.Parameter(nn.functional.pad(tensor.data, pad), requires_grad=False)


def pad_intermediate(block: nn.Module, mlp: PaddableMlp, width: int) -> None:
    """Grow the intermediate width of every `mlp` in `block` to `width` with zeros (exact: see PaddableMlp)."""
    for name, module in list(block.named_modules()):
        if not name.endswith(mlp.consumer) or not isinstance(module, nn.Linear):
            continue
        extra = width - module.in_features
        if extra <= 0:
            continue
        module.weight, module.in_features = _zero_padded(module.weight, columns=extra), width
        for producer_name in mlp.producers:
            producer = block.get_submodule(name[: -len(mlp.consumer)] + producer_name)
            producer.weight, producer.out_features = _zero_padded(producer.weight, rows=extra), width
            if producer.bias is not None:
                producer.bias = _zero_padded(producer.bias, columns=extra)
