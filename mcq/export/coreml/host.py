"""What the app computes on the host before calling the vision package (and what the sidecar JSON describes).

The navit position ids use the official float32 bucketing (`navit_position_ids`), and the resampler's key term is
the 2D sin-cos table of the slice's h x w grid (`resampler.key_term`: for a 4.5 video frame plus the temporal
term of its id); both depend only on (h, w) (and the id), so an app can cache them.
"""

from __future__ import annotations

import numpy as np
import torch

from mcq.errors import McqError
from mcq.models.minicpmv.resampler import key_term
from mcq.models.minicpmv.vision import navit_position_ids


def vision_inputs(pixel_slice, height: int, width: int, *, patch: int, patches_per_side: int, hidden: int,
                  max_patches: int, temporal_id: int = -1) -> dict[str, np.ndarray]:
    """Inputs for one slice `[3, patch, patch * h * w]` of h x w patches (processor output): of `MiniCPMV-vision`,
    and where the export has a group resampler, `pixel_values`, `position_ids` and `patch_mask` are the tower's
    and `patch_mask` and `key_positions` the frame's rows of the resampler's. `temporal_id`: the frame's id in a
    video (-1: an image slice, no temporal term)."""
    count = height * width
    if count > max_patches:
        raise McqError(f"a slice of {height}x{width} = {count} patches exceeds the package's {max_patches}")
    pixels = torch.as_tensor(pixel_slice, dtype=torch.float32)
    if tuple(pixels.shape) != (3, patch, patch * count):
        raise McqError(f"slice pixels have shape {list(pixels.shape)}, expected [3, {patch}, {patch * count}]")
    padded = np.zeros((1, 3, patch, patch * max_patches), dtype=np.float32)
    padded[0, :, :, : patch * count] = pixels.numpy()
    sizes = torch.tensor([[height, width]])
    position_ids = navit_position_ids(sizes, patches_per_side, max_patches).numpy().astype(np.int32)
    mask = np.zeros((1, max_patches), dtype=np.float32)
    mask[0, :count] = 1.0
    key_positions = np.zeros((1, max_patches, hidden), dtype=np.float32)
    key_positions[0, :count] = key_term(hidden, height, width, temporal_id)
    return {"pixel_values": padded, "position_ids": position_ids, "patch_mask": mask,
            "key_positions": key_positions}


def rotary_inputs(positions, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """`position_cos`, `position_sin` [1, 1, S, head_dim] of the LLM package for absolute `positions` (float32 math,
    the halves duplicated as in rotate-half RoPE)."""
    inverse = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = np.asarray(positions, dtype=np.float32)[:, None] * inverse[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles)[None, None], np.sin(angles)[None, None]


def causal_mask(past: int, length: int, masked: float = -1.0e4) -> np.ndarray:
    """[1, 1, length, past + length]: query i (at position past + i) sees cached positions ≤ past + i."""
    keys = np.arange(past + length)[None, :]
    queries = past + np.arange(length)[:, None]
    return np.where(keys <= queries, 0.0, masked).astype(np.float32)[None, None]
