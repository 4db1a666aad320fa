"""What a family tells `mcq export --format gguf` about its two llama.cpp files, as one value per family
(`Family.gguf`): the LLM file's architecture, metadata keys and tensors, and the mmproj file's keys and tensors.

Each family's folder holds its own (`minicpmv/gguf.py`: the resampler releases; `minicpmv4_6/gguf.py`); the
exporter (`mcq.export.gguf`) reads, encodes and streams what they describe and never asks which family it has.
Metadata is `{key: (kind, value)}` with kind one of str, u32, i32, f32, bool (scalars) or strs, i32s, f32s, bools
(arrays)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

Metadata = dict[str, tuple[str, object]]


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF file: where its data comes from and how it is stored."""

    name: str            # GGUF name
    source: str          # the checkpoint parameter it is made of, or "" for a computed tensor (`compute`)
    shape: tuple[int, ...]
    quantizable: bool    # a matrix llama.cpp would quantize (a Linear's weight, not an embedding table for positions)
    # What llama.cpp stores instead of the parameter, as a function of the whole float32 tensor (a rope layout, a
    # reparametrization); None: the values as they are, read a block of rows at a time.
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    # llama.cpp keeps it float32 in every file type (convolution kernels, some position tables).
    float32: bool = False
    # Which parameter input column each stored column is, where the transform reorders a matrix's inputs: the
    # importance matrix (one value per input column) follows it. None: the parameter's order.
    input_order: tuple[int, ...] | None = None
    # A tensor computed rather than read (source ""): its float32 values.
    compute: Callable[[], np.ndarray] | None = None


@dataclass(frozen=True)
class GgufLayout:
    """A family's GGUF facts. `config` is the family's config object; `params` every parameter name the checkpoint
    holds (a layout derives from them what a config does not say, e.g. the vision layers a model runs)."""

    # A one-line McqError for a config llama.cpp would run differently from the model, before any work.
    check: Callable[[Any], None]
    llm_arch: Callable[[Any], str]                                    # general.architecture of the LLM file
    llm_metadata: Callable[[Any], Metadata]                           # its architecture keys (not the tokenizer)
    llm_tensors: Callable[[Any, list[str]], list[GgufTensor]]
    # clip.* keys; the checkpoint directory for what only its files say (the image processor's settings)
    mmproj_metadata: Callable[[Any, list[str], Path], Metadata]
    mmproj_tensors: Callable[[Any, list[str]], list[GgufTensor]]
    mmproj_description: str                                           # general.description of the mmproj file
    # (checkpoint directory, config) → its tokenizer, loaded without remote code (the vocabulary's source)
    tokenizer: Callable[[Path, Any], Any]
    # clip.projector_type of the mmproj file: what names the family of a GGUF export
    # (`mcq.models.family.gguf_layout_for`)
    projector: str
    # An encoded sample (the family's `CalibrationEncoder` output) → its image blocks (each overview or slice the
    # vision tower takes on its own) in the order of its `image_bound`, then its video frames' in the order of its
    # `video_bound` (4.6), as NaViT-patched pixels `[3, patch, rows * columns * patch]`, normalized, and (rows,
    # columns) in patches: what the GGUF runner gives libmtmd one by one.
    image_blocks: Callable[[dict[str, Any]], list[tuple[torch.Tensor, tuple[int, int]]]]

