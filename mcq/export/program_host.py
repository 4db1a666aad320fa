"""Host code shared by the exports traced from a family's programs (`mcq.models.familyspec.Programs`: ONNX and Core
ML runtimes of MiniCPM-V 4.6): a sample's vision blocks, and writing them over the text's image-token slots."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mcq.errors import McqError


def padded_blocks(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """One vision block per image (`[tokens, hidden]`, tokens varying) → `[images, longest, hidden]` float32, each
    zero-padded at the end."""
    padded = np.zeros((len(blocks), max(len(b) for b in blocks), blocks[0].shape[-1]), dtype=np.float32)
    for index, block in enumerate(blocks):
        padded[index, :len(block)] = block
    return padded


def write_image_features(embeds: np.ndarray, ids: np.ndarray, blocks: np.ndarray, counts: Sequence[int],
                         image_token_id: int) -> np.ndarray:
    """`embeds` (shaped as `ids` plus hidden) with image i's first `counts[i]` tokens of `blocks[i]`, in order, over
    the image-token slots of `ids`; a McqError when the slots and the features disagree in number."""
    features = np.concatenate([block[:count] for block, count in zip(blocks, counts)])
    slots = np.asarray(ids) == image_token_id
    if int(slots.sum()) != len(features):
        raise McqError(f"{int(slots.sum())} image tokens in the text but {len(features)} vision features")
    embeds[slots] = features
    return embeds
