"""One `Sample` → the batch of one that `MiniCPMV.forward(data)` takes, for teacher-forced calibration passes.

The conversation is rendered by the same function as `chat()` (`render_conversation`), so calibration sees exactly
the prompt layout the model answers from, followed by the answer: for 4.5 the Qwen3 template writes the final
answer after an empty `<think>\\n\\n</think>\\n\\n` block, the same text `chat()` generates from with thinking off.
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
    if sample.has_answer and not isinstance(sample.messages[-1]["content"], str) \
            and any(not isinstance(item, str) for item in sample.messages[-1]["content"]):
        raise McqError(f"{sample.name}: the final assistant answer holds images; answers are text")
    inputs, text = conversation_inputs(processor, spec, sample, max_slice_nums)
    length = inputs["input_ids"].shape[1]
    answer_tokens = _answer_token_count(processor, spec, sample, text) if sample.has_answer else 0
    answer_mask = torch.zeros((1, length), dtype=torch.bool)
    if answer_tokens:
        answer_mask[0, length - answer_tokens:] = True
    inputs["answer_mask"] = answer_mask
    if max_length is not None and length > max_length:
        _truncate(inputs, max_length, sample)
    return inputs


def _answer_token_count(processor, spec: VersionSpec, sample: Sample, full_text: str) -> int:
    """Tokens after the longest token prefix shared with the conversation up to the answer's opening.

    Counted on the text with image markers unexpanded: the markers are added tokens, so the tokens after them do
    not depend on what the processor expands them into, and every marker lies before the answer.
    """
    prompt_text, _ = render_conversation(processor.tokenizer, spec, sample.messages[:-1], add_generation_prompt=True)
    full = processor.tokenizer.encode(full_text, add_special_tokens=False)
    prompt = processor.tokenizer.encode(prompt_text, add_special_tokens=False)
    shared = 0
    for full_id, prompt_id in zip(full, prompt):
        if full_id != prompt_id:
            break
        shared += 1
    return len(full) - shared


def _truncate(inputs: dict[str, Any], max_length: int, sample: Sample) -> None:
    bounds = inputs["image_bound"][0]
    # A bound's end is the index of its closing </image> or </slice>, which must survive the cut.
    if len(bounds) and int(bounds[:, 1].max()) >= max_length:
        raise McqError(f"{sample.name}: {inputs['input_ids'].shape[1]} tokens, and max_length {max_length} would cut "
                       f"an image placeholder; raise max_length or lower max_slice_nums")
    for key in ("input_ids", "attention_mask", "answer_mask"):
        inputs[key] = inputs[key][:, :max_length]
