"""The navit SigLIP vision tower of MiniCPM-V (`vpm.*`): variable-resolution slices packed into one patch row.

Parameter names equal the official checkpoint (`vpm.embeddings.patch_embedding`, `vpm.embeddings.position_embedding`,
`vpm.encoder.layers.N.{self_attn,mlp,layer_norm1,layer_norm2}`, `vpm.post_layernorm`). The encoder layers are
transformers' own `SiglipEncoder`; what MiniCPM-V adds is the embedding step: a slice of h x w patches looks its
positions up in the fixed (image_size/patch)^2 table by fractional bucketing, and padded patches are masked out.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder


def navit_position_ids(tgt_sizes: torch.Tensor, num_patches_per_side: int, max_patches: int) -> torch.Tensor:
    """Position ids `[B, max_patches]` of each slice's patches in the `num_patches_per_side`^2 table; padding gets 0.

    The official embedding takes a slice of n patches per side to the coordinates `arange(0, 1 - 1e-6, 1 / n)` and
    sorts them into the table's boundaries `arange(1 / side, 1, 1 / side)` with `bucketize(right=True)`. There `n`
    is held in an integer tensor, so `1 / n` is a float32 value (1/25 is 0.0399999991), not the double one. Both
    aranges run in torch's CPU kernel (`_arange_float32`). For 25, 49, 50, 55 and 58 patches per side the result
    puts rows in other buckets than a double step would (or exact integer math), and reproducing official outputs
    means reproducing that. Graph exporters without bucketize (ONNX, Core ML) call this function on the host.
    """
    boundaries = _arange_float32(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side)
    position_ids = torch.zeros(len(tgt_sizes), max_patches, dtype=torch.long)
    for i, (nh, nw) in enumerate(tgt_sizes.tolist()):
        bucket_h, bucket_w = (np.searchsorted(boundaries, _arange_float32(0.0, 1 - 1e-6, float(1 / np.float32(n))),
                                              side="right") for n in (nh, nw))
        ids = (bucket_h[:, None] * num_patches_per_side + bucket_w).reshape(-1)
        position_ids[i, : ids.size] = torch.from_numpy(ids)
    return position_ids


def _arange_float32(start: float, end: float, step: float) -> np.ndarray:
    """float32 `torch.arange(start, end, step)` as torch's CPU kernel computes it with 8-lane vectors (its default
    and AVX2 builds), the same on every machine.

    The kernel does not round `start + i * step` (double) once per element: it fills pairs of 8-lane vectors, each
    lane its vector's first value rounded to float32 plus `lane * step` in double; only the elements after the last
    full pair take the exact path. An AVX-512 build has 16 lanes, which moves the buckets of 49 and 58 patches per
    side. The official outputs mcq is compared with were computed by the 8-lane kernel, and computing that one rule
    here (rather than calling torch.arange) keeps position ids, and every calibration and export that uses them,
    the same on every machine.
    """
    count = math.ceil((end - start) / step)
    index = np.arange(count)
    values = (start + step * index).astype(np.float32)
    vectorized = count // 16 * 16
    lane = index[:vectorized] % 8
    first = (start + step * (index[:vectorized] - lane)).astype(np.float32).astype(np.float64)
    values[:vectorized] = (first + lane * step).astype(np.float32)
    return values


class MiniCPMVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # pixel_values [B, C, patch, patch * L]: the conv turns the row of patches into L embeddings.
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding(position_ids)


class MiniCPMVisionTransformer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = MiniCPMVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_attention_mask: torch.Tensor,
        tgt_sizes: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[B, L, hidden]` features of B packed slices; `patch_attention_mask` `[B, L]` is True on real patches."""
        if position_ids is None:
            position_ids = navit_position_ids(tgt_sizes, self.embeddings.num_patches_per_side, pixel_values.shape[-1]
                                              // self.embeddings.patch_size)
        position_ids = position_ids.to(pixel_values.device) * patch_attention_mask
        hidden_states = self.embeddings(pixel_values, position_ids)
        attention_mask = None
        if not bool(patch_attention_mask.all()):
            # Additive key mask, broadcast over heads and queries: padded patches are never attended to.
            additive = torch.zeros(patch_attention_mask.shape, dtype=hidden_states.dtype, device=hidden_states.device)
            additive.masked_fill_(~patch_attention_mask, torch.finfo(hidden_states.dtype).min)
            attention_mask = additive[:, None, None, :]
        hidden_states = self.encoder(inputs_embeds=hidden_states, attention_mask=attention_mask).last_hidden_state
        return self.post_layernorm(hidden_states)
