"""The MiniCPM-V perceiver resampler (`resampler.*`): 64 learned queries attend to the vision features of a slice.

State-dict names are the official ones: `query`, `kv_proj`, `attn.in_proj_weight/in_proj_bias` (q, k, v rows
packed as in `nn.MultiheadAttention`), `attn.out_proj`, `ln_q`, `ln_kv`, `ln_post`, and `proj`, a bare parameter
applied as `x @ proj`. The 2D sin-cos position is added to the keys only (HF remote code; vLLM's Resampler4_5 adds
it to the values, which disagrees with the official checkpoint's own code).

4.5 adds the 3D path: frames of a video are grouped by `temporal_ids`, each frame's keys get a temporal sin-cos
term, and the keys/values of a whole group are concatenated so one block of 64 queries summarises all its frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """`[..., dim]` = [sin(p w), cos(p w)], w_i = 10000^(-i / (dim/2)); float32 numpy like the official tables."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("...,d->...d", positions.astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=-1)


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """`[height * width, dim]` row-major: the first half encodes the column, the second half the row."""
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=-1)
    return torch.from_numpy(table.reshape(height * width, dim))


def sincos_temporal(dim: int, temporal_ids: Sequence[int]) -> torch.Tensor:
    """`[n, dim]` temporal term per frame; id -1 (an image, not a video frame) gets zeros."""
    ids = np.asarray(temporal_ids, dtype=np.float32)
    table = _sincos_1d(dim, ids)
    table[ids < 0] = 0.0
    return torch.from_numpy(table)


def key_term(dim: int, height: int, width: int, temporal_id: int = -1) -> np.ndarray:
    """`[height * width, dim]` float32: what the resampler adds to the keys of a slice of h x w patches, the 2D
    sin-cos of its grid plus, for a video frame (4.5), the temporal term of its id. Exporters whose graphs take the
    key term as an input (ONNX, Core ML) have their hosts compute it here."""
    return (sincos_2d(dim, height, width) + sincos_temporal(dim, [temporal_id])).numpy()


class ResamplerAttention(nn.Module):
    """Multi-head cross attention, batch first, with its projections as Linears (so quantizers and hooks see them).

    The official checkpoint stores them as `nn.MultiheadAttention`'s packed `in_proj_weight`/`in_proj_bias`;
    `checkpoint_names` maps those onto `q_proj`/`k_proj`/`v_proj` on load and back on save.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"resampler width {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query, key, value, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """query `[B, Q, D]`, key/value `[B, L, D]`, key_padding_mask `[B, L]` True on padding → `[B, Q, D]`."""
        batch, head_dim = query.shape[0], self.embed_dim // self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.num_heads, head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        attend = ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        return self.out_proj(out.transpose(1, 2).reshape(batch, -1, self.embed_dim))


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int, temporal: bool):
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"resampler width {embed_dim} must be divisible by 4 for the 2D sin-cos table")
        self.num_queries, self.embed_dim, self.temporal = num_queries, embed_dim, temporal
        self.query = nn.Parameter(torch.empty(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        # Stored officially as a bare `proj` Parameter applied as `x @ proj`: this Linear holds its transpose.
        self.proj = nn.Linear(embed_dim, embed_dim, bias=False)

    def key_positions(self, tgt_sizes: torch.Tensor, max_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """2D position term `[B, L, D]` and key padding mask `[B, L]` (True past h*w) for a batch of slices."""
        positions = torch.zeros(len(tgt_sizes), max_patches, self.embed_dim)
        padding = torch.ones(len(tgt_sizes), max_patches, dtype=torch.bool)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            positions[i, : h * w] = sincos_2d(self.embed_dim, h, w)
            padding[i, : h * w] = False
        return positions, padding

    def forward(
        self,
        x: torch.Tensor,
        tgt_sizes: torch.Tensor,
        temporal_ids: Sequence[Sequence[int]] | None = None,
        key_positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x `[B, L, kv_dim]` features of B slices → `[G, num_queries, D]`, G = B, or the number of temporal groups.

        `key_positions` may be passed precomputed (exporters feed them as graph inputs: ONNX has no bucketize).
        """
        positions, padding = key_positions or self.key_positions(tgt_sizes, x.shape[1])
        positions, padding = positions.to(device=x.device, dtype=x.dtype), padding.to(x.device)
        x = self.ln_kv(self.kv_proj(x))
        keys, values = x + positions, x
        if temporal_ids is not None and self.temporal:
            flat = [t for group in temporal_ids for t in group]
            if len(flat) != x.shape[0]:
                raise ValueError(f"temporal_ids name {len(flat)} slices but the batch has {x.shape[0]}")
            keys = keys + sincos_temporal(self.embed_dim, flat).to(keys)[:, None, :]
            keys, values, padding = _pack_groups([len(g) for g in temporal_ids], keys, values, padding)
        query = self.ln_q(self.query).unsqueeze(0).expand(keys.shape[0], -1, -1)
        out = self.attn(query, keys, values, padding)
        return self.proj(self.ln_post(out))


def _pack_groups(group_sizes: list[int], keys, values, padding):
    """Concatenate the frames of each group frame-major into one sequence; pad groups to the longest (masked)."""
    packed_k, packed_v, packed_mask = [], [], []
    start = 0
    for size in group_sizes:
        end = start + size
        packed_k.append(keys[start:end].reshape(-1, keys.shape[-1]))
        packed_v.append(values[start:end].reshape(-1, values.shape[-1]))
        packed_mask.append(padding[start:end].reshape(-1))
        start = end
    pad = nn.utils.rnn.pad_sequence
    return (pad(packed_k, batch_first=True), pad(packed_v, batch_first=True),
            pad(packed_mask, batch_first=True, padding_value=True))
