"""Fixtures shared by the 4.6 export tests: transformers' own model of tiny:4.6 and two encoded samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from mcq.models.loading import resolve_model_path
from mcq.models.minicpmv4_6.serving import ServedMiniCPMV4_6
from mcq.validate.evalset import encode_items, eval_samples, open_encoder


@pytest.fixture(scope="module")
def served_46() -> ServedMiniCPMV4_6:
    path = resolve_model_path("tiny:4.6")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return ServedMiniCPMV4_6(model, path, "cpu")


@pytest.fixture(scope="module")
def samples_46() -> list[dict]:
    """Two encoded evaluation samples of tiny:4.6: text only, and a sliced image (its overview and slices of another
    size)."""
    items = encode_items(open_encoder("tiny:4.6"), eval_samples(None, 8, 0), 2)
    data = [item.scored for item in items if item.scored is not None]
    text_only = next(d for d in data if "pixel_values" not in d and "pixel_values_videos" not in d)
    sliced = next(d for d in data if "pixel_values" in d and len(set(map(tuple, d["target_sizes"].tolist()))) > 1)
    return [text_only, sliced]


@pytest.fixture(scope="module")
def video_46() -> dict:
    """The held-out video sample of tiny:4.6, encoded: 7 frames of one slice each, at the video tokens."""
    (item,) = encode_items(open_encoder("tiny:4.6"), [s for s in eval_samples(None, 8, 0) if s.is_video], 1)
    return item.scored

@pytest.fixture(scope="module")
def tiny46_4x(tmp_path_factory) -> Path:
    """tiny:4.6 in `downsample_mode` 4x (config and processors): the vit_merger is skipped, each image keeps 4x the
    tokens."""
    path = tmp_path_factory.mktemp("tiny46-4x") / "model"
    shutil.copytree(resolve_model_path("tiny:4.6"), path)
    for name in ("config.json", "preprocessor_config.json", "video_preprocessor_config.json"):
        settings = json.loads((path / name).read_text())
        settings["downsample_mode"] = "4x"
        (path / name).write_text(json.dumps(settings, indent=2))
    return path


@pytest.fixture(scope="module")
def served_4x(tiny46_4x) -> tuple[ServedMiniCPMV4_6, dict]:
    """transformers' model of the 4x checkpoint and its encoded sliced-image evaluation sample."""
    path = tiny46_4x
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    items = encode_items(open_encoder(path), eval_samples(None, 8, 0), 2)
    sliced = next(item.scored for item in items if "pixel_values" in item.scored
                  and len(set(map(tuple, item.scored["target_sizes"].tolist()))) > 1)
    return ServedMiniCPMV4_6(model, path, "cpu"), sliced
