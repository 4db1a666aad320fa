"""What a MiniCPM-V is made of, for the tools that work on it: its components and their weights.

Quantizers, exporters and `mcq inspect` all ask the same questions — which component owns a weight, which Linears
exist and which group sizes divide them, which weights are not Linears — and get the answers here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# Component → state-dict prefix, in data-flow order.
COMPONENTS = {"vision": "vpm.", "resampler": "resampler.", "llm": "llm."}
GROUP_SIZES = (32, 64, 128)


def component_of(name: str) -> str:
    for component, prefix in COMPONENTS.items():
        if name.startswith(prefix):
            return component
    raise ValueError(f"{name!r} belongs to no MiniCPM-V component ({', '.join(COMPONENTS.values())})")


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
        ("self_attn.v_proj", ("self_attn.o_proj",)),   # skipped by the engine under GQA (shapes differ)
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
}
