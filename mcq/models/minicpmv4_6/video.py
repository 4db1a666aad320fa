"""MiniCPM-V 4.6 video: frames → the inputs `MiniCPMV4_6Processor` gives a video, computed with torch alone.

transformers' `MiniCPMV4_6VideoProcessor` runs on torchvision, which mcq does not depend on; what it does to frames
it is given (`do_sample_frames=False`, no sub-second frames stacked: `stack_frames` 1) is reproduced here:

- every frame is laid out as an image of the video's size: the image processor's slice grid and sizes
  (`get_sliced_grid`, `find_best_resize`, `get_refine_size`: the video processor's copies compute the same), an
  overview and, when sliced, the slices of the refined frame in row-major order;
- resizing is torchvision's on a uint8 tensor, which on CPU is torch's own `interpolate` (bicubic, antialiased, on
  uint8: torchvision's `resize_image` keeps uint8 for bicubic on CPU), not PIL's as for images;
- rescale and normalize are fused as transformers' torchvision backend fuses them: `(x - mean / rescale_factor) /
  (std / rescale_factor)` in float32;
- each unit (frame overview, then its slices, frame after frame) is NaViT-patched `[3, patch, rows * columns *
  patch]` and packed side by side: `pixel_values_videos` `[1, 3, patch, width]`, `target_sizes_videos` one (rows,
  columns) per unit.

The model runs a video's units through the same vision tower and merger as images and scatters the features into
the video tokens. The placeholder (`calibration.expand_videos`) is the processor's: `<image_id>i</image_id>` once
per video (i counts the videos of the text), then per frame `<image>` + one video token per `divisor` patches +
`</image>` and the slices' rows as for an image, frames back to back. 4.6 has no temporal ids: frame times do not
reach the model, only the frames' order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from transformers.image_utils import PILImageResampling
from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

from mcq.errors import McqError

# The video processor's settings mcq reads (video_preprocessor_config.json over the class defaults).
SETTINGS = ("max_slice_nums", "scale_resolution", "patch_size", "slice_mode", "downsample_mode", "max_num_frames",
            "stack_frames", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
            "image_std")

# Settings whose other values take paths of the video processor mcq does not reproduce.
_REQUIRED = {"stack_frames": 1, "resample": PILImageResampling.BICUBIC, "do_resize": True, "do_rescale": True,
             "do_normalize": True}


@dataclass(frozen=True)
class Video:
    """A video in a conversation: its frames in order (already sampled), RGB and all of one size."""

    frames: tuple[Image.Image, ...]


def video_settings(path: Path) -> dict[str, Any]:
    """The video processor's settings of the checkpoint in `path`, found as transformers finds them
    (`get_video_processor_dict`: video_preprocessor_config.json, else preprocessor_config.json), over its class
    defaults; a setting mcq does not reproduce is one line."""
    try:
        stored, _ = MiniCPMV4_6VideoProcessor.get_video_processor_dict(path)
    except (OSError, ValueError) as err:
        raise McqError(f"cannot load the video processor of {path}: {' '.join(str(err).split())}") from None
    settings = {name: stored.get(name, getattr(MiniCPMV4_6VideoProcessor, name)) for name in SETTINGS}
    for name, value in _REQUIRED.items():
        if settings[name] != value:
            raise McqError(f"{path}: video processor setting {name}={settings[name]!r}: mcq encodes MiniCPM-V 4.6 "
                           f"video with {name}={value!r} only")
    return settings


class VideoEncoder:
    """Videos → `pixel_values_videos`, `target_sizes_videos` and what the placeholder needs (see the module doc)."""

    def __init__(self, path: Path, geometry):
        """`geometry`: the checkpoint's image processor, whose slice-grid and size methods the video processor
        repeats."""
        self.settings = video_settings(path)
        self.geometry = geometry
        factor = 1.0 / self.settings["rescale_factor"]
        # As transformers' torchvision backend fuses rescale into normalize (float32 tensors times a Python float).
        self.mean = (torch.tensor(self.settings["image_mean"]) * factor).view(-1, 1, 1)
        self.std = (torch.tensor(self.settings["image_std"]) * factor).view(-1, 1, 1)

    def __call__(self, videos: list[Video], max_slice_nums: int | None) -> dict[str, Any]:
        """`max_slice_nums`: None for the video processor's own."""
        slices = self.settings["max_slice_nums"] if max_slice_nums is None else max_slice_nums
        pixels, sizes, grids, frame_counts = [], [], [], []
        for video in videos:
            grid, frames = self._frame_units(video, slices)
            for units in frames:
                for unit in units:
                    pixels.append(self._patched(unit))
                    sizes.append([side // self.settings["patch_size"] for side in unit.shape[-2:]])
            grids += [grid] * len(frames)
            frame_counts.append(len(frames))
        return {"pixel_values_videos": torch.cat(pixels, dim=-1)[None],
                "target_sizes_videos": torch.tensor(sizes, dtype=torch.int32),
                "grids": grids, "num_frames_per_video": frame_counts}

    def _frame_units(self, video: Video, slices: int) -> tuple[tuple[int, int], list[list[torch.Tensor]]]:
        """The video's slice grid (rows, columns; (0, 0) unsliced), and per frame its overview and slices, uint8
        `[3, height, width]` each."""
        if len({frame.size for frame in video.frames}) != 1:
            raise McqError(f"a video's frames must all have one size, got {sorted({f.size for f in video.frames})}")
        frames = torch.from_numpy(np.stack([np.asarray(frame.convert("RGB")) for frame in video.frames]))
        frames = frames.permute(0, 3, 1, 2).contiguous()
        size = tuple(frames.shape[-2:])
        scale, patch = self.settings["scale_resolution"], self.settings["patch_size"]
        grid = self.geometry.get_sliced_grid(size, slices, scale) if self.settings["slice_mode"] else None
        parts = [_resized(frames, self.geometry.find_best_resize(size, scale, patch, allow_upscale=grid is None))]
        if grid is not None:
            refined = _resized(frames, self.geometry.get_refine_size(size, grid, scale, patch, allow_upscale=True))
            height, width = refined.shape[-2] // grid[0], refined.shape[-1] // grid[1]
            parts += [refined[..., top: top + height, left: left + width]
                      for top in range(0, refined.shape[-2], height) for left in range(0, refined.shape[-1], width)]
        return tuple(grid or (0, 0)), [[part[index] for part in parts] for index in range(len(video.frames))]

    def _patched(self, unit: torch.Tensor) -> torch.Tensor:
        """One normalized unit as NaViT patches `[3, patch, rows * columns * patch]`, patch by patch in row-major
        order, each patch's rows side by side."""
        normalized = (unit.to(torch.float32) - self.mean) / self.std
        patch = self.settings["patch_size"]
        channels, height, width = normalized.shape
        patches = normalized.reshape(channels, height // patch, patch, width // patch, patch)
        return patches.permute(0, 2, 1, 3, 4).reshape(channels, patch, -1)


def _resized(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's bicubic resize of uint8 frames `[T, 3, H, W]` on CPU: torch's antialiased kernel on uint8
    (the frames as they are at their own size)."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=list(size), mode="bicubic", align_corners=False, antialias=True)
