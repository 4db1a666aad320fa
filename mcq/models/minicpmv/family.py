"""The resampler family (2.6 / 4.0 / 4.5) as mcq's tools see it: mcq's own `MiniCPMV`, its blocks in data-flow
order (`mcq.models.familyspec.Family`). Per-release differences are in `versions.py`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..families import family_components
from ..familyspec import Calibration, CaptureStage, Family, PaddableMlp
from .chat import CalibrationEncoder, chat
from .configuration import MiniCPMVConfig
from .modeling import MiniCPMV
from .programs import build_program
from .gguf import LAYOUT as GGUF_LAYOUT
from .serving import ServedMiniCPMV
from .tiny import write_tiny
from .vllm_inputs import MiniCPMVVllmInputs
from .versions import version_spec


def _blocks(model: MiniCPMV) -> Iterator[tuple[str, nn.Module]]:
    """Vision encoder layers, the resampler, LLM decoder layers."""
    for i, layer in enumerate(model.vpm.encoder.layers):
        yield f"vpm.encoder.layers.{i}", layer
    yield "resampler", model.resampler
    for i, layer in enumerate(model.llm.model.layers):
        yield f"llm.model.layers.{i}", layer


def _forward(model: MiniCPMV, data: dict[str, Any]) -> Any:
    return model(data, use_cache=False)


@contextmanager
def _one_slice_per_vision_call(model: MiniCPMV) -> Iterator[None]:
    """One slice per vision-tower call while capturing: slices of a batch are padded to the longest, and padded
    patches would enter the calibration statistics (AWQ's activation means, GPTQ's Hessians) as if they were image
    content. The driver then regroups slices of equal length, which need no padding (`CaptureStage.batches`)."""
    chunk = model.config.vision_batch_size
    model.config.vision_batch_size = 1
    try:
        yield
    finally:
        model.config.vision_batch_size = chunk


_CALIBRATION = Calibration(
    stages=(CaptureStage("vpm.encoder.layers.0", per_vision_call=True, batches=True), CaptureStage("resampler"),
            CaptureStage("llm.model.layers.0")),
    forward=_forward, capturing=_one_slice_per_vision_call, open_encoder=CalibrationEncoder)


def _describe(config: dict) -> tuple[str, str]:
    spec = version_spec(config.get("version"))
    return spec.version, spec.llm_name


# Without dequantize=True transformers keeps the packed weights for kernels the CPU does not have, and the first
# forward fails (transformers 5.17, compressed-tensors 0.19).
_REGISTER = "import mcq  # registers MiniCPM-V with transformers (no remote code)\n"
_LOAD = {"compressed-tensors": (_REGISTER + "from transformers import AutoModel, CompressedTensorsConfig\n"
                                "model = AutoModel.from_pretrained(\n"
                                "    PATH, quantization_config=CompressedTensorsConfig(dequantize=True))"),
         "bitsandbytes": (_REGISTER + "from transformers import AutoModel\n"
                          "model = AutoModel.from_pretrained(PATH, device_map=\"cpu\")")}

# Inside each block, only pairs with nothing nonlinear between smooth and balance layers: so no fc1 → fc2 (GELU
# between), and in the resampler no ln_kv → k/v (the 2D position term is added to the keys after ln_kv).
_SMOOTHING_PAIRS = {
    "vision": (
        ("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("layer_norm2", ("mlp.fc1",)),
    ),
    "resampler": (
        ("ln_q", ("attn.q_proj",)),
        ("attn.v_proj", ("attn.out_proj",)),
        ("ln_post", ("proj",)),
    ),
    "llm": (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),   # skipped (and reported) under GQA: the widths differ
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
}

FAMILY = Family(name="minicpmv", config_class=MiniCPMVConfig, model_class=MiniCPMV,
                components=tuple(family_components("minicpmv")), blocks=_blocks,
                embedding="llm.model.embed_tokens.weight", lm_head="llm.lm_head", describe=_describe,
                paddable_mlps={"vision": PaddableMlp("mlp.fc2", ("mlp.fc1",), ("vision_config", "intermediate_size")),
                               "llm": PaddableMlp("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"),
                                                  ("intermediate_size",))},
                smoothing_pairs=_SMOOTHING_PAIRS,
                token_mixing={"vision": ("self_attn",), "resampler": ("attn",), "llm": ("self_attn",)},
                norm_offset=lambda norm: 0.0, calibration=_CALIBRATION, serve=ServedMiniCPMV,
                vllm_inputs=MiniCPMVVllmInputs, load_code=_LOAD,
                write_tiny=write_tiny, gguf=GGUF_LAYOUT, chat=chat,
                # vLLM's MiniCPM-V models keep the checkpoint's module names: patterns over layers match there.
                plain_quantization_names=False, graphs=build_program,
                programs=None)
