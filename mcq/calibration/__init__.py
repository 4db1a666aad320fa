"""Multimodal calibration and held-out evaluation data.

`load_samples(source, split)` gives the conversations that calibration runs through the model (teacher-forced,
answer included) and that evaluation scores: the built-in synthetic set (`synthetic.py`) or the user's data
(`user_data.py`). `encode_sample` turns one into the batch `MiniCPMV.forward(data)` takes, with the answer tokens
marked for evaluation; `describe` summarises a set for model cards; `calibration_samples` encodes a set for a
checkpoint of any family with its family's encoder (what quantization and the GGUF importance matrix calibrate on).

Held-out user data: a fixed 1/8 of the samples (at least one when there are two or more), chosen by a hash of
each sample's name and not by the seed, so that a calibration run and an evaluation run with different seeds still
never share a sample.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mcq.errors import McqError

from .encode import encode_sample, encode_scored
from .samples import KINDS, SPLITS, Sample
from .synthetic import builtin_samples
from .user_data import load_user_samples, read_user_data

__all__ = ["KINDS", "SPLITS", "Sample", "builtin_samples", "calibration_samples", "describe", "encode_sample",
           "encode_scored", "heldout_indices", "load_samples", "load_user_samples", "read_user_data", "select_subset"]

HELDOUT_FRACTION = 8  # one sample in eight


def load_samples(source: str | Path | None = None, split: str = "calibration", num_samples: int | None = None,
                 seed: int = 0) -> list[Sample]:
    """The samples of `split` ("calibration" or "heldout") from `source`: None or "builtin" for the synthetic set,
    otherwise a path to user data. `num_samples` takes a subset (see `select_subset`)."""
    if split not in SPLITS:
        raise McqError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise McqError(f"num_samples must be a positive integer, got {num_samples!r}")
    if source is None or str(source) == "builtin":
        samples = builtin_samples(split, seed)
        return [samples[i] for i in select_subset([s.kind for s in samples], num_samples, seed,
                                                  f"the built-in {split} set")]
    data = read_user_data(source)
    held_out = set(heldout_indices(data.names))
    indices = sorted(held_out) if split == "heldout" else [i for i in range(len(data)) if i not in held_out]
    if not indices:
        raise McqError(f"{source} has {len(data)} sample: a held-out split needs at least 2, one for each split")
    chosen = select_subset(["user"] * len(indices), num_samples, seed, f"the {split} split of {source}")
    return data.load(indices[i] for i in chosen)


def heldout_indices(names: Sequence[str]) -> list[int]:
    """Positions of the held-out samples: the `len // 8` (at least 1 from 2 samples on) whose names hash lowest."""
    if len(names) < 2:
        return []
    count = max(1, len(names) // HELDOUT_FRACTION)
    ranked = sorted(range(len(names)), key=lambda i: (hashlib.sha256(names[i].encode()).hexdigest(), i))
    return sorted(ranked[:count])


def select_subset(kinds: Sequence[str], num_samples: int | None, seed: int, what: str = "the set") -> list[int]:
    """Positions of a deterministic subset of `num_samples` items (all when None), in their original order.

    Each kind gets one sample first (while `num_samples` allows), the rest is shared in proportion to how many
    samples of each kind there are (largest remainders, in integers); which samples of a kind are taken follows
    the seed.
    """
    if num_samples is None:
        return list(range(len(kinds)))
    if num_samples > len(kinds):
        raise McqError(f"asked for {num_samples} samples but {what} has {len(kinds)}")
    by_kind: dict[str, list[int]] = {}
    for position, kind in enumerate(kinds):
        by_kind.setdefault(kind, []).append(position)
    order = list(by_kind)
    if num_samples < len(order):
        quotas = {kind: int(i < num_samples) for i, kind in enumerate(order)}
    else:
        quotas = {kind: 1 for kind in order}
        rest = num_samples - len(order)
        spare = {kind: len(by_kind[kind]) - 1 for kind in order}
        total = sum(spare.values())
        if rest:
            for kind in order:
                quotas[kind] += rest * spare[kind] // total
            remainders = sorted(order, key=lambda kind: (-(rest * spare[kind] % total), order.index(kind)))
            for kind in remainders[:num_samples - sum(quotas.values())]:
                quotas[kind] += 1
    rng = random.Random(f"mcq.calibration.subset/{seed}")
    chosen = []
    for kind in order:
        members = list(by_kind[kind])
        rng.shuffle(members)
        chosen.extend(members[:quotas[kind]])
    return sorted(chosen)


def describe(samples: Sequence[Sample]) -> dict[str, Any]:
    """Counts for a model card: samples per kind, images (video frames apart), videos, frames, prompt-only."""
    kinds = {kind: sum(s.kind == kind for s in samples) for kind in KINDS}
    return {
        "samples": len(samples),
        "kinds": {kind: count for kind, count in kinds.items() if count},
        "images": sum(len(s.images) for s in samples if not s.is_video),
        "videos": sum(s.is_video for s in samples),
        "video_frames": sum(len(s.images) for s in samples if s.is_video),
        "turns": sum(len(s.messages) for s in samples),
        "prompt_only": sum(not s.has_answer for s in samples),
    }


def calibration_samples(path: Path, calib: str | None, count: int, slices: int,
                        seed: int) -> tuple[list[dict], dict[str, Any]]:
    """`count` calibration samples of `calib` (None: the built-in set) encoded for the checkpoint in `path` by its
    family's encoder (`Family.calibration`), and their description for manifests. Video samples are left out where
    the encoder has no video path."""
    from mcq.models.loading import open_checkpoint

    samples = load_samples(calib, split="calibration", num_samples=count, seed=seed)
    if not samples:
        raise McqError(f"calibration data {calib or 'builtin'} gave no samples")
    encoder = open_checkpoint(path).family.calibration.open_encoder(path)
    if not encoder.video:
        samples = [s for s in samples if not s.is_video]
    # The kind rides along (the model ignores it): AWQ's scale search samples tokens across kinds.
    encoded = [dict(encoder(sample, slices), kind=sample.kind) for sample in samples]
    return encoded, {"source": calib or "builtin", "seed": seed, "max_slice_nums": slices, **describe(samples)}
