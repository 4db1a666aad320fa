"""Real-width tiny checkpoints initialized one unit at a time (`make-tiny --real-widths`), for every family.

The writer builds the model as a `shell_model` (parameters on the meta device), then gives each unit (a block, or a
largest module holding no block: a table, a norm, the vision embeddings) real memory when the shard writer asks for
its first tensor, initializes it from a seed of its own, and releases it after its last one. So peak memory is one
unit, not the model: the full 8.7B 4.5 layout is written holding one block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn


def init_units(shell: nn.Module) -> list[tuple[str, nn.Module]]:
    """What real widths initialize at once: each block (`named_blocks`), and each largest module holding no block
    (an embedding table, a norm, the vision embeddings), so every module keeps its parent's own init."""
    from .weights import named_blocks

    blocks = dict(named_blocks(shell))
    units = []

    def visit(name: str, module: nn.Module) -> None:
        holds_block = any(b.startswith(name + ".") for b in blocks) if name else True
        if name in blocks or not holds_block:
            if any(True for _ in module.parameters()):
                units.append((name, module))
            return
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", shell)
    return units


@torch.no_grad()
def init_unit(module: nn.Module, name: str, seed: int, init_weights: Callable[[nn.Module], None],
              dtype: torch.dtype | None = None) -> int:
    """Give `module` (the unit `name`, on the meta device) memory on the CPU, in `dtype` when given, and initialize
    it as transformers initializes a whole model (children first, each by `init_weights`), under a seed derived from
    `seed` and `name` (a unit's values do not depend on the model's depth). Returns a second seed derived the same
    way, for what the caller adds (outliers)."""
    if dtype is not None:
        module.to(dtype)   # still on the meta device: no memory, and no float32 copy of the unit later
    module.to_empty(device="cpu")
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little"))

    def init(sub: nn.Module) -> None:
        for child in sub.children():
            init(child)
        init_weights(sub)

    init(module)
    return int.from_bytes(digest[8:12], "little")
