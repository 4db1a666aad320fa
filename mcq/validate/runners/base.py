"""What a runner is: one variant loaded in the runtime that would serve it, behind a small interface.

The validator asks every runner the same questions on the same encoded inputs (`EvalItem`, encoded by the
reference's processor): the vision path's output, teacher-forced logits, a greedy answer, and timed runs of
vision encoding, prefill and decoding. Runners for other runtimes (llama.cpp, onnxruntime, Core ML) implement this
class and register in `mcq.validate.runners.RUNNERS`; the harness (`mcq.validate.worker`) measures memory around
them and computes every metric, so a runner only runs its model.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class MemoryPlan:
    """How a variant will be run and about how much memory that takes, decided before it is loaded.

    `bytes` is the estimate the validator compares with the memory available (None: the runner cannot tell);
    `load` are keyword arguments for the runner's constructor; `how` says in words what was chosen (it is shown
    with the runtime, so a report says how a variant was run); `environment` are variables the worker process
    starts with, unless the user set them (settings a runtime reads once, at start)."""

    bytes: int | None
    how: str = ""
    load: dict[str, Any] = field(default_factory=dict)
    hint: str = "pass --device cuda"     # what to do when it does not fit
    environment: dict[str, str] = field(default_factory=dict)



class Runner(ABC):
    #: the runtime's name, as `mcq validate --runtime` takes it
    name: str = ""
    #: the format name reported for variants this runner serves (e.g. "compressed-tensors")
    formats: tuple[str, ...] = ()
    #: whether the runtime preprocesses a sample's images itself (from the encoded sample's `images`, as its users'
    #: requests would): it is then constructed with the evaluation's `max_slice_nums`, so its slicing is the
    #: reference's
    preprocesses_images: bool = False
    #: what the loaded runner does otherwise than its runtime's default, found while loading (shown with the
    #: runtime, like a memory plan's `how`)
    how: str = ""

    @classmethod
    @abstractmethod
    def detect(cls, path: str | Path) -> str | None:
        """The format of `path` if this runner serves it, else None. Reads metadata only (no weights)."""

    @classmethod
    @abstractmethod
    def runtime(cls, format_name: str) -> str:
        """What serves a variant of this format here, with versions (e.g. "llama.cpp b4000 (CPU)"): the reader of
        a report must know which runtime its memory and latency are of."""

    @classmethod
    @abstractmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        """Identity of the model behind `path` (version, widths, vocabulary) to check it against the reference."""

    @classmethod
    @abstractmethod
    def weight_bytes(cls, path: str | Path) -> dict[str, int]:
        """Bytes on disk per component (llm / vision / resampler / other) of the variant's weights."""

    @classmethod
    def environment(cls) -> str:
        """The Python that runs this runner's worker process: this one, unless the runtime lives in an environment
        of its own (vLLM); a one-line McqError when that environment is missing."""
        return sys.executable

    @classmethod
    def memory_plan(cls, path: str | Path, device: str, dtype: str, available: int | None,
                    tokens: int) -> MemoryPlan:
        """How to run `path` on `device` in memory `available` (bytes, None if unknown) with inputs of up to
        `tokens` tokens. The default says nothing (the validator then checks nothing before loading)."""
        return MemoryPlan(None)

    @classmethod
    def unserved(cls, data: dict[str, Any]) -> str | None:
        """Why this runtime cannot run an encoded sample (e.g. video without a 3D resampler), or None. The
        validator scores a variant on the samples its runtime serves and reports how many it left out."""
        return None

    @abstractmethod
    def __init__(self, path: str | Path, device: torch.device, dtype: str):
        """Load the variant (the worker measures this call's peak memory and time). A runner that
        `preprocesses_images` also takes `max_slice_nums`."""

    @abstractmethod
    def vision(self, data: dict[str, Any]) -> torch.Tensor:
        """The resampler's output blocks of one encoded sample, `[G, queries, hidden]` float32 (one block per image
        slice or temporal group)."""

    @abstractmethod
    def logits(self, data: dict[str, Any], vision: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits `[length, vocab]` (float32) of one encoded sample; `vision`, when given, replaces
        the sample's vision features (to score another model's vision path through this one's LLM)."""

    @abstractmethod
    def generate(self, data: dict[str, Any], max_new_tokens: int, vision: torch.Tensor | None = None) -> list[int]:
        """Greedy continuation of an encoded prompt, up to and including a terminator token (`vision` as in
        `logits`)."""

    def time_vision(self, data: dict[str, Any]) -> float:
        """Seconds of one vision-path run (tower + resampler, every slice of the sample's images). This default
        times `vision()` on the host clock, right for CPU runtimes; runners on an accelerator time their own."""
        from ..probes import Stopwatch

        with Stopwatch(torch.device("cpu")) as watch:
            self.vision(data)
        return watch.seconds

    @abstractmethod
    def time_prefill(self, data: dict[str, Any], vision: torch.Tensor | None) -> float:
        """Seconds of one prefill over the prompt's tokens with the vision features given (the LLM part only)."""

    @abstractmethod
    def time_decode(self, data: dict[str, Any], tokens: int, vision: torch.Tensor | None) -> float:
        """Seconds of `tokens` single-token decode steps after a prefill of the prompt (the prefill not counted)."""


def grouped_video(data: dict[str, Any]) -> bool:
    """Whether an encoded sample is 4.5 video: frames grouped by temporal id, which only the 3D resampler does
    (runtimes without it, llama.cpp and vLLM, leave such samples out)."""
    groups = (data.get("temporal_ids") or [[]])[0] or []
    return any(frame >= 0 for group in groups for frame in group)


def config_identity(config) -> dict[str, Any]:
    """What `Runner.describe` returns, read from a MiniCPM-V config of any family (runners whose files carry one):
    the release, the LLM's and the vision tower's widths and depths, and the resampler's query count where the
    family has one."""
    from mcq.models.family import family_for

    release, _ = family_for(config.model_type).describe(config.to_dict())
    text = config.get_text_config()
    identity = {"version": release, "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
                "vocab_size": text.vocab_size, "vision_hidden_size": config.vision_config.hidden_size,
                "vision_layers": config.vision_config.num_hidden_layers}
    if hasattr(config, "query_num"):
        identity["query_num"] = config.query_num
    return identity

