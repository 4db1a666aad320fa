"""Writes a compressed-tensors `pack-quantized` checkpoint, streaming: block by block, in bounded shards.

Quantized Linears are stored the way llm-compressor saves them (`weight_packed`, `weight_scale`,
`weight_zero_point`, `weight_shape`, …) under the module's name; every other tensor is copied from the source
checkpoint byte for byte under its official name. A stored tensor that packs several parameters (the resampler's
`in_proj_weight`) is copied whole when none of its parts is quantized, and otherwise split into the parts that are
not, which only a plan for mcq's own loader does (`target: mcq`): for every other target the planner keeps those
modules dense, and the writer refuses to write a non-official name for them. `quantization_config` in config.json
names every quantized module per scheme (compact regexes when a scheme covers all layers of a kind, or every name
where the family says vLLM maps only plain names: `Family.plain_quantization_names`) and lists in `ignore` the
unquantized Linears that are modules in the official layout, the names vLLM and the official code resolve. vLLM
fuses q/k/v and gate/up and gives a fused module its first member's scheme (and refuses one that is ignored
unevenly); plans for such a target hold one scheme per fused group (`mcq.models.runtimes`), so each group
lands whole in one config group or whole in `ignore`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mcq.models.minicpmv import checkpoint_names
from mcq.models.weights import CheckpointReader
from mcq.outputs import copy_support_files

from ..recipe import QuantPlan

SHARD_BYTES = 1 << 30


class ShardedWriter:
    """Writes safetensors shards of at most ~SHARD_BYTES, then the index, without holding a shard in memory.

    Added tensors go to disk at the next `spill()` (the writer calls it after every block; a shard's worth of
    pending tensors spills by itself) and are let go, so memory holds one block's tensors, not up to SHARD_BYTES of
    them, which would grow with depth until the first shard is full. `close()` then regroups the spill files, in
    order, into the final shards: a spill file that fills a shard alone is renamed, smaller ones are merged by
    reading them memory-mapped, one shard at a time (those bytes are written twice)."""

    def __init__(self, out: Path, shard_bytes: int = SHARD_BYTES):
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.spills: list[tuple[Path, list[str], int]] = []   # file, tensor names, bytes
        self.names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        self.names.add(name)
        self.pending[name] = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        self.pending_bytes += size
        self.total_bytes += size
        if self.pending_bytes >= self.shard_bytes:
            self.spill()

    def spill(self) -> None:
        """Write the pending tensors to a spill file and drop them."""
        if not self.pending:
            return
        part = self.out / f".part-{len(self.spills):05d}.safetensors"
        save_file(self.pending, part, metadata={"format": "pt"})
        self.spills.append((part, sorted(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def _shards(self) -> list[list[tuple[Path, list[str], int]]]:
        """Consecutive spill files, at most shard_bytes together (a larger one alone)."""
        shards: list[list[tuple[Path, list[str], int]]] = []
        size = 0
        for spill in self.spills:
            if shards and size + spill[2] <= self.shard_bytes:
                shards[-1].append(spill)
                size += spill[2]
            else:
                shards.append([spill])
                size = spill[2]
        return shards

    def close(self) -> None:
        self.spill()
        shards = self._shards()
        weight_map = {}
        for i, spills in enumerate(shards, start=1):
            final = self.out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            if len(spills) == 1:
                spills[0][0].rename(final)
            else:
                handles = [safe_open(part, "pt") for part, _, _ in spills]
                save_file({name: handle.get_tensor(name) for handle, (_, names, _) in zip(handles, spills)
                           for name in names}, final, metadata={"format": "pt"})
                del handles   # unmaps the spill files
                for part, _, _ in spills:
                    part.unlink()
            for _, names, _ in spills:
                weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _compact_targets(names: list[str], all_linears: list[str], plain: bool) -> list[str]:
    """Exact names, or (unless `plain`) one `re:` pattern per kind of layer when every layer of that kind is
    listed."""
    if plain:
        return list(names)

    def kind(name: str) -> str:
        return re.sub(r"\.\d+\.", ".*.", name)

    listed, existing = defaultdict(list), defaultdict(set)
    for name in names:
        listed[kind(name)].append(name)
    for name in all_linears:
        existing[kind(name)].add(name)
    targets = []
    for pattern, members in listed.items():
        if len(members) > 1 and set(members) == existing[pattern]:
            regex = re.escape(pattern).replace(r"\.\*\.", r"\.\d+\.")
            targets.append(f"re:^{regex}$")
        else:
            targets.extend(members)
    return targets


def quantization_config(plan: QuantPlan, *, scale_dtype: torch.dtype, observer: str, actorder: str | None,
                        plain_names: bool) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    from ..llmc import quantization_args

    names = [layer.name for layer in plan.layers]
    groups = {}
    for i, (scheme, members) in enumerate(plan.schemes().items()):
        groups[f"group_{i}"] = QuantizationScheme(
            targets=_compact_targets(members, names, plain_names),
            weights=quantization_args(scheme, observer=observer, actorder=actorder, scale_dtype=scale_dtype))
    kept = [layer.name for layer in plan.kept() if checkpoint_names.official_module(layer.name)]
    config = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                                ignore=_compact_targets(kept, names, plain_names))
    return config.to_dict()


class CompressedTensorsWriter:
    """The output side of a quantization run: each processed block in full, then the rest from the source.

    A block is written from the processed module, not copied from the source: AWQ rescales the smoothing layers
    (norms, `v_proj` biases) that stay unquantized, so their new values belong with the packed weights."""

    def __init__(self, reader: CheckpointReader, out: Path, official_layout: bool = True):
        self.reader, self.out, self.official_layout = reader, out, official_layout
        self.shards = ShardedWriter(out)
        self.written_blocks: list[str] = []

    def add_block(self, block_name: str, block: torch.nn.Module, packed: dict[str, torch.Tensor]) -> None:
        quantized = {name.rsplit(".", 1)[0] for name in packed}
        params = {f"{block_name}.{name}": tensor for name, tensor in block.state_dict().items()}
        plain = {name: tensor for name, tensor in params.items()
                 if name.rsplit(".", 1)[0] not in quantized or name.rsplit(".", 1)[1] == "bias"}
        self.written_blocks.append(block_name + ".")
        dtypes = {}
        for name in plain:
            stored = checkpoint_names.stored_name(name)
            dtypes[name] = self.reader.dtype_of(stored)
        tensors = {**packed, **checkpoint_names.to_stored(
            {name: tensor.detach().to("cpu", dtypes[name]) for name, tensor in plain.items()})}
        if self.official_layout:
            unofficial = [name for name in tensors if checkpoint_names.stored_name(name) != name
                          or not checkpoint_names.official_module(name.rsplit(".", 1)[0])]
            if unofficial:   # the planner keeps these dense for every official-layout target: a bug if reached
                raise ValueError(f"{block_name}: names outside the official layout: {', '.join(unofficial)}")
        for name in sorted(tensors):
            self.shards.add(name, tensors[name])
        self.shards.spill()   # on disk before the next block: memory must not grow with depth

    def finish(self, config: dict[str, Any], source: Path) -> None:
        for stored in self.reader.stored_names:
            if not any(p.startswith(block) for p in checkpoint_names.params_of(stored) for block in self.written_blocks):
                self.shards.add(stored, self.reader.read_stored(stored))
        self.shards.close()
        (self.out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_support_files(source, self.out)
