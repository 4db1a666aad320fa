"""Host code shared by the exports traced from a family's programs (`mcq.models.familyspec.Programs`: ONNX and Core
ML runtimes of MiniCPM-V 4.6): a sample's vision blocks, and writing them over the text's image (and video) token
slots."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mcq.errors import McqError


def sample_blocks(programs, config, data: Mapping[str, Any],
                  run_vision: Callable[[dict[str, np.ndarray]], np.ndarray]) -> np.ndarray:
    """The vision blocks of an encoded sample: each image, then each video frame (`programs.visuals` in order),
    through `run_vision` (the vision program's inputs by name → `[tokens, hidden]`), zero-padded to the longest."""
    import torch

    blocks = [run_vision({name: np.asarray(value) for name, value in inputs.items()})
              for visual in programs.visuals if visual.pixels in data
              for inputs in programs.vision_inputs(config, torch.as_tensor(data[visual.pixels]).float(),
                                                   data[visual.sizes])]
    return _padded(blocks)


def has_visuals(programs, data: Mapping[str, Any]) -> bool:
    return any(visual.pixels in data for visual in programs.visuals)


def write_visual_features(programs, config, embeds: np.ndarray, ids: np.ndarray, blocks: np.ndarray,
                          data: Mapping[str, Any]) -> np.ndarray:
    """`embeds` with the sample's vision blocks (`sample_blocks`' order) written over each kind's token slots."""
    start = 0
    for visual in programs.visuals:
        if visual.pixels in data:
            counts = programs.image_tokens(config, data[visual.sizes])
            _write_features(embeds, ids, blocks[start:start + len(counts)], counts, getattr(config, visual.token),
                            visual.token.removesuffix("_token_id"))
            start += len(counts)
    return embeds


def _padded(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """One vision block per image (`[tokens, hidden]`, tokens varying) → `[images, longest, hidden]` float32, each
    zero-padded at the end."""
    padded = np.zeros((len(blocks), max(len(b) for b in blocks), blocks[0].shape[-1]), dtype=np.float32)
    for index, block in enumerate(blocks):
        padded[index, :len(block)] = block
    return padded


def _write_features(embeds: np.ndarray, ids: np.ndarray, blocks: np.ndarray, counts: Sequence[int], token_id: int,
                    kind: str) -> None:
    """Block i's first `counts[i]` tokens, in order, over the slots of `token_id` in `ids` (`embeds` is shaped as
    `ids` plus hidden); a McqError when the slots and the features disagree in number."""
    features = np.concatenate([block[:count] for block, count in zip(blocks, counts)])
    slots = np.asarray(ids) == token_id
    if int(slots.sum()) != len(features):
        raise McqError(f"{int(slots.sum())} {kind} tokens in the text but {len(features)} {kind} features")
    embeds[slots] = features
