"""MiniCPM-V 4.6 calibration: samples → inputs of transformers' own forward, and how the block-by-block driver runs
that forward (`mcq.models.familyspec.Calibration`).

Encoding: transformers builds `MiniCPMV4_6Processor` only with torchvision (for its video processor), which mcq does
not depend on; its image processor (PIL backend) and the tokenizer load without it. So the conversation is rendered
by the tokenizer's chat template with one `tokenizer.image_token` per image and one `tokenizer.video_token` per
video, as the processor takes them, and each is expanded here into the placeholder the processor writes
(`expand_images`, `expand_videos`). A video's pixels are what the video processor computes, reproduced with torch
alone (`video.VideoEncoder`); a video sample's frames (its images) are one video, its temporal ids unused (4.6 has
none).

Capture: transformers 5.17's vision tower runs every image packed into one sequence, and its `vit_merger` reshapes
that sequence as if all images had the first one's size (`get_vision_merged_shape`): a sliced image (its overview
and slices differ in size) or two images of different sizes fail there or are merged across image borders. While
the driver captures, the tower is called once per run of consecutive images of equal size, and the runs' outputs
are concatenated in order: every image is computed exactly as on its own (attention, windows and position tables
are per image), and the merger, which walks `target_sizes` image by image, gets the sequence it expects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoTokenizer
# transformers' top-level AutoImageProcessor is a placeholder without torchvision; this one picks the PIL backend.
from transformers.models.auto.image_processing_auto import AutoImageProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

from mcq.errors import McqError

from ..familyspec import VisualInput
from .video import Video, VideoEncoder

# What `MiniCPMV4_6ForConditionalGeneration.forward` reads from an encoded sample.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "target_sizes", "pixel_values_videos",
                "target_sizes_videos")
# Images, then video frames: the model's forward merges them in this order, each at its own token; a video's frames
# go through the tower as images do (`get_video_features` is `get_image_features` on them).
VISUALS = (VisualInput("pixel_values", "target_sizes", "image_token_id"),
           VisualInput("pixel_values_videos", "target_sizes_videos", "video_token_id"))


def norm_offset(norm: nn.Module) -> float:
    """1 for Qwen3.5's RMSNorm, which scales by 1 + weight (`Family.norm_offset`); 0 for the vision LayerNorms."""
    return float(isinstance(norm, Qwen3_5RMSNorm))


