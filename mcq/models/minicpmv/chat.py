"""The message handling of the official `chat()`: turns → prompt text + images, and its generation settings."""

from __future__ import annotations

import copy
from typing import Any

from PIL import Image

from mcq.errors import McqError

from .processing import IMAGE_MARKER
from .versions import VersionSpec


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
        turns = copy.deepcopy(conversation)
        if turns[0]["role"] != "user":
            raise McqError("the first turn of a conversation must have role 'user'")
        if image is not None and isinstance(turns[0]["content"], str):
            turns[0]["content"] = [image, turns[0]["content"]]
        sample_images = []
        for turn in turns:
            if turn["role"] not in ("user", "assistant"):
                raise McqError(f"unknown role {turn['role']!r}: turns are 'user' or 'assistant'")
            content = [turn["content"]] if isinstance(turn["content"], str) else turn["content"]
            parts = []
            for item in content:
                if isinstance(item, Image.Image):
                    sample_images.append(item)
                    parts.append(IMAGE_MARKER)
                elif isinstance(item, str):
                    parts.append(item)
                else:
                    raise McqError(f"message content items are strings or PIL images, not {type(item).__name__}")
            turn["content"] = "\n".join(parts)
        if system_prompt:
            turns.insert(0, {"role": "system", "content": system_prompt})
        template_kwargs = {"enable_thinking": enable_thinking} if model.spec.thinking else {}
        prompts.append(processor.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True,
                                                               **template_kwargs))
        images.append(sample_images)
    if temporal_ids is not None and batched:
        raise McqError("temporal_ids (video) work with one conversation at a time, as in the official release")
    inputs = processor(prompts, images, max_length=max_inp_length, max_slice_nums=max_slice_nums,
                       use_image_id=use_image_id,
                       temporal_ids=[temporal_ids] if temporal_ids is not None else None)
    return inputs, batched


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
