"""`mcq chat` for MiniCPM-V 4.6 (`Family.chat`): transformers' own model and its `generate`, on the prompt its
processor builds.

The prompt is the checkpoint's chat template over the question, with one `tokenizer.image_token` per image (and one
`tokenizer.video_token` for a video) expanded into the placeholder `MiniCPMV4_6Processor` writes: the family's
`CalibrationEncoder`, since that processor cannot be built without torchvision (see calibration.py), so chat,
calibration and validation encode a conversation alike.

Video: `--video` is decoded with PyAV at `--fps` frames a second (1 by default: the video processor samples one main
frame a second), at most the video processor's `max_num_frames` (the first ones: the processor spreads its frames
over a longer video instead); `--frames` is a folder of frames, the video as it is. The frames are encoded as the
video processor encodes frames it is given (`video.VideoEncoder`). 4.6 has no temporal ids, so `--fps` with
`--frames` (which only times them) and `--packing` are refused.

The model is loaded as every mcq command loads it (`load_model`: checked shards; a compressed-tensors output
dequantized, a bitsandbytes one on its CPU kernels). `generate` runs with the vision tower called once per run of
equal-size images (`per_size_runs`): transformers 5.17's tower fails on a sliced image (overview and slices differ in
size) or on images of different sizes otherwise.

Greedy by default, so an answer is reproducible; `--sampling` samples with the checkpoint's generation_config.json
settings, as transformers' `generate` does by default. The answer is decoded as transformers' documentation for 4.6
decodes it: special tokens skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from threading import Thread
from typing import Any

import torch
from jinja2 import Environment, meta
from transformers import TextIteratorStreamer

from mcq.errors import McqError

from ..familyspec import ChatRequest
from ..minicpmv.video import frames_from_dir, frames_from_video
from .calibration import MODEL_INPUTS, CalibrationEncoder, per_size_runs
from .facts import RELEASE
from .video import Video

# `--video`'s sampling rate: the video processor's one main frame a second.
CHAT_FPS = 1.0

# Greedy: one beam, the argmax at every step, whatever sampling settings generation_config.json holds (None clears
# them, so transformers does not warn that they go unused).
_GREEDY = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "temperature": None, "top_p": None,
           "top_k": None}


def chat(checkpoint, request: ChatRequest) -> str | Iterator[str]:
    """The answer of the 4.6 checkpoint (`mcq.models.loading.Checkpoint`) to `request` (see the module doc)."""
    from ..loading import load_model

    _refuse_temporal_options(request)
    encoder = CalibrationEncoder(checkpoint.path)   # first: a bad tokenizer, processor or video should not wait
    inputs = chat_inputs(encoder, request)
    model = load_model(checkpoint, dtype=request.dtype)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)   # as transformers' 4.6 documentation casts pixel values
    torch.manual_seed(request.seed)
    settings = {"do_sample": True} if request.sampling else _GREEDY
    arguments = {**inputs, "max_new_tokens": request.max_new_tokens, **settings}
    if request.stream:
        return _stream(model, encoder.tokenizer, arguments)
    with per_size_runs(model):
        output = model.generate(**arguments)
    return encoder.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def export_chat_inputs(path: Path, request: ChatRequest) -> dict[str, Any]:
    """`chat`'s model inputs for an export of the family's programs at `path` (`Programs.chat_inputs`), which
    carries the checkpoint's tokenizer and processor files."""
    _refuse_temporal_options(request)
    return chat_inputs(CalibrationEncoder(path), request)


def chat_inputs(encoder: CalibrationEncoder, request: ChatRequest) -> dict[str, Any]:
    """The model inputs of `request`'s question about its images and video: one user turn, the images and the
    video first (as the official examples put them), then the generation prompt."""
    template = {}
    if _has_thinking_switch(encoder.tokenizer.chat_template):
        template["enable_thinking"] = request.thinking
    elif request.thinking:
        raise McqError(f"--thinking: the chat template of {request.model} has no enable_thinking switch (MiniCPM-V "
                       f"{RELEASE} ships thinking as a checkpoint of its own, MiniCPM-V-4.6-Thinking)")
    video = [Video(tuple(_frames(request, encoder.videos.settings["max_num_frames"])))] \
        if request.video or request.frames else []
    turn = {"role": "user", "content": [*request.images, *video, request.question]}
    encoded = encoder.encode([turn], True, request.max_slice_nums, **template)
    # The model's inputs only: generate refuses keyword arguments the model does not take (image_bound).
    return {key: value for key, value in encoded.items() if key in MODEL_INPUTS}


def _frames(request: ChatRequest, max_frames: int) -> list:
    """The frames of `request`'s video file or frame folder (see the module doc)."""
    if request.video:
        return frames_from_video(request.video, CHAT_FPS if request.fps is None else request.fps, max_frames)[0]
    return frames_from_dir(request.frames, CHAT_FPS)[0]   # the times it gives the frames go unused


def _refuse_temporal_options(request: ChatRequest) -> None:
    """Options about frame times are refused, not ignored: 4.6 sees a video's frames in order, not their times."""
    if request.packing is not None:
        raise McqError(f"--packing: MiniCPM-V {RELEASE} ({request.model}) packs no frames by temporal id: every frame "
                       "is an image block of its own")
    if request.fps is not None and not request.video:
        raise McqError(f"--fps: MiniCPM-V {RELEASE} ({request.model}) has no temporal ids, so --fps only sets how "
                       "often --video is sampled" + ("; --frames are taken as they are" if request.frames else ""))


def _has_thinking_switch(template: str | None) -> bool:
    """Whether the chat template reads the variable `enable_thinking` (the switch 4.5's template has)."""
    return bool(template) and "enable_thinking" in meta.find_undeclared_variables(Environment().parse(template))


def _stream(model, tokenizer, arguments: dict[str, Any]) -> Iterator[str]:
    """The answer piece by piece as `generate` produces it (in a thread), decoded like the whole answer."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with per_size_runs(model):
        thread = Thread(target=model.generate, kwargs={**arguments, "streamer": streamer}, daemon=True)
        thread.start()
        for text in streamer:
            if text:
                yield text
        thread.join()
