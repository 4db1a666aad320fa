"""What differs between MiniCPM-V versions, as data: one `VersionSpec` per supported release.

Everything version-dependent in the model, processor, `chat()` and every exporter reads from here, so adding a
release is one entry (and its name in `mcq.models.families`, which the CLI reads without importing this).
Sources: the official remote code of each release, vLLM's `minicpmv.py` and llama.cpp's converter (see
shared/research notes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mcq.errors import McqError


@dataclass(frozen=True)
class VersionSpec:
    version: str
    llm_name: str
    llm_config_class: type[PreTrainedConfig]
    llm_model_class: type[PreTrainedModel]
    # The LLM's structure, for the exporters that write the decoder themselves (ONNX, Core ML, GGUF): q/k/v
    # projections with biases (Qwen2), per-head RMSNorm of q and k (Qwen3).
    qkv_bias: bool
    qk_norm: bool
    # llama.cpp: the LLM file's architecture, and the mmproj's `clip.minicpmv_version` (it selects the slice-marker
    # template and the query count llama.cpp assumes).
    gguf_arch: str
    gguf_projector_version: int
    # Token strings that end generation (official `terminators`).
    terminators: tuple[str, ...]
    # 4.5's 3D resampler: temporal ids for video frames, frames of a group packed into one query block.
    temporal: bool
    # chat() options of the official release.
    thinking: bool
    max_inp_length: int
    # Generation settings of `chat(sampling=True)`; thinking turns use only temperature 0.7 (official code).
    sampling_kwargs: dict[str, Any] = field(default_factory=dict)

    def llm_config(self, config) -> PreTrainedConfig:
        """The transformers config of the LLM, built from the top-level fields of a MiniCPM-V config."""
        return self.llm_config_class(**config.llm_kwargs())


def embedding_scale(config) -> float:
    """What the LLM multiplies text embeddings by (never vision features): MiniCPM-family LLMs (4.0) have
    `scale_emb` in config.json; 1.0 where it is absent or null."""
    return float(getattr(config, "scale_emb", 1.0) or 1.0)


_SAMPLING_2X = {"top_p": 0.8, "top_k": 100, "temperature": 0.7, "do_sample": True, "repetition_penalty": 1.05}

VERSIONS: dict[str, VersionSpec] = {
    spec.version: spec
    for spec in (
        VersionSpec(
            version="2.6", llm_name="Qwen2-7B", llm_config_class=Qwen2Config, llm_model_class=Qwen2ForCausalLM,
            qkv_bias=True, qk_norm=False, gguf_arch="qwen2", gguf_projector_version=3,
            terminators=("<|im_end|>", "<|endoftext|>"), temporal=False, thinking=False, max_inp_length=8192,
            sampling_kwargs=_SAMPLING_2X,
        ),
        VersionSpec(
            # MiniCPM4-3B in Llama layout (the official port builds LlamaForCausalLM); `scale_emb`, when the
            # config has it, multiplies the text embeddings only (handled in the model).
            version="4.0", llm_name="MiniCPM4-3B", llm_config_class=LlamaConfig, llm_model_class=LlamaForCausalLM,
            qkv_bias=False, qk_norm=False, gguf_arch="minicpm", gguf_projector_version=5,
            terminators=("<|im_end|>", "</s>"), temporal=False, thinking=False, max_inp_length=8192,
            sampling_kwargs=_SAMPLING_2X,
        ),
        VersionSpec(
            version="4.5", llm_name="Qwen3-8B", llm_config_class=Qwen3Config, llm_model_class=Qwen3ForCausalLM,
            qkv_bias=False, qk_norm=True, gguf_arch="qwen3", gguf_projector_version=6,
            terminators=("<|im_end|>", "<|endoftext|>"), temporal=True, thinking=True, max_inp_length=16384,
            sampling_kwargs={"top_p": 0.8, "top_k": 100, "temperature": 0.7, "do_sample": True,
                             "repetition_penalty": 1.03},
        ),
    )
}


def normalize_version(version: Any) -> str:
    """`4.5`, `"4.5"`, `4` and `"4.0"` all name a release the same way: `"4.5"`, `"4.0"`."""
    try:
        return f"{float(version):.1f}"
    except (TypeError, ValueError):
        raise McqError(f"config.json has version {version!r}, which is not a number; supported: {supported()}")


def supported() -> str:
    return ", ".join(VERSIONS)


def version_spec(version: Any) -> VersionSpec:
    if version is None:
        raise McqError(
            "config.json has no `version` field (MiniCPM-V 2.0/2.5 checkpoints lack it and are not supported); "
            f"supported versions: {supported()}"
        )
    key = normalize_version(version)
    if key not in VERSIONS:
        raise McqError(f"MiniCPM-V version {key} is not supported; supported versions: {supported()}")
    return VERSIONS[key]
