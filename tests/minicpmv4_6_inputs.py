"""Inputs for MiniCPM-V 4.6 in tests: an image and a question laid out as its processor lays them out.

transformers builds `MiniCPMV4_6Processor` only with torchvision (for its video processor), which mcq does not
need; its image processor (PIL backend) and tokenizer load without it, and mcq expands the placeholder as the
processor does (`mcq.models.minicpmv4_6.calibration.expand_images`): `<image_id>0</image_id><image>`, one image
token per 16 patches (two 2x2 merges), `</image>`. `images_processor` is transformers' processor itself with its
video half left out, the reference mcq's expansion is checked against."""

from __future__ import annotations

import torch
from PIL import Image
from transformers import AutoTokenizer, MiniCPMV4_6Processor
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


def images_processor(path) -> MiniCPMV4_6Processor:
    """transformers' `MiniCPMV4_6Processor` of the checkpoint in `path`, for images: its own `__call__` (image
    processing, placeholders, image ids, tokenization). Its `__init__` cannot run without torchvision (it takes the
    video processor), so what that `__init__` sets from the image processor and the tokenizer is set here as
    transformers 5.17 sets it; the video attributes are left out, and a video input would fail."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    images = AutoImageProcessor.from_pretrained(path)
    processor = MiniCPMV4_6Processor.__new__(MiniCPMV4_6Processor)
    processor.image_processor, processor.tokenizer = images, tokenizer
    processor.slice_mode, processor.default_use_image_id = images.slice_mode, images.use_image_id
    processor.image_token_divisor = 4 if images.downsample_mode == "4x" else 16
    for name in ("image_token", "video_token", "image_token_id", "video_token_id", "image_start_token",
                 "image_end_token", "slice_start_token", "slice_end_token", "image_id_start_token",
                 "image_id_end_token"):
        setattr(processor, name, getattr(tokenizer, name))
    return processor


# Videos checked against transformers' own processor (tests/data/minicpmv4_6_video/make_reference.py): the images
# before the video as (width, height, seed), the frames' size, how many, and the processor's options. 640x480 is
# sliced (overview + 2 slices a frame), 150x100 upscaled, max_slice_nums 1 leaves 640x480 whole.
VIDEO_CASES = {
    "sliced": {"images": [], "video": (640, 480), "frames": 2},
    "upscaled": {"images": [], "video": (150, 100), "frames": 3},
    "one-slice": {"images": [], "video": (640, 480), "frames": 2, "options": {"max_slice_nums": 1}},
    "image-and-video": {"images": [(200, 120, 7)], "video": (300, 200), "frames": 2},
}
VIDEO_QUESTION = "What happens in this video?"


def video_case(name: str) -> tuple[list[Image.Image], list[Image.Image]]:
    """The images and the video frames of `VIDEO_CASES[name]`: noise, each frame its own."""
    case = VIDEO_CASES[name]
    width, height = case["video"]
    return ([random_image(w, h, seed=seed) for w, h, seed in case["images"]],
            [random_image(width, height, seed=100 + index) for index in range(case["frames"])])
