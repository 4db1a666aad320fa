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
from .familyspec import Family

GROUP_SIZES = (32, 64, 128)


def family_for(model_type: str) -> Family:
    """The facts of the family whose config.json says `model_type` (each family's package, `<name>/family.py`)."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is no family mcq supports ({', '.join(FAMILIES)})")
    return import_module(f"{__package__}.{model_type}.family").FAMILY


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
    return [
        LinearInfo(name, component_of(name), module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]


# Activation-smoothing pairs inside each block (names relative to the block), for AWQ-style scaling: the smooth
# layer's output channels are divided by s and the balance layers' input channels multiplied by s, which leaves the
# block's function unchanged only where nothing nonlinear sits between them. So: no fc1 → fc2 (GELU between), and
# in the resampler no ln_kv → k/v (the 2D position term is added to the keys after ln_kv).
SMOOTHING_PAIRS = {
    "vision": (
        ("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("layer_norm2", ("mlp.fc1",)),
    ),
    "resampler": (
        ("ln_q", ("attn.q_proj",)),
        ("attn.v_proj", ("attn.out_proj",)),
        ("ln_post", ("proj",)),
    ),
    "llm": (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),   # skipped (and reported) under GQA: the widths differ
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
}

# The modules inside a block whose output at one token depends on the other tokens of its sequence (attention).
# AWQ's scale search measures its loss on a sample of tokens; a parent that is or holds one of these must run on
# whole sequences, every other module (Linears, MLPs) maps each token on its own.
TOKEN_MIXING = {"vision": ("self_attn",), "resampler": ("attn",), "llm": ("self_attn",)}


@dataclass(frozen=True)
class PaddableMlp:
    """An MLP whose intermediate width can grow with zeros: `consumer`'s inputs are `producers`' outputs through an
    elementwise function that maps 0 to 0 (SigLIP's GELU between fc1 and fc2; SiLU(gate) * up before down_proj),
    so zero rows appended to the producers and zero columns to the consumer leave the block's function exactly
    unchanged. That is what `non_divisible: pad` relies on to give the consumer an input width its group size
    divides. Names are relative to the block (the same in both families); where config.json keeps the width is
    each family's (`Family.intermediate_keys`)."""

    consumer: str
    producers: tuple[str, ...]


PADDABLE_INPUTS = {
    "vision": PaddableMlp("mlp.fc2", ("mlp.fc1",)),
    "llm": PaddableMlp("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")),
}


def paddable(name: str, component: str) -> bool:
    """Whether `name` is a Linear whose input width `pad_intermediate` can grow."""
    mlp = PADDABLE_INPUTS.get(component)
    return mlp is not None and name.endswith("." + mlp.consumer)


def _zero_padded(tensor, rows: int = 0, columns: int = 0) -> nn.Parameter:
    pad = (0, columns) if tensor.dim() == 1 else (0, columns, 0, rows)
    return nn.Parameter(nn.functional.pad(tensor.data, pad), requires_grad=False)


def pad_intermediate(block: nn.Module, component: str, width: int) -> None:
    """Grow the intermediate width of every MLP in `block` to `width` with zeros (exact: see PaddableMlp)."""
    mlp = PADDABLE_INPUTS[component]
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
