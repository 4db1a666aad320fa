"""ONNX exports (`mcq export --format onnx`) on onnxruntime, through `mcq.export.onnx.OnnxMiniCPMV` (the resampler
family's host) or `mcq.export.onnx.program_runtime.OnnxProgramModel` (the host of a family's `Programs`): what a user of the export runs, so accuracy, memory and speed are
onnxruntime's (CPU execution provider; CUDA when asked for and installed). The precision is the export's (its files say it), so the `dtype` the
validator asks for is not used; float32 is what every export computes in on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mcq.errors import McqError
from mcq.models.families import family_components
from mcq.models.family import component_or_other

from ..probes import Stopwatch
from .base import MemoryPlan, Runner, config_identity

_FORMATS = {"fp32": "onnx-fp32", "fp16": "onnx-fp16", "int8": "onnx-int8", "q4": "onnx-int4"}


def _numpy(vision: torch.Tensor | None):
    return None if vision is None else [vision.float().numpy()]


def _config(path: str | Path):
    """The config of the model an export holds, in its family's config class."""
    from mcq.export.onnx.runtime import find_export
    from mcq.models.family import family_for

    root, _ = find_export(path)
    model_type = json.loads((root / "config.json").read_text())["model_type"]
    return family_for(model_type).config_class.from_pretrained(str(root))


class OnnxRunner(Runner):
    name = "onnxruntime"
    formats = tuple(_FORMATS.values())

    @classmethod
    def detect(cls, path: str | Path) -> str | None:
        from mcq.export.onnx.runtime import find_export, is_onnx_export

        if str(path).startswith("tiny:") or not is_onnx_export(path):
            return None
        root, _ = find_export(path)
        dtype = json.loads((root / "config.json").read_text())["transformers.js_config"]["dtype"]
        # Named by the LLM's precision: the decoder holds most of the weights.
        return _FORMATS[dtype["decoder_model_merged"]]

    @classmethod
    def runtime(cls, format_name: str) -> str:
        from importlib.metadata import version

        return f"onnxruntime {version('onnxruntime')} (mcq.export.onnx runtime)"

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        return config_identity(_config(path))

    @classmethod
    def weight_bytes(cls, path: str | Path) -> dict[str, int]:
        """Initializer bytes per component, by the model parameter each initializer is named after (constants
        such as reshape shapes count as `other`)."""
        import onnx

        from mcq.export.onnx.store import external_field
        from mcq.export.onnx.runtime import find_export, graph_files

        root, onnx_dir = find_export(path)
        model_type = json.loads((root / "config.json").read_text())["model_type"]
        sizes = dict.fromkeys(family_components(model_type), 0)
        for file in graph_files(root).values():
            model = onnx.load(str(onnx_dir / file), load_external_data=False)
            for tensor in model.graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    size = int(external_field(tensor, "length"))
                else:
                    size = len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
                component = component_or_other(tensor.name)
                sizes[component] = sizes.get(component, 0) + size
        return sizes

    @classmethod
    def memory_plan(cls, path, device, dtype, available, tokens) -> MemoryPlan:
        """onnxruntime holds every graph with its weights (read from the .onnx file, or from the external data
        file), plus the logits and the KV cache of the sequence."""
        from mcq.export.onnx.runtime import find_export

        _, onnx_dir = find_export(path)
        # Every layer's KV cache counted (a bound for an LLM whose linear-attention layers keep a fixed state).
        config = _config(path).get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * 4
        stored = sum(f.stat().st_size for f in onnx_dir.iterdir() if f.is_file())
        return MemoryPlan(stored + cache + 3 * tokens * config.vocab_size * 4 + (1 << 30), "onnxruntime CPU")

    def __init__(self, path: str | Path, device: torch.device, dtype: str):
        import onnxruntime as ort

        from mcq.export.onnx import OnnxMiniCPMV
        from mcq.export.onnx.program_runtime import OnnxProgramModel
        from mcq.models.family import family_for

        self.device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise McqError("device cuda: this onnxruntime has no CUDA execution provider "
                               "(install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        elif self.device.type != "cpu":
            raise McqError(f"the ONNX runner runs on cpu or cuda, not {device}")
        # As many intra-op threads as torch uses here, so latencies compare like for like with torch runners.
        # An export traced from the family's programs runs on their host code; the resampler family's on its own.
        traced = family_for(_config(path).model_type).programs is not None
        self.model = (OnnxProgramModel if traced else OnnxMiniCPMV)(path, providers=providers,
                                                                      threads=torch.get_num_threads())

    @staticmethod
    def _batch(data: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in data.items() if key != "answer_mask"}

    def vision(self, data: dict[str, Any]) -> torch.Tensor:
        (states,) = self.model.vision_per_sample(data)   # a batch of one sample
        return torch.from_numpy(states)

    def logits(self, data: dict[str, Any], vision: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(self.model.forward(self._batch(data), _numpy(vision))[0])

    def generate(self, data: dict[str, Any], max_new_tokens: int, vision: torch.Tensor | None = None) -> list[int]:
        return self.model.generate(self._batch(data), max_new_tokens, _numpy(vision))[0]

    def time_vision(self, data: dict[str, Any]) -> float:
        with Stopwatch(self.device) as watch:
            self.model.vision_per_sample(data)
        return watch.seconds

    def time_prefill(self, data: dict[str, Any], vision: torch.Tensor | None) -> float:
        with Stopwatch(self.device) as watch:
            self.model.forward(self._batch(data), _numpy(vision))
        return watch.seconds

    def time_decode(self, data: dict[str, Any], tokens: int, vision: torch.Tensor | None) -> float:
        import numpy as np

        from mcq.export.onnx.runtime import position_ids

        model = self.model
        embeds = model.merged_embeddings(self._batch(data), _numpy(vision))
        mask = np.asarray(data["attention_mask"], dtype=np.int64)
        positions = position_ids(mask)
        logits, cache = model.decoder(embeds, mask, positions, model.empty_cache(len(embeds)))
        with Stopwatch(self.device) as watch:
            for _ in range(tokens):
                # Greedy, terminators included: the step costs the same whatever the token is.
                token = logits[:, -1].argmax(-1)[:, None]
                mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
                positions = positions[:, -1:] + 1
                logits, cache = model.decoder(model.embed(token), mask, positions, cache)
        return watch.seconds
