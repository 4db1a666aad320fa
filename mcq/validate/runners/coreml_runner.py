"""Core ML exports (`mcq export --format coreml`) through `mcq.validate.coreml.runtime.CoremlMiniCPMV`: on macOS 15+
Core ML itself (coremltools' predict, compute units chosen by Core ML), elsewhere mcq's numpy interpreter of the
saved packages, which rounds to fp16 after every op as the device does. So on Linux the accuracy scores are the
packages' own (their weights, their fp16 program) while the memory and latency are the interpreter's, not a
device's; the runtime column says which.

4.5 video samples are served: the export's group resampler package packs the frames of each temporal group as the
torch model's 3D resampler does. Validation scores the LLM, so an export without its LLM package (`--llm none`) is
refused when it is described, before any run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcq.errors import McqError
from mcq.export.coreml.api import LLM_COMPRESSIONS

from ..probes import Stopwatch
from .base import MemoryPlan, Runner, config_identity


class CoremlRunner(Runner):
    name = "coreml"
    # Named by the LLM package's compression (--llm): the LLM holds most of the weights.
    formats = tuple(f"coreml-{compression}" for compression in LLM_COMPRESSIONS)

    @classmethod
    def detect(cls, path: str | Path) -> str | None:
        from mcq.validate.coreml.runtime import read_sidecar

        if str(path).startswith("tiny:") or not Path(path).is_dir():
            return None
        sidecar = read_sidecar(path)
        if sidecar is None:
            return None
        return f"coreml-{(sidecar.get('compression') or {}).get('llm', 'none')}"

    @classmethod
    def runtime(cls, format_name: str) -> str:
        import platform
        from importlib.metadata import version

        from mcq.validate.coreml.runtime import native_available

        if native_available():
            return f"Core ML (coremltools {version('coremltools')} predict, macOS {platform.mac_ver()[0]})"
        return f"mcq MIL interpreter (numpy {version('numpy')}, {platform.system()})"

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        from mcq.validate.coreml.runtime import read_sidecar
        from mcq.models.family import family_for

        sidecar = read_sidecar(path)
        if sidecar is None or "model_config" not in sidecar:
            raise McqError(f"{path}: its Core ML sidecar does not say which model it is (re-export it with this mcq)")
        if sidecar["llm"] is None:
            raise McqError(f"{path} has no LLM package (exported with --llm none); mcq validate scores the LLM's "
                           "logits and answers, so export with --llm int4-block32, palettize4, int8 or fp16")
        config = sidecar["model_config"]
        return config_identity(family_for(config["model_type"]).config_class(**config))

    @classmethod
    def weight_bytes(cls, path: str | Path) -> dict[str, int]:
        from mcq.validate.coreml.runtime import component_bytes

        return component_bytes(path)

    @classmethod
    def memory_plan(cls, path, device, dtype, available, tokens) -> MemoryPlan:
        """The packages run one after the other, and a call holds at most its package's weights decompressed to
        fp16 (the interpreter keeps only small constants between calls, and frees each weight after its product),
        plus the stored levels of the one being read: counted from the weights' shapes in each program (a file's
        size says too little: int4 levels are half a byte each on disk and two bytes in fp16), all but the weights
        the interpreter reads by rows (embedding tables, the LM head: a block of rows at a time). Beside the
        largest package: the caches of every decoder package and the float32 logits."""
        from mcq.export.coreml.program import load_program
        from mcq.validate.coreml.interpreter import read_by_rows
        from mcq.validate.coreml.runtime import native_available, read_sidecar

        sidecar = read_sidecar(path)
        if (torch.device(device).type != "cpu" or native_available() or sidecar is None
                or sidecar["llm"] is None):
            return MemoryPlan(None)
        package_bytes = []
        for package in sorted(Path(path).glob("*.mlpackage")):
            program = load_program(package)
            by_rows = read_by_rows(program)
            sizes = [tensor.size for name, tensor in program.stored() if name not in by_rows] or [0]
            package_bytes.append(2 * sum(sizes) + 2 * max(sizes))
        cache = sum(2 * int(np.prod(state["shape"])) for chunk in sidecar["llm"]["decoder"]
                    for state in chunk["states"].values())
        config = sidecar["model_config"]
        vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]
        return MemoryPlan(max(package_bytes) + cache + 3 * tokens * vocab * 4 + (1 << 30), "numpy MIL interpreter",
                          hint="validate it on macOS 15 or later, where Core ML runs it")

    def __init__(self, path: str | Path, device: torch.device, dtype: str):
        from mcq.validate.coreml.runtime import open_coreml

        if torch.device(device).type != "cpu":
            raise McqError(f"the Core ML runner takes --device cpu (Core ML picks its own compute units), not {device}")
        # The precision is the packages' (fp16 compute, their weights): the dtype asked for does not apply.
        self.model = open_coreml(path)
        if self.model.llm_info is None:
            raise McqError(f"{path} has no LLM package (exported with --llm none)")

    def vision(self, data: dict[str, Any]) -> torch.Tensor:
        return torch.from_numpy(self.model.sample_vision(data))

    def _embeds(self, data: dict[str, Any], vision: torch.Tensor | None):
        return self.model.sample_embeddings(data, None if vision is None else vision.float().numpy())

    def logits(self, data: dict[str, Any], vision: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(self.model.forward(self._embeds(data, vision)))

    def generate(self, data: dict[str, Any], max_new_tokens: int, vision: torch.Tensor | None = None) -> list[int]:
        return self.model.generate(self._embeds(data, vision), max_new_tokens)

    def time_prefill(self, data: dict[str, Any], vision: torch.Tensor | None) -> float:
        embeds = self._embeds(data, vision)
        with Stopwatch(torch.device("cpu")) as watch:
            self.model.forward(embeds)
        return watch.seconds

    def time_decode(self, data: dict[str, Any], tokens: int, vision: torch.Tensor | None) -> float:
        import numpy as np

        model = self.model
        embeds = self._embeds(data, vision)
        logits = model.forward(embeds)[-1]
        with Stopwatch(torch.device("cpu")) as watch:
            for step in range(tokens):
                # Greedy, terminators included: the step costs the same whatever the token is.
                logits = model.decode(model.embed([int(np.argmax(logits))]), len(embeds) + step)[-1]
        return watch.seconds
