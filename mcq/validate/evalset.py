"""The evaluation set: held-out conversations encoded once, by the reference's family's encoder (its processor),
for every runner.

Every variant is scored on exactly the reference's token sequence (teacher forcing compares next-token
distributions position by position, so the tokens must be the same ones); a runner whose runtime tokenizes by
itself checks that it reproduces these ids.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mcq.calibration import Sample, encode_scored, load_samples, load_user_samples, select_subset
from mcq.errors import McqError


@dataclass
class EvalItem:
    sample: Sample
    scored: dict[str, Any]          # the whole conversation, teacher-forced; `answer_mask` marks the answer tokens
    prompt: dict[str, Any] | None   # the conversation before its final answer, with the generation prompt

    @property
    def has_vision(self) -> bool:
        # A list per batch row (the resampler family's), or 4.6's packed tensor of images or of video frames.
        return any(len(p) for key in ("pixel_values", "pixel_values_videos") for p in self.scored.get(key, ()))


def open_encoder(reference: str | Path):
    """The encoder of the reference's family (`mcq.models.familyspec.CalibrationEncoder`) for its checkpoint."""
    from mcq.models.loading import open_checkpoint

    checkpoint = open_checkpoint(reference)
    return checkpoint.family.calibration.open_encoder(checkpoint.path)


def eval_samples(source: str | Path | None, num_samples: int | None, seed: int) -> list[Sample]:
    """The built-in held-out split (never calibrated on), or every sample of a user data source."""
    if source is None or str(source) == "builtin":
        return load_samples(None, split="heldout", num_samples=num_samples, seed=seed)
    samples = load_user_samples(source)
    if not any(s.has_answer for s in samples):
        raise McqError(f"{source}: no sample ends with an assistant answer, so there is nothing to score")
    chosen = select_subset(["user"] * len(samples), num_samples, seed, str(source))
    return [samples[i] for i in chosen]


def encode_items(encoder, samples: list[Sample], max_slice_nums: int | None) -> list[EvalItem]:
    """`samples` encoded by `encoder` (`open_encoder`)."""
    items = []
    for sample in samples:
        prompt = None
        if sample.has_answer:
            # The same conversation without its final answer: what the model answers from in `generate`.
            prompt = _with_media(encode_scored(encoder, replace(sample, messages=sample.messages[:-1]),
                                               max_slice_nums), sample)
        scored = _with_media(encode_scored(encoder, sample, max_slice_nums), sample)
        items.append(EvalItem(sample, scored, prompt))
    return items


def _with_media(encoded: dict[str, Any], sample: Sample) -> dict[str, Any]:
    """The sample's images (`images`) or video frames (`video`), one list per batch row like `pixel_values`: a
    runtime whose own multimodal path preprocesses images (vLLM, with mcq's image processor) takes these, not the
    pixels. Runners read only the keys they use."""
    encoded["video" if sample.is_video else "images"] = [list(sample.images)]
    return encoded


def describe_items(items: list[EvalItem], source: str | Path | None) -> dict[str, Any]:
    return {
        "source": "builtin:heldout" if source is None or str(source) == "builtin" else str(source),
        "samples": len(items),
        "kinds": dict(sorted(Counter(item.sample.kind for item in items).items())),
        "answer_tokens": int(sum(int(item.scored["answer_mask"].sum()) for item in items)),
        "images": sum(len(item.sample.images) for item in items if not item.sample.is_video),
        "video_frames": sum(len(item.sample.images) for item in items if item.sample.is_video),
    }
