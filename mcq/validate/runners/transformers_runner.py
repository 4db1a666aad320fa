"""Checkpoints that transformers serves: the bf16 reference, compressed-tensors and bitsandbytes variants (the
formats `mcq quantize` writes), as their family's model class (mcq's native MiniCPM-V, transformers' 4.6), run
through the family's `ServedModel` (`mcq.models.familyspec`).

Loading goes through `mcq.models.loading.load_model`, which is what `mcq chat` runs: compressed-tensors weights
are dequantized once at load on CPU (transformers has no CPU kernel for packed int4), bitsandbytes weights stay
quantized and run bitsandbytes' kernels. So memory and speed are what a transformers user of the variant gets.

Unless the model is large for the machine: on CPU, when its weights in the compute dtype would take more than a
quarter of the memory available (`memory_plan`), a bf16 or compressed-tensors checkpoint is run with its weights
mapped from the checkpoint instead (`mcq.models.mapped`: each Linear cast or dequantized a block at a time as it
computes). The numbers are the same (tests compare the logits bit for bit); only time is traded for memory, and
memory then does not grow with depth. An 8B reference in float32 would take 33 GB resident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mcq.models.loading import (load_model, open_checkpoint, read_config, resolve_model_path,
                                safetensors_component_bytes)

from ..probes import Stopwatch
from .base import MemoryPlan, Runner, config_identity

# Weights are held whole (the fastest way to run them) when they take at most this share of the memory available;
# larger models run from their mapped checkpoint. The rest is for activations, the cache, the logits, the parent.
RESIDENT_SHARE = 0.25
_WIDTH = {"float32": 4, "bfloat16": 2, "float16": 2}
# A mapped Linear alternates many short parallel ops (a block's cast, its product); OpenMP's default spin-waiting
# between them made a decoded token take 1x-5x its time from one run to the next on the 2-core benchmark machine
# (user CPU time 16-46 s for the same 16 tokens), where waiting passively gives steady times near the resident
# model's (3.3-4.1 against 4.1 tokens/s). Resident weights run one op per Linear and are not affected either way.
MAPPED_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
_RUNTIME_BYTES = 1 << 30     # torch, transformers and the tokenizer imported, before any weight

# quant_method in config.json → the format name reported.
_QUANT_FORMATS = {"compressed-tensors": "compressed-tensors", "bitsandbytes": "bitsandbytes"}


def _working_bytes(config, tokens: int, width: int) -> int:
    """Memory besides the weights for inputs of up to `tokens` tokens: the logits (float32, kept, log-softmaxed
    and compared: three copies), the KV cache, a layer's activations, the runtime itself."""
    config = config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    logits = 3 * tokens * config.vocab_size * 4
    cache = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * width
    activations = 4 * tokens * max(config.intermediate_size, config.hidden_size) * width
    return logits + cache + activations + _RUNTIME_BYTES


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
        return config_identity(open_checkpoint(path).config)

    @classmethod
    def weight_bytes(cls, path: str | Path) -> dict[str, int]:
        return safetensors_component_bytes(resolve_model_path(path))

    @classmethod
    def memory_plan(cls, path: str | Path, device: str, dtype: str, available: int | None,
                    tokens: int) -> MemoryPlan:
        from mcq.models.loading import meta_skeleton

        format_name = cls.detect(path)
        config = open_checkpoint(path).config
        skeleton = meta_skeleton(config)
        width = _WIDTH[dtype]
        params = sum(p.numel() for p in skeleton.parameters())
        linears = [m for m in skeleton.modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]
        large = sum(m.weight.numel() for m in linears)
        working = _working_bytes(config, tokens, width)
        if torch.device(device).type != "cpu":
            return MemoryPlan(None, f"{dtype} on {device}")
        if format_name == "bitsandbytes":
            stored = sum(safetensors_component_bytes(resolve_model_path(path)).values())
            return MemoryPlan(stored + (params - large) * width + working, "bitsandbytes kernels, weights resident",
                              hint="pass --device cuda")
        resident = params * width + working
        if available is None or resident <= available * RESIDENT_SHARE:
            return MemoryPlan(resident, f"{dtype}, weights resident")
        largest = max(m.weight.numel() for m in linears if isinstance(m, torch.nn.Linear))
        # a compressed Linear with no blockwise path (activation-ordered) is dequantized whole for its call;
        # the others are cast or dequantized a block of rows at a time
        in_flight = largest * width * 2 if format_name == "compressed-tensors" else 0
        mapped = (params - large) * width + in_flight + working
        return MemoryPlan(mapped, f"{dtype} compute, weights mapped from the checkpoint", {"weights": "mapped"},
                          hint="pass --device cuda" if dtype != "float32" else "pass --dtype bfloat16 or --device cuda",
                          environment=MAPPED_ENVIRONMENT)

    def __init__(self, path: str | Path, device: torch.device, dtype: str, weights: str = "resident"):
        """`weights`: "resident" (loaded whole, as `mcq chat` does) or "mapped" (`mcq.models.mapped`, CPU)."""
        self.device = torch.device(device)
        checkpoint = open_checkpoint(path)
        if weights == "mapped":
            from mcq.models.loading import DTYPES, check_layout, meta_skeleton, stored_tensors
            from mcq.models.mapped import load_mapped

            check_layout(checkpoint.path, meta_skeleton(checkpoint.config), stored_tensors(checkpoint.path))
            model = load_mapped(checkpoint.path, checkpoint.config, DTYPES[dtype])
        else:
            model = load_model(checkpoint, dtype=dtype, device=str(self.device))
        self.model = checkpoint.family.serve(model, checkpoint.path, self.device)

    @torch.inference_mode()
    def vision(self, data: dict[str, Any]) -> torch.Tensor:
        return self.model.vision(self.model.inputs(data)).float().cpu()

    @torch.inference_mode()
    def logits(self, data: dict[str, Any], vision: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.logits(self.model.inputs(data, vision)).float().cpu()

    @torch.inference_mode()
    def generate(self, data: dict[str, Any], max_new_tokens: int, vision: torch.Tensor | None = None) -> list[int]:
        tokens = self.model.generate(self.model.inputs(data, vision), max_new_tokens)
        for end, token in enumerate(tokens):
            if token in self.model.terminators:
                return tokens[: end + 1]
        return tokens

    @torch.inference_mode()
    def time_vision(self, data: dict[str, Any]) -> float:
        inputs = self.model.inputs(data)
        with Stopwatch(self.device) as watch:
            self.model.vision(inputs)
        return watch.seconds

    @torch.inference_mode()
    def time_prefill(self, data: dict[str, Any], vision: torch.Tensor | None) -> float:
        inputs = self.model.inputs(data, vision)
        with Stopwatch(self.device) as watch:
            self.model.prefill(inputs)
        return watch.seconds

    @torch.inference_mode()
    def time_decode(self, data: dict[str, Any], tokens: int, vision: torch.Tensor | None) -> float:
        cache, logits = self.model.prefill(self.model.inputs(data, vision))
        with Stopwatch(self.device) as watch:
            for _ in range(tokens):
                # Greedy, terminators included: the step costs the same whatever the token is.
                cache, logits = self.model.step(logits.argmax(-1, keepdim=True), cache)
        return watch.seconds
