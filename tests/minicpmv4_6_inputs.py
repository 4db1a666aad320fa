"""Inputs for MiniCPM-V 4.6 in tests: an image and a question laid out as its processor lays them out.

transformers builds `MiniCPMV4_6Processor` only with torchvision (for its video processor), which mcq does not
need; its image processor (PIL backend) and tokenizer load without it, and mcq expands the placeholder as the
processor does (`mcq.models.minicpmv4_6.calibration.expand_images`): `<image_id>0</image_id><image>`, one image
token per 16 patches (two 2x2 merges), `</image>`."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoTokenizer
# transformers' top-level AutoImageProcessor is a placeholder without torchvision; this one picks the PIL backend.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from mcq.models.minicpmv4_6.calibration import expand_images


def random_image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy())


def image_inputs(path, image: Image.Image) -> dict[str, torch.Tensor]:
    """One unsliced image and a question, as model inputs."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    pixels = AutoImageProcessor.from_pretrained(path)(image, slice_mode=False, return_tensors="pt")
    text = expand_images(f"<|im_start|>user\n{tokenizer.image_token}\nWhat is in the picture?<|im_end|>\n"
                         "<|im_start|>assistant\n", tokenizer, pixels, divisor=16)
    return {**tokenizer(text, return_tensors="pt"), "pixel_values": pixels["pixel_values"],
            "target_sizes": pixels["target_sizes"]}
