"""Sharded safetensors checkpoints written tensor by tensor, never held whole.

`plan_shards` splits a checkpoint into shards from the tensors' names and sizes alone (no data), with the rule
`save_pretrained` follows (huggingface_hub's: tensors in name order, a new shard when the next one would pass the
limit, a tensor larger than the limit alone in its shard). `ShardWriter` then writes each shard's header first and
each tensor's bytes as the caller produces them, in the order safetensors itself lays them out (by name within a
dtype), so the files are byte for byte what `safetensors.torch.save_file` writes for the same tensors. A 17 GB
checkpoint is written holding one tensor (`tests/models/test_model.py` compares both ways).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

# safetensors' names for torch dtypes, and its layout order: larger dtypes first (by the order of its Dtype enum),
# then by name.
_DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
                torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
                torch.int64: "I64"}
_DTYPE_RANK = {name: rank for rank, name in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32",
                                                          "F64", "I64"))}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Shard:
    file: str
    entries: list[TensorEntry] = field(default_factory=list)

    def layout(self) -> list[TensorEntry]:
        """The entries in the order safetensors writes their bytes."""
        return sorted(self.entries, key=lambda e: (-_DTYPE_RANK[_DTYPE_NAMES[e.dtype]], e.name))

    def header(self, metadata: dict[str, str]) -> bytes:
        table: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for entry in self.layout():
            table[entry.name] = {"dtype": _DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                                 "data_offsets": [offset, offset + entry.nbytes]}
            offset += entry.nbytes
        raw = json.dumps(table, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)


def plan_shards(entries: list[TensorEntry], max_shard_bytes: int,
                pattern: str = "model{suffix}.safetensors") -> list[Shard]:
    """Shards of `entries` (taken in name order) of at most `max_shard_bytes` each, named as transformers names
    them (`model.safetensors` alone, else `model-0000i-of-0000n.safetensors`)."""
    groups: list[list[TensorEntry]] = []
    current: list[TensorEntry] = []
    size = 0
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.nbytes > max_shard_bytes:
            groups.append([entry])
            continue
        if current and size + entry.nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current:
        groups.append(current)
    if len(groups) == 1:
        return [Shard(pattern.format(suffix=""), groups[0])]
    return [Shard(pattern.format(suffix=f"-{i + 1:05d}-of-{len(groups):05d}"), group)
            for i, group in enumerate(groups)]


def write_shard(path: Path, shard: Shard, tensors: Iterator[tuple[str, torch.Tensor]],
                metadata: dict[str, str] | None = None) -> None:
    """Write one shard: `tensors` must yield the shard's tensors in `shard.layout()` order (each checked against its
    entry); only the tensor being written is held."""
    metadata = {"format": "pt"} if metadata is None else metadata
    header = shard.header(metadata)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for entry in shard.layout():
            name, tensor = next(tensors)
            if name != entry.name or tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
                raise ValueError(f"{path.name}: expected {entry.name} {entry.dtype} {entry.shape}, got {name} "
                                 f"{tensor.dtype} {tuple(tensor.shape)}")
            # The tensor's bytes through a uint8 view (no copy; bf16 has no numpy dtype).
            out.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)


def write_index(path: Path, shards: list[Shard], total_parameters: int) -> None:
    """`model.safetensors.index.json` as `save_pretrained` writes it."""
    index = {"metadata": {"total_parameters": total_parameters,
                          "total_size": sum(e.nbytes for shard in shards for e in shard.entries)},
             "weight_map": {e.name: shard.file for shard in shards for e in shard.entries}}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
