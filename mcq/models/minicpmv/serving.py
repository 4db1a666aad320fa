"""The resampler family's `mcq.models.familyspec.ServedModel`: mcq's `MiniCPMV` run by the validator on its
processor's outputs (`forward(data)`, `generate`, the LLM alone for decode steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .modeling import MiniCPMV
from .processing import MiniCPMVProcessor

# What MiniCPMV.forward/generate read from a processor output (image_sizes and answer_mask are not model inputs).
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "tgt_sizes", "image_bound", "temporal_ids")


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    return value


class ServedMiniCPMV:
    def __init__(self, model: MiniCPMV, path: Path, device: torch.device):
        self.model, self.device = model, torch.device(device)
        self.tokenizer = MiniCPMVProcessor.from_pretrained(path).tokenizer
        self.terminators = set(model.terminator_ids(self.tokenizer))

    def inputs(self, data: dict[str, Any], vision: torch.Tensor | None = None) -> dict[str, Any]:
        inputs = {key: _move(value, self.device) for key, value in data.items() if key in MODEL_INPUTS}
        if vision is not None:
            inputs["vision_hidden_states"] = [vision.to(self.device, self.model.dtype)]
        return inputs

    def vision(self, inputs: dict[str, Any]) -> torch.Tensor:
        (states,) = self.model._vision_states_per_sample(inputs)   # a batch of one sample
        return states

    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.model(inputs, use_cache=False).logits[0]

    def generate(self, inputs: dict[str, Any], max_new_tokens: int) -> list[int]:
        output = self.model.generate(**inputs, tokenizer=self.tokenizer, max_new_tokens=max_new_tokens,
                                     do_sample=False, num_beams=1, repetition_penalty=1.0)
        return output[0].tolist()

    def prefill(self, inputs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        output = self.model(inputs, use_cache=True)
        return output.past_key_values, output.logits[:, -1]

    def step(self, token: torch.Tensor, cache: Any) -> tuple[Any, torch.Tensor]:
        output = self.model.llm(input_ids=token, past_key_values=cache, use_cache=True)
        return output.past_key_values, output.logits[:, -1]
