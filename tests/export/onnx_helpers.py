"""Helpers shared by the ONNX export tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from mcq.models.minicpmv.chat import build_chat_inputs


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy())


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def digests(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def chat_inputs(model, processor, msgs, **kwargs):
    options = {"max_slice_nums": None, "use_image_id": None, "temporal_ids": None, **kwargs}
    inputs, _ = build_chat_inputs(model, processor, image=None, msgs=msgs, system_prompt="", max_inp_length=8192,
                                  enable_thinking=False, **options)
    return inputs
