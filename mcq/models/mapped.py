"""A model whose large weights stay in the memory-mapped checkpoint: memory that does not grow with depth.

`load_mapped` builds the module tree on the meta device (`weights.shell_model`) and gives it its weights without
copying the large ones: every Linear and embedding table keeps the checkpoint's own tensor, mapped from its shard
(safetensors hands out tensors backed by the file), in its stored dtype. A Linear computes in the compute dtype a
block of output rows at a time (`MappedLinear`): the block's weights are cast (bf16 → float32 is exact) and
multiplied while they are in cache, so the float32 copy of a weight never exists whole, and every output column
is the same dot product a float32 `nn.Linear` computes (tests compare the logits bit for bit). A table looks up
its rows in the stored dtype and casts them. The small weights (norms, biases, the resampler's queries, the patch
convolution) are materialized in the compute dtype.

A compressed-tensors checkpoint (`mcq quantize`: packed int4/int8 levels) keeps its packed tensors mapped; each
call dequantizes a Linear a block of rows at a time, with the arithmetic transformers' loader uses when it
dequantizes at load, then multiplies as above. That trades time for memory: the packed model is read once per
forward, never held as floats.

The mapped pages are file-backed: the kernel counts them in the resident set while they are used and drops them
under pressure, so they neither count as the process's anonymous memory nor need swap.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .loading import PACKED_LINEAR_SUFFIXES, meta_skeleton

# Output rows of a Linear computed per block: 256 rows of a 4096-wide float32 weight are 4 MiB, which stay in cache
# between the cast and the product.
ROW_BLOCK = 256


_SCRATCH: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _scratch(in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """A block of ROW_BLOCK weight rows, one per width and dtype for the process (a fresh 4-12 MiB tensor per
    block, freed and allocated again, cost page faults on the scale of the block's product at one token)."""
    key = (in_features, dtype)
    if key not in _SCRATCH:
        _SCRATCH[key] = torch.empty(ROW_BLOCK, in_features, dtype=dtype)
    return _SCRATCH[key]


class MappedLinear(nn.Module):
    """`nn.Linear` over a weight kept in its stored form (mapped), computing in `dtype` a block of output rows at a
    time. `rows(start, stop, out)` writes rows start:stop of the weight, in `dtype`, into `out` (a scratch block)
    and returns it, or is None for a weight only `full()` can give; `full()` gives the whole weight, also for the
    few readers of `weight`."""

    def __init__(self, rows, full, shape: tuple[int, int], bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self._rows, self._full, self.compute_dtype = rows, full, dtype
        self.out_features, self.in_features = shape
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)

    @classmethod
    def stored(cls, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> MappedLinear:
        """Over a floating weight in its stored dtype (cast block by block: bf16 → float32 is exact)."""
        return cls(lambda start, stop, out: out.copy_(weight[start:stop]), lambda: weight, tuple(weight.shape),
                   bias, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self._full()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self._rows is None:                     # a packing with no blockwise path: dequantized whole per call
            return F.linear(x, self._full(), self.bias)
        scratch = _scratch(self.in_features, self.compute_dtype)
        bias, blocks = self.bias, []
        for start in range(0, self.out_features, ROW_BLOCK):
            stop = min(start + ROW_BLOCK, self.out_features)
            weight = self._rows(start, stop, scratch[: stop - start])
            blocks.append(F.linear(x, weight, None if bias is None else bias[start:stop]))
        return torch.cat(blocks, dim=-1) if len(blocks) > 1 else blocks[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mapped"


class MappedEmbedding(nn.Module):
    """`nn.Embedding` over a table kept in its stored dtype (mapped): rows are looked up, then cast."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        self._stored, self.compute_dtype, self.padding_idx = table, dtype, padding_idx
        self.num_embeddings, self.embedding_dim = table.shape

    @property
    def weight(self) -> torch.Tensor:
        return self._stored

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._stored).to(self.compute_dtype)


def load_mapped(path: Path, config, dtype: torch.dtype):
    """The MiniCPMV of checkpoint `path` (checked by the caller) with its Linears and tables mapped, computing in
    `dtype` on CPU."""
    from .weights import CheckpointReader, shell_model

    model = shell_model(config)
    reader = CheckpointReader(path)
    stored = set(reader.stored_names)
    schemes = _compressed_schemes(model, config, stored)
    # A tied parameter (4.6's lm_head is its embedding table) is stored once, under the name met first in the
    # tied skeleton (the shell model leaves it untied).
    first_of: dict[int, str] = {}
    stored_as = {param_name: first_of.setdefault(id(param), param_name)
                 for param_name, param in meta_skeleton(config).named_parameters(remove_duplicate=False)}
    for name, module in list(model.named_modules()):
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if not own and name not in schemes:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            bias = reader.read_params([f"{prefix}bias"])[f"{prefix}bias"] if module.bias is not None else None
            if name in schemes:
                replacement = _packed_linear(reader, name, schemes[name], stored, bias, dtype)
            else:
                source = stored_as[f"{prefix}weight"]
                replacement = MappedLinear.stored(reader.read_params([source])[source], bias, dtype)
            _set(model, name, replacement)
        elif isinstance(module, nn.Embedding):
            table = reader.read_params([f"{prefix}weight"])[f"{prefix}weight"]
            _set(model, name, MappedEmbedding(table, dtype, module.padding_idx))
        else:
            tensors = reader.read_params([prefix + n for n in own])
            for n in own:
                value = tensors[prefix + n]
                setattr(module, n, nn.Parameter(value.to(dtype) if value.is_floating_point() else value,
                                                requires_grad=False))
    return model.eval()


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _compressed_schemes(model: nn.Module, config, stored: set[str]) -> dict[str, Any]:
    """Module → compressed-tensors scheme, for the Linears a quantized checkpoint stores packed (its config
    groups' targets matched by compressed-tensors itself)."""
    quantization = getattr(config, "quantization_config", None) or {}
    if not quantization:
        return {}
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.utils.match import is_match

    packed = sorted({n.rsplit(".", 1)[0] for n in stored if n.endswith(".weight_packed")})
    schemes = {}
    for group in quantization.get("config_groups", {}).values():
        scheme = QuantizationScheme.model_validate(group)
        for module in packed:
            if is_match(module, model.get_submodule(module), scheme.targets):
                schemes.setdefault(module, scheme)
    return schemes


def _packed_linear(reader, module: str, scheme, stored: set[str], bias: torch.Tensor | None,
                   dtype: torch.dtype) -> MappedLinear:
    """A compressed-tensors Linear over its mapped packed levels. Dequantized as transformers' loader does it
    (compressed-tensors' own `decompress`, scales cast to the compute dtype first), and for the common packings
    (4 or 8 bits, per group or per channel, no activation order, on a little-endian machine) a block of rows at a
    time with the same arithmetic, `(level - zero) * scale` per element: equal bytes, without unpacking the whole
    matrix on every call (compressed-tensors' unpacking of one 12288 x 4096 weight takes ~0.5 s, which every
    decoded token paid per Linear)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    packed = {suffix: reader.read_stored(f"{module}.{suffix}") for suffix in PACKED_LINEAR_SUFFIXES
              if f"{module}.{suffix}" in stored}
    out_features, in_features = shape = tuple(packed["weight_shape"].tolist())
    scale = packed["weight_scale"]

    def full() -> torch.Tensor:
        return PackedQuantizationCompressor.decompress(
            {**packed, "weight_scale": scale.to(dtype)}, scheme)["weight"].to(dtype)

    args = scheme.weights
    bits = args.num_bits
    blockwise = (args.type == "int" and bits in (4, 8) and args.strategy in ("group", "channel")
                 and "weight_g_idx" not in packed and sys.byteorder == "little" and in_features % (32 // bits) == 0
                 and scale.dim() == 2 and scale.shape[0] == out_features and in_features % scale.shape[1] == 0
                 and ("weight_zero_point" in packed) == (not args.symmetric))
    if not blockwise:
        return MappedLinear(None, full, shape, bias, dtype)
    # Stored levels are unsigned (the signed level plus 2^(bits-1)); the zero point, small, is unpacked once.
    offset = torch.full((out_features, scale.shape[1]), 1 << (bits - 1), dtype=torch.int16)
    if not args.symmetric:
        offset += unpack_from_int32(packed["weight_zero_point"], bits, (out_features, scale.shape[1]),
                                    packed_dim=0).to(torch.int16)
    offset = offset.to(dtype)
    levels = packed["weight_packed"].view(torch.uint8)     # little-endian: element i is in byte i * bits // 8
    group = in_features // scale.shape[1]

    def rows(start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        stored_rows = levels[start:stop]
        if bits == 4:
            # Two levels per byte, the first in the low nibble: a byte low + 16 high widened to int16 and added
            # 15 x (its high nibble x 16) is low + 256 high, whose two little-endian bytes are the levels in
            # order. Contiguous int16 ops: writing the nibbles to every other float instead took 1.5x the time.
            wide = stored_rows.to(torch.int16)
            stored_rows = wide.add_(wide & 0xF0, alpha=15).view(torch.uint8)
        out.copy_(stored_rows.view(stop - start, in_features))
        groups = out.view(stop - start, -1, group)
        groups.sub_(offset[start:stop, :, None]).mul_(scale[start:stop, :, None].to(dtype))
        return out
    return MappedLinear(rows, full, shape, bias, dtype)
