"""Checkpoints that transformers serves with mcq's native MiniCPM-V: the bf16 reference, compressed-tensors and
bitsandbytes variants (the formats `mcq quantize` writes).

Loading goes through `mcq.models.loading.load_model`, which is what `mcq chat` runs: compressed-tensors weights
are dequantized once at load on CPU (transformers has no CPU kernel for packed int4), bitsandbytes weights stay
quantized and run bitsandbytes' kernels. So memory and speed are what a transformers user of the variant gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mcq.models.loading import (load_model, load_processor, model_spec, read_config, resolve_model_path,
                                safetensors_component_bytes)

from ..probes import Stopwatch
from .base import Runner, config_identity

# quant_method in config.json → the format name reported.
_QUANT_FORMATS = {"compressed-tensors": "compressed-tensors", "bitsandbytes": "bitsandbytes"}


# What MiniCPMV.forward/generate read from a processor output (image_sizes and answer_mask are not model inputs).
_MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "tgt_sizes", "image_bound", "temporal_ids")


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    return value


class TransformersRunner(Runner):
    name = "transformers"
    formats = ("bf16", "float16", "float32", *_QUANT_FORMATS.values())

    @classmethod
    def detect(cls, path: str | Path) -> str | None:
        if not str(path).startswith("tiny:") and not (Path(path) / "config.json").is_file():
            return None   # not a Hugging Face checkpoint directory: another runner's format, or none
        if not str(path).startswith("tiny:") and not any(
                (Path(path) / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            return None   # a config without safetensors weights: e.g. an ONNX export (config.json beside onnx/)
        config = read_config(resolve_model_path(path))
        quantization = config.get("quantization_config")
        if quantization:
            return _QUANT_FORMATS.get(quantization.get("quant_method"))
        stored = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
        return {"bfloat16": "bf16"}.get(stored, stored)

    @classmethod
    def runtime(cls, format_name: str) -> str:
        from importlib.metadata import version

        name = f"transformers {version('transformers')}"
        if format_name == "compressed-tensors":
            return f"{name}, compressed-tensors {version('compressed-tensors')} (dequantized at load)"
        if format_name == "bitsandbytes":
            return f"{name}, bitsandbytes {version('bitsandbytes')}"
        return name

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        return config_identity(model_spec(path)[1])

    @classmethod
    def weight_bytes(cls, path: str | Path) -> dict[str, int]:
        return safetensors_component_bytes(resolve_model_path(path))

    def __init__(self, path: str | Path, device: torch.device, dtype: str):
        self.device = torch.device(device)
        self.tokenizer = load_processor(path).tokenizer
        self.model = load_model(path, dtype=dtype, device=str(self.device))
        self.terminators = set(self.model.terminator_ids(self.tokenizer))

    def _inputs(self, data: dict[str, Any]) -> dict[str, Any]:
        return {key: _move(value, self.device) for key, value in data.items() if key in _MODEL_INPUTS}

    @torch.inference_mode()
    def vision(self, data: dict[str, Any]) -> torch.Tensor:
        (states,) = self.model._vision_states_per_sample(self._inputs(data))   # a batch of one sample
        return states.float().cpu()

    @torch.inference_mode()
    def logits(self, data: dict[str, Any], vision: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(self._with_vision(data, vision), use_cache=False).logits[0].float().cpu()

    @torch.inference_mode()
    def generate(self, data: dict[str, Any], max_new_tokens: int, vision: torch.Tensor | None = None) -> list[int]:
        output = self.model.generate(**self._with_vision(data, vision), tokenizer=self.tokenizer,
                                     max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     repetition_penalty=1.0)
        tokens = output[0].tolist()
        for end, token in enumerate(tokens):
            if token in self.terminators:
                return tokens[: end + 1]
        return tokens

    @torch.inference_mode()
    def time_vision(self, data: dict[str, Any]) -> float:
        inputs = self._inputs(data)
        with Stopwatch(self.device) as watch:
            self.model._vision_states_per_sample(inputs)
        return watch.seconds

    def _with_vision(self, data: dict[str, Any], vision: torch.Tensor | None) -> dict[str, Any]:
        inputs = self._inputs(data)
        if vision is not None:
            inputs["vision_hidden_states"] = [vision.to(self.device, self.model.dtype)]
        return inputs

    @torch.inference_mode()
    def time_prefill(self, data: dict[str, Any], vision: torch.Tensor | None) -> float:
        inputs = self._with_vision(data, vision)
        with Stopwatch(self.device) as watch:
            self.model(inputs, use_cache=True)
        return watch.seconds

    @torch.inference_mode()
    def time_decode(self, data: dict[str, Any], tokens: int, vision: torch.Tensor | None) -> float:
        output = self.model(self._with_vision(data, vision), use_cache=True)
        cache, logits = output.past_key_values, output.logits[:, -1]
        with Stopwatch(self.device) as watch:
            for _ in range(tokens):
                # Greedy, terminators included: the step costs the same whatever the token is.
                step = self.model.llm(input_ids=logits.argmax(-1, keepdim=True), past_key_values=cache,
                                      use_cache=True)
                cache, logits = step.past_key_values, step.logits[:, -1]
        return watch.seconds
