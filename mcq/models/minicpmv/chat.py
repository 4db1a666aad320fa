"""The message handling of the official `chat()`: turns → prompt text + images, and its generation settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from PIL import Image

from mcq.errors import McqError

from ..familyspec import ChatRequest
from .processing import IMAGE_MARKER
from .versions import VersionSpec
from .video import frames_from_dir, frames_from_video, temporal_ids

# `mcq chat`'s video defaults: one frame a second, 3 frames per 64-token block (the official 4.5 recipe).
CHAT_FPS, CHAT_PACKING = 1.0, 3


def build_chat_inputs(model, processor, *, image, msgs, system_prompt, max_inp_length, max_slice_nums, use_image_id,
                      temporal_ids, enable_thinking) -> tuple[dict[str, Any], bool]:
    """Returns the processed batch and whether the call was batched (`msgs` a list of conversations)."""
    if not msgs:
        raise McqError("chat() needs msgs: a list of {'role': 'user'|'assistant', 'content': ...} turns")
    batched = isinstance(msgs[0], list)
    conversations = msgs if batched else [msgs]
    if image is not None and batched:
        raise McqError("in batch mode put the images inside msgs, not in image=")
    check_processor_matches(model.config, processor.image_processor)
    prompts, images = [], []
    for conversation in conversations:
        turns = list(conversation)
        if image is not None and turns and isinstance(turns[0], dict) and isinstance(turns[0].get("content"), str):
            turns[0] = {**turns[0], "content": [image, turns[0]["content"]]}
        prompt, sample_images = render_conversation(processor.tokenizer, model.spec, turns,
                                                    system_prompt=system_prompt, enable_thinking=enable_thinking,
                                                    add_generation_prompt=True)
        prompts.append(prompt)
        images.append(sample_images)
    if temporal_ids is not None and batched:
        raise McqError("temporal_ids (video) work with one conversation at a time, as in the official release")
    inputs = processor(prompts, images, max_length=max_inp_length, max_slice_nums=max_slice_nums,
                       use_image_id=use_image_id,
                       temporal_ids=[temporal_ids] if temporal_ids is not None else None)
    return inputs, batched


def render_conversation(tokenizer, spec: VersionSpec, turns: Sequence[dict[str, Any]], *, system_prompt: str = "",
                        enable_thinking: bool = False,
                        add_generation_prompt: bool = True) -> tuple[str, list[Image.Image]]:
    """One conversation in the official format → chat-template text with one `IMAGE_MARKER` per image, and the
    images in the order of their markers.

    `add_generation_prompt=True` ends the text with the assistant's opening (what `chat()` generates from);
    False renders the turns as they are, so a conversation that ends with an assistant answer becomes the
    teacher-forced text of that answer (what calibration runs through the model). The turns are not modified.
    """
    if not turns:
        raise McqError("a conversation needs at least one turn")
    images: list[Image.Image] = []
    template_turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise McqError("each turn is a dict with 'role' and 'content'")
        if position == 0 and turn["role"] != "user":
            raise McqError("the first turn of a conversation must have role 'user'")
        if turn["role"] not in ("user", "assistant"):
            raise McqError(f"unknown role {turn['role']!r}: turns are 'user' or 'assistant'")
        content = [turn["content"]] if isinstance(turn["content"], str) else turn["content"]
        parts = []
        for item in content:
            if isinstance(item, Image.Image):
                images.append(item)
                parts.append(IMAGE_MARKER)
            elif isinstance(item, str):
                parts.append(item)
            else:
                raise McqError(f"message content items are strings or PIL images, not {type(item).__name__}")
        template_turns.append({**turn, "content": "\n".join(parts)})
    # Only the releases with a thinking switch (4.5) have the template variable.
    template_kwargs = {"enable_thinking": enable_thinking} if spec.thinking else {}
    text = tokenizer.apply_chat_template(template_turns, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)
    return text, images


def conversation_inputs(processor, spec: VersionSpec, sample, max_slice_nums: int | None = None
                        ) -> tuple[dict[str, Any], str]:
    """The processor output for a calibration or evaluation `sample` (`mcq.calibration.Sample`: its turns, answer
    included, rendered teacher-forced; a prompt-only one ends with the generation prompt), and the rendered text.

    Video samples are encoded like `mcq chat --video`: one slice per frame, no image ids, and on 4.5 the frames'
    temporal ids; 2.6 and 4.0 have no temporal path and see the frames as a sequence of images, as their official
    video recipe does."""
    text, images = render_conversation(processor.tokenizer, spec, sample.messages,
                                       add_generation_prompt=not sample.has_answer)
    if sample.is_video:
        options = {"max_slice_nums": 1, "use_image_id": False,
                   "temporal_ids": [[list(group) for group in sample.temporal_ids]] if spec.temporal else None}
    else:
        options = {"max_slice_nums": max_slice_nums}
    return processor(text, [images], **options), text


class CalibrationEncoder:
    """The resampler family's `mcq.models.familyspec.CalibrationEncoder`: mcq's processor of the checkpoint."""

    def __init__(self, path):
        from .processing import MiniCPMVProcessor

        self.processor = MiniCPMVProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        self.spec = self.processor.spec
        self.video = self.spec.temporal   # video clips need the 3D resampler (4.5); 2.6 and 4.0 calibrate on the rest

    def __call__(self, sample, max_slice_nums: int | None) -> dict[str, Any]:
        return conversation_inputs(self.processor, self.spec, sample, max_slice_nums)[0]

    def render(self, turns, add_generation_prompt: bool) -> str:
        return render_conversation(self.tokenizer, self.spec, turns, add_generation_prompt=add_generation_prompt)[0]


def check_processor_matches(config, image_processor) -> None:
    """The official chat() asserts these agree; a mismatch would misplace every vision feature."""
    pairs = {
        "query_num / image_feature_size": (config.query_num, image_processor.image_feature_size),
        "patch_size": (config.patch_size, image_processor.patch_size),
        "use_image_id": (config.use_image_id, image_processor.use_image_id),
        "max_slice_nums": (config.max_slice_nums, image_processor.max_slice_nums),
        "slice_mode": (config.slice_mode, image_processor.slice_mode),
    }
    for name, (model_value, processor_value) in pairs.items():
        if model_value != processor_value:
            raise McqError(f"config.json and preprocessor_config.json disagree on {name}: "
                           f"{model_value} vs {processor_value}")


def generation_settings(spec: VersionSpec, sampling: bool, enable_thinking: bool, min_new_tokens: int,
                        overrides: dict[str, Any]) -> dict[str, Any]:
    """The official defaults; as in the release, a keyword overrides only a key these settings already have."""
    if sampling:
        settings = {"temperature": 0.7, "do_sample": True} if enable_thinking else dict(spec.sampling_kwargs)
    else:
        settings = {"num_beams": 3, "repetition_penalty": 1.2}
    if min_new_tokens > 0:
        settings["min_new_tokens"] = min_new_tokens
    settings.update({key: overrides[key] for key in settings.keys() & overrides.keys()})
    return settings


def chat(checkpoint, request: ChatRequest) -> str | Iterator[str]:
    """The family's `Family.chat`: the official `chat()` of mcq's `MiniCPMV` on the checkpoint
    (`mcq.models.loading.Checkpoint`)."""

    def load() -> tuple[Any, Any, dict[str, Any]]:
        from ..loading import load_model, load_processor

        processor = load_processor(checkpoint.path)  # first: a missing tokenizer should not wait for the weights
        return load_model(checkpoint, dtype=request.dtype), processor, {}

    return chat_with(request, load)


def chat_with(request: ChatRequest, load: Callable[[], tuple[Any, Any, dict[str, Any]]]) -> str | Iterator[str]:
    """`request` through the official `chat()` of the model `load()` returns with its processor and the keyword
    arguments its runtime adds to `chat()` (mcq's `MiniCPMV`, or an ONNX export on onnxruntime). The video is read
    before the model loads, so a bad one is reported at once."""
    import torch

    images = list(request.images)
    video_kwargs: dict[str, Any] = {}
    if request.video or request.frames:
        fps = CHAT_FPS if request.fps is None else request.fps
        frames, stamps = frames_from_video(request.video, fps) if request.video else frames_from_dir(request.frames,
                                                                                                   fps)
        images += frames
        packing = CHAT_PACKING if request.packing is None else request.packing
        video_kwargs = {"temporal_ids": temporal_ids(stamps, packing), "use_image_id": False, "max_slice_nums": 1}
    model, processor, runtime_kwargs = load()
    if video_kwargs and not model.spec.temporal:
        raise McqError(f"video input needs MiniCPM-V 4.5; {request.model} is {model.spec.version}")
    torch.manual_seed(request.seed)
    # Greedy by default so that the CLI answer is reproducible; --sampling gives the release's sampling settings.
    decoding = {} if request.sampling else {"num_beams": 1, "repetition_penalty": 1.0}
    if request.max_slice_nums:
        video_kwargs["max_slice_nums"] = request.max_slice_nums
    return model.chat(msgs=[{"role": "user", "content": [*images, request.question]}], processor=processor,
                      max_new_tokens=request.max_new_tokens, sampling=request.sampling, stream=request.stream,
                      enable_thinking=request.thinking, **video_kwargs, **decoding, **runtime_kwargs)