def expand_images(text: str, tokenizer, processed: dict[str, Any], divisor: int, use_image_id: bool = True) -> str:
    """`text` with its i-th `tokenizer.image_token` replaced by the placeholder `MiniCPMV4_6Processor` writes for
    image i of `processed` (the image processor's output): `<image_id>i</image_id>` (with `use_image_id`), then the
    image's `block_placeholder`."""
    pieces = text.split(tokenizer.image_token)
    grids, counts = processed["grids"], processed["num_patches_per_image"]
    if len(pieces) - 1 != len(counts):
        raise McqError(f"{len(pieces) - 1} image placeholders in the text for {len(counts)} images")
    tokens = (processed["target_sizes"].prod(-1) // divisor).tolist()
    expanded, first = [pieces[0]], 0
    for index, (count, (rows, columns)) in enumerate(zip(counts, grids)):
        placeholder = block_placeholder(tokenizer, tokenizer.image_token, tokens[first: first + count], rows, columns)
        first += count
        expanded += [_image_id(tokenizer, index, use_image_id) + placeholder, pieces[index + 1]]
    return "".join(expanded)


def expand_videos(text: str, tokenizer, processed: dict[str, Any], divisor: int, use_image_id: bool) -> str:
    """`text` with its i-th `tokenizer.video_token` replaced by the placeholder `MiniCPMV4_6Processor` writes for
    video i of `processed` (`VideoEncoder`'s output): `<image_id>i</image_id>` once (with `use_image_id`; i counts
    the videos), then each frame's `block_placeholder` in video tokens, frame after frame."""
    pieces = text.split(tokenizer.video_token)
    counts = processed["num_frames_per_video"]
    if len(pieces) - 1 != len(counts):
        raise McqError(f"{len(pieces) - 1} video placeholders in the text for {len(counts)} videos")
    tokens = (processed["target_sizes_videos"].prod(-1) // divisor).tolist()
    grids = iter(processed["grids"])
    expanded, first = [pieces[0]], 0
    for index, count in enumerate(counts):
        placeholder = _image_id(tokenizer, index, use_image_id)
        for rows, columns in (next(grids) for _ in range(count)):
            units = 1 + rows * columns
            placeholder += block_placeholder(tokenizer, tokenizer.video_token, tokens[first: first + units], rows,
                                             columns)
            first += units
        expanded += [placeholder, pieces[index + 1]]
    return "".join(expanded)


def block_placeholder(tokenizer, token: str, tokens: list[int], rows: int, columns: int) -> str:
    """An image's (or a video frame's) placeholder: the overview's `<image>` + `tokens[0]` `token`s + `</image>`,
    then when sliced (`rows` x `columns`) the slices' rows, newline-joined, each `<slice>` + `tokens[1]` `token`s
    + `</slice>` once per column."""
    placeholder = f"{tokenizer.image_start_token}{token * tokens[0]}{tokenizer.image_end_token}"
    if rows > 0 and columns > 0:
        one = f"{tokenizer.slice_start_token}{token * tokens[1]}{tokenizer.slice_end_token}"
        placeholder += "\n".join(one * columns for _ in range(rows))
    return placeholder


def _image_id(tokenizer, index: int, use_image_id: bool) -> str:
    return f"{tokenizer.image_id_start_token}{index}{tokenizer.image_id_end_token}" if use_image_id else ""


def merged_tokens_divisor(downsample_mode: str | None) -> int:
    """Patches per image token: the merger's 2x2 merge, and with the vit_merger ("16x", the default) its 2x2 too."""
    return 4 if downsample_mode == "4x" else 16


class CalibrationEncoder:
    """4.6's `mcq.models.familyspec.CalibrationEncoder` (see the module doc)."""

    video = True

    def __init__(self, path: Path):
        self.tokenizer = _loaded("tokenizer", AutoTokenizer, path)
        self.images = _loaded("image processor", AutoImageProcessor, path)
        self.divisor = merged_tokens_divisor(self.images.downsample_mode)
        self.videos = VideoEncoder(path, self.images)
        self.video_divisor = merged_tokens_divisor(self.videos.settings["downsample_mode"])

    def render(self, turns, add_generation_prompt: bool) -> str:
        """The chat-template text of `turns` with one `tokenizer.image_token` per image and one
        `tokenizer.video_token` per video (`expand_images` and `expand_videos` expand them)."""
        return self._render(turns, add_generation_prompt)[0]

    def _render(self, turns, add_generation_prompt: bool, **template: Any
                ) -> tuple[str, list[Image.Image], list[Video]]:
        rendered, images, videos = [], [], []
        for turn in turns:
            content = [turn["content"]] if isinstance(turn["content"], str) else turn["content"]
            parts = []
            for item in content:
                if isinstance(item, Image.Image):
                    images.append(item)
                    parts.append(self.tokenizer.image_token)
                elif isinstance(item, Video):
                    videos.append(item)
                    parts.append(self.tokenizer.video_token)
                else:
                    parts.append(item)
            rendered.append({"role": turn["role"], "content": "\n".join(parts)})
        text = self.tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **template)
        return text, images, videos

    def __call__(self, sample, max_slice_nums: int | None) -> dict[str, Any]:
        """The model inputs of `sample` (`mcq.calibration.Sample`): its turns teacher-forced (a prompt-only one ends
        with the generation prompt), images and video frames sliced into at most `max_slice_nums` (None: the
        processors' defaults). A video sample's frames are one video, where its first frame is."""
        turns = [_as_video(turn) for turn in sample.messages] if sample.is_video else sample.messages
        return self.encode(turns, not sample.has_answer, max_slice_nums)

    def encode(self, turns, add_generation_prompt: bool, max_slice_nums: int | None, **template: Any
               ) -> dict[str, Any]:
        """The model inputs of a conversation (turns whose content is a string or a list of strings, PIL images
        and `Video`s), and where each image block's tokens are (`image_bound`); `template`: the chat template's
        variables (enable_thinking)."""
        text, images, videos = self._render(turns, add_generation_prompt, **template)
        options = {} if max_slice_nums is None else {"max_slice_nums": max_slice_nums}
        pixels = {}
        if images:
            processed = self.images(images, return_tensors="pt", **options)
            text = expand_images(text, self.tokenizer, processed, self.divisor, self.images.use_image_id)
            pixels.update(pixel_values=processed["pixel_values"], target_sizes=processed["target_sizes"])
        if videos:
            processed = self.videos(videos, max_slice_nums)
            # The processor takes use_image_id from the image processor for videos too.
            text = expand_videos(text, self.tokenizer, processed, self.video_divisor, self.images.use_image_id)
            pixels.update(pixel_values_videos=processed["pixel_values_videos"],
                          target_sizes_videos=processed["target_sizes_videos"])
        encoded = {**self.tokenizer(text, return_tensors="pt"), **pixels}
        if images:
            counts = (pixels["target_sizes"].prod(-1) // self.divisor).tolist()
            encoded["image_bound"] = [block_bounds(encoded["input_ids"][0], self.tokenizer.image_token_id, counts)]
        if videos:
            counts = (pixels["target_sizes_videos"].prod(-1) // self.video_divisor).tolist()
            encoded["video_bound"] = [block_bounds(encoded["input_ids"][0], self.tokenizer.video_token_id, counts)]
        return encoded


def _as_video(turn: dict[str, Any]) -> dict[str, Any]:
    """A video sample's turn with its frames as one `Video`, where the first frame is."""
    if isinstance(turn["content"], str):
        return turn
    frames = tuple(item for item in turn["content"] if isinstance(item, Image.Image))
    content = [item for item in turn["content"] if not isinstance(item, Image.Image)]
    if frames:
        content.insert(next(i for i, item in enumerate(turn["content"]) if isinstance(item, Image.Image)),
                       Video(frames))
    return {**turn, "content": content}


def block_bounds(input_ids: torch.Tensor, token_id: int, counts: list[int]) -> torch.Tensor:
    """`[blocks, 2]`: the [start, end) of each vision block's tokens in `input_ids`, where `token_id` is the image
    token (an image's overview or slices: the `image_bound` the resampler family's processor records) or the video
    token (a video frame's: `video_bound`). The model itself does not read them (it scatters the features into every
    such token in order); runtimes that place each block's embeddings themselves do (the GGUF runner). `counts` are
    the blocks' token counts, in order; each block's tokens are one run, and the text holds no other such token
    (`expand_images` refuses an image token written in the text)."""
    positions = (input_ids == token_id).nonzero().flatten().tolist()
    bounds, first = [], 0
    for count in counts:
        bounds.append([positions[first], positions[first + count - 1] + 1])
        first += count
    return torch.tensor(bounds, dtype=torch.long)


def image_blocks(data: dict[str, Any]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """An encoded sample's vision blocks, images' then video frames' (`image_bound`, then `video_bound` order), each
    as NaViT-patched pixels `[3, patch, rows * columns * patch]` and its (rows, columns) in patches: the processor
    packs them side by side along the last axis (`mcq.models.ggufspec.GgufLayout.image_blocks`)."""
    blocks = []
    for visual in VISUALS:
        if visual.pixels in data:
            sizes = data[visual.sizes].tolist()
            blocks += zip(unpacked(data[visual.pixels][0], sizes), map(tuple, sizes))
    return blocks


def unpacked(packed: torch.Tensor, sizes: list[list[int]]) -> list[torch.Tensor]:
    """NaViT-packed pixels `[3, patch, width]` (the processor puts the blocks side by side along the last axis) as
    one `[3, patch, rows * columns * patch]` per block of (rows, columns) patches in `sizes`."""
    return list(packed.split([rows * columns * packed.shape[1] for rows, columns in sizes], dim=-1))


def _loaded(what: str, auto_class, path: Path):
    """`auto_class.from_pretrained(path)`; a missing or unreadable file is one line (transformers' message, whose
    lines it joins), not a traceback."""
    try:
        return auto_class.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise McqError(f"cannot load the {what} of {path}: {' '.join(str(err).split()) or type(err).__name__}") \
            from None


def forward(model: nn.Module, data: dict[str, Any]) -> Any:
    return model(**{key: value for key, value in data.items() if key in MODEL_INPUTS}, use_cache=False)


@contextmanager
def per_size_runs(model: nn.Module) -> Iterator[None]:
    """The vision tower called once per run of consecutive equal-size images (see the module doc)."""
    tower = model.model.vision_tower
    whole = tower.forward
    patch = tower.config.patch_size

    def run_by_run(pixel_values, target_sizes, **kwargs):
        outputs, image, column = [], 0, 0
        for (height, width), run in groupby(target_sizes.tolist(), key=tuple):
            count = len(list(run))
            columns = height * width * patch * count   # NaViT packing: each patch is `patch` columns wide
            outputs.append(whole(pixel_values[..., column: column + columns], target_sizes[image: image + count],
                                 **kwargs).last_hidden_state)
            image, column = image + count, column + columns
        return BaseModelOutputWithPooling(last_hidden_state=torch.cat(outputs, dim=1))

    tower.forward = run_by_run
    try:
        yield
    finally:
        del tower.forward
