"""One `Sample` → the batch of one that `MiniCPMV.forward(data)` takes, for teacher-forced calibration passes.

The conversation is rendered by the same function as `chat()` (`render_conversation`), so calibration sees exactly
the prompt layout the model answers from, followed by the answer: for 4.5 the Qwen3 template writes the final
answer after an empty `<think>\\n\\n</think>\\n\\n` block, the same text `chat()` generates from with thinking off.

`encode_scored` does the same for a checkpoint of any family, with its family's encoder (what evaluation scores).
"""

from __future__ import annotations

from typing import Any

import torch

from mcq.errors import McqError
from mcq.models.minicpmv.chat import conversation_inputs, render_conversation
from mcq.models.minicpmv.versions import VersionSpec

from .samples import Sample


def encode_sample(processor, spec: VersionSpec, sample: Sample, max_slice_nums: int | None = None,
                  max_length: int | None = None) -> dict[str, Any]:
    """The processor output for `sample` (input_ids, attention_mask, pixel_values, tgt_sizes, image_bound,
    temporal_ids, image_sizes), plus `answer_mask`: a `[1, length]` bool tensor, True on the tokens of the final
    assistant answer (its closing tokens included), which is what held-out evaluation scores. A prompt-only sample
    ends with the generation prompt and has no answer tokens.

    Video samples are encoded as `conversation_inputs` says. `max_length` cuts the sequence from the end (the
    answer first); cutting into an image is an error.
    """
    if spec.version != processor.version:
        raise McqError(f"the processor is for MiniCPM-V {processor.version} but the model is {spec.version}")
    _check_text_answer(sample)
    inputs, text = conversation_inputs(processor, spec, sample, max_slice_nums)
    prompt_text = (render_conversation(processor.tokenizer, spec, sample.messages[:-1], add_generation_prompt=True)[0]
                   if sample.has_answer else text)
    _mark_answer(inputs, processor.tokenizer, text, prompt_text)
    if max_length is not None and inputs["input_ids"].shape[1] > max_length:
        _truncate(inputs, max_length, sample)
    return inputs


def encode_scored(encoder, sample: Sample, max_slice_nums: int | None) -> dict[str, Any]:
    """`sample` encoded by a family's encoder (`mcq.models.familyspec.CalibrationEncoder`), with `answer_mask` as
    `encode_sample` marks it: what evaluation scores, for a checkpoint of any family."""
    _check_text_answer(sample)
    inputs = encoder(sample, max_slice_nums)
    text = encoder.render(sample.messages, add_generation_prompt=not sample.has_answer)
    prompt_text = encoder.render(sample.messages[:-1], add_generation_prompt=True) if sample.has_answer else text
    _mark_answer(inputs, encoder.tokenizer, text, prompt_text)
    return inputs


def _check_text_answer(sample: Sample) -> None:
    if sample.has_answer and not isinstance(sample.messages[-1]["content"], str) \
            and any(not isinstance(item, str) for item in sample.messages[-1]["content"]):
        raise McqError(f"{sample.name}: the final assistant answer holds images; answers are text")


def _mark_answer(inputs: dict[str, Any], tokenizer, full_text: str, prompt_text: str) -> None:
    """`inputs["answer_mask"]`: True on the last tokens, those of `full_text` (the whole conversation) after the
    longest token prefix it shares with `prompt_text` (the conversation up to the answer's opening; the same text
    when there is no answer).

    Counted on the texts with image markers unexpanded: the markers are added tokens, so the tokens after them do
    not depend on what the processor expands them into, and every marker lies before the answer.
    """
    full = tokenizer.encode(full_text, add_special_tokens=False)
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    shared = 0
    for full_id, prompt_id in zip(full, prompt):
        if full_id != prompt_id:
            break
        shared += 1
    length = inputs["input_ids"].shape[1]
    answer_mask = torch.zeros((1, length), dtype=torch.bool)
    if len(full) > shared:
        answer_mask[0, length - (len(full) - shared):] = True
    inputs["answer_mask"] = answer_mask


def _truncate(inputs: dict[str, Any], max_length: int, sample: Sample) -> None:
    bounds = inputs["image_bound"][0]
    # A bound's end is the index of its closing </image> or </slice>, which must survive the cut.
    if len(bounds) and int(bounds[:, 1].max()) >= max_length:
        raise McqError(f"{sample.name}: {inputs['input_ids'].shape[1]} tokens, and max_length {max_length} would cut "
                       f"an image placeholder; raise max_length or lower max_slice_nums")
    for key in ("input_ids", "attention_mask", "answer_mask"):
        inputs[key] = inputs[key][:, :max_length]
