"""How vLLM's MiniCPM-V (2.6 / 4.0 / 4.5) takes mcq's encoded samples (`mcq.models.familyspec.VllmInputs`): the
`(<image>./</image>)` marker its processor expands, per-slice pixels for its vision tower and resampler, and
resampler outputs as image embeddings with the images' sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .configuration import MiniCPMVConfig
from .processing import IMAGE_MARKER, MiniCPMVProcessor
from .tokenization import special_token_ids
from .versions import version_spec


class MiniCPMVVllmInputs:
    marker = IMAGE_MARKER
    # vLLM's MiniCPM-V takes a video's frames without the temporal ids 4.5's 3D resampler groups them by, and
    # without the newlines the official `chat()` puts between frames: no prompt of it is the reference's.
    video_marker = None
    cpu_dtype = None

    def __init__(self, path: Path):
        self.tokenizer = MiniCPMVProcessor.from_pretrained(path).tokenizer
        spec = version_spec(MiniCPMVConfig.from_pretrained(path).version)
        self.terminators = special_token_ids(self.tokenizer).terminator_ids(spec.terminators)

    def vision_inputs(self, data: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        return {"pixel_values": [p.to(dtype) for p in data["pixel_values"][0]], "tgt_sizes": data["tgt_sizes"][0],
                "temporal_ids": None}

    def vision_blocks(self, states: torch.Tensor) -> torch.Tensor:
        return states

    def image_embeds(self, data: dict[str, Any], slices: list[int], vision: torch.Tensor) -> dict[str, Any]:
        blocks = torch.split(vision, slices)
        return {"image_embeds": [block.flatten(0, 1) for block in blocks],
                "image_sizes": torch.tensor([list(size) for size in data["image_sizes"][0]])}
