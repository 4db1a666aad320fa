"""MiniCPM-V 4.6 as the validator runs it in transformers (`mcq.models.familyspec.ServedModel`), on the inputs of
its `CalibrationEncoder`.

The vision features are computed by the model's own `get_image_features` with the tower called once per run of
equal-size images (`per_size_runs`: transformers 5.17 merges windows as if every image had the first one's size),
and merged into the text embeddings at the image tokens as the model's forward does; a video's frames likewise
(the model's `get_video_features` is `get_image_features` on them), at the video tokens. The LLM then runs on those
embeddings. So the model's forward never runs the tower on mixed sizes, and another model's vision output (the
validator's vision-path score) goes in the same way. The vision output is one block per image (overview or slice),
then one per video frame's overview or slice: the merger's output tokens, zero-padded to the longest of the sample
(a zero row adds nothing to a block's cosine); the padding is dropped again by the token count each block's size
gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoTokenizer

from .calibration import MODEL_INPUTS, VISUALS, merged_tokens_divisor, per_size_runs


class ServedMiniCPMV4_6:
    def __init__(self, model: nn.Module, path: Path, device: torch.device):
        self.model, self.device = model, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        ends = model.generation_config.eos_token_id
        self.terminators = set(ends if isinstance(ends, list) else [ends])
        self.divisor = merged_tokens_divisor(model.config.downsample_mode)

    def inputs(self, data: dict[str, Any], vision: torch.Tensor | None = None) -> dict[str, Any]:
        inputs = {key: data[key].to(self.device) for key in MODEL_INPUTS if key in data}
        if vision is not None:
            inputs["vision"] = vision.to(self.device, self.model.dtype)
        return inputs

    def vision(self, inputs: dict[str, Any]) -> torch.Tensor:
        blocks = []
        with per_size_runs(self.model):
            for visual in VISUALS:
                if visual.pixels in inputs:
                    blocks += self.model.model.get_image_features(inputs[visual.pixels],
                                                                  inputs[visual.sizes]).pooler_output
        return pad_sequence(blocks, batch_first=True)

    def _embeddings(self, inputs: dict[str, Any]) -> torch.Tensor:
        embeddings = self.model.get_input_embeddings()(inputs["input_ids"])
        present = [visual for visual in VISUALS if visual.pixels in inputs]
        if not present:
            return embeddings
        blocks = iter(inputs["vision"] if "vision" in inputs else self.vision(inputs))
        for visual in present:
            counts = (inputs[visual.sizes].prod(-1) // self.divisor).tolist()
            features = torch.cat([next(blocks)[:count] for count in counts]).to(embeddings.dtype)
            positions = (inputs["input_ids"] == getattr(self.model.config, visual.token))[..., None]
            embeddings = embeddings.masked_scatter(positions, features)
        return embeddings

    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.model(inputs_embeds=self._embeddings(inputs), attention_mask=inputs["attention_mask"],
                          use_cache=False).logits[0]

    def generate(self, inputs: dict[str, Any], max_new_tokens: int) -> list[int]:
        prompt = inputs["input_ids"]
        output = self.model.generate(input_ids=prompt, inputs_embeds=self._embeddings(inputs),
                                     attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens,
                                     do_sample=False, num_beams=1, repetition_penalty=1.0,
                                     eos_token_id=sorted(self.terminators))
        return output[0, prompt.shape[1]:].tolist()

    def prefill(self, inputs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        output = self.model(inputs_embeds=self._embeddings(inputs), attention_mask=inputs["attention_mask"],
                            use_cache=True)
        return output.past_key_values, output.logits[:, -1]

    def step(self, token: torch.Tensor, cache: Any) -> tuple[Any, torch.Tensor]:
        output = self.model(input_ids=token, past_key_values=cache, use_cache=True)
        return output.past_key_values, output.logits[:, -1]
