"""MiniCPM-V 4.6 as mcq's tools see it (`mcq.models.familyspec.Family`): transformers' own classes, and its blocks in
the order data flows through them: vision layers up to `insert_layer_id`, the window-attention `vit_merger`, the
remaining vision layers, the downsampling `merger`, the LLM's decoder layers (linear- and full-attention alike)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

from ..families import family_components
from ..familyspec import PER_HEAD, Calibration, CaptureStage, Family, PaddableMlp
from .calibration import CalibrationEncoder, forward, norm_offset, per_size_runs
from .chat import chat
from .facts import RELEASE
from .gguf import LAYOUT as GGUF_LAYOUT
from .programs import PROGRAMS, build_program
from .serving import ServedMiniCPMV4_6
from .tiny import write_tiny
from .vllm_inputs import MiniCPMV4_6VllmInputs


def _blocks(model: MiniCPMV4_6ForConditionalGeneration) -> Iterator[tuple[str, nn.Module]]:
    tower = model.model.vision_tower
    insert = tower.config.insert_layer_id
    for i, layer in enumerate(tower.encoder.layers):
        yield f"model.vision_tower.encoder.layers.{i}", layer
        if i == insert:
            yield "model.vision_tower.vit_merger", tower.vit_merger
    yield "model.merger", model.model.merger
    for i, layer in enumerate(model.model.language_model.layers):
        yield f"model.language_model.layers.{i}", layer


def _describe(config: dict) -> tuple[str, str]:
    layer_types = config.get("text_config", {}).get("layer_types", [])
    kinds = {kind: layer_types.count(kind) for kind in dict.fromkeys(layer_types)}
    return RELEASE, f"Qwen3.5 hybrid ({', '.join(f'{n} {kind}' for kind, n in kinds.items())})"


# Native in transformers: no `import mcq`. dequantize=True as for the resampler family (no CPU kernels for packed
# int4 in transformers 5.17 / compressed-tensors 0.19).
_LOAD = {"compressed-tensors": ("from transformers import AutoModelForImageTextToText, CompressedTensorsConfig\n"
                                "model = AutoModelForImageTextToText.from_pretrained(\n"
                                "    PATH, quantization_config=CompressedTensorsConfig(dequantize=True))"),
         "bitsandbytes": ("from transformers import AutoModelForImageTextToText\n"
                          "model = AutoModelForImageTextToText.from_pretrained(PATH, device_map=\"cpu\")\n"
                          "# On a CPU with AVX512-BF16, bitsandbytes' fused 4-bit kernel needs output widths in multiples "
                          "of 32\n# (the vision MLP's 4304 is not): keep those layers on its generic kernel with\n"
                          "# mcq.models.bnb_runtime.disable_unsupported_cpu_repacking(model)")}

# Inside each block, only pairs with nothing nonlinear between smooth and balance layers: no fc1 -> fc2 nor
# linear_1 -> linear_2 (GELU between). What sits between them and is still exact: the vit_merger's window reordering
# after layer_norm1 (it permutes tokens, not channels), its pre_norm over a flattened 2x2 window (4x hidden wide,
# which is linear_1's input), the merger's reshape after pre_norm (same width), the full-attention output gate
# (sigmoid(gate) * attention, per channel), the gate of the linear attention's RMSNorm (x̂ · weight · silu(z), per
# channel). That norm runs head by head with one weight per value-head channel, shared by every value head, while
# out_proj takes all heads' channels: a per-head pair (PER_HEAD). The LLM's other norms scale by 1 + weight
# (`norm_offset`). The release has merger_times 1: the merger has one MLP, mlp.0.
_SMOOTHING_PAIRS = {
    "vision": (
        ("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("layer_norm2", ("mlp.fc1",)),
    ),
    "vit_merger": (
        ("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.out_proj",)),
        ("pre_norm", ("linear_1",)),
    ),
    "merger": (
        ("mlp.0.pre_norm", ("mlp.0.linear_1",)),
    ),
    # Each layer has one token mixer: the pairs of the other kind concern no Linear of it and are passed over.
    "llm": (
        ("input_layernorm", ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_b",
                             "linear_attn.in_proj_a")),
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("linear_attn.norm", ("linear_attn.out_proj",), PER_HEAD),
        ("self_attn.v_proj", ("self_attn.o_proj",)),   # skipped (and reported) under GQA: the widths differ
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
}

# Stages: the vision layers and the vit_merger chain (the vit_merger takes layer insert_layer_id's output; what
# changes after it, the token count and target_sizes // 2, reaches the later layers through their own recorded
# arguments), called once per run of equal-size images (`per_size_runs`); the merger (after the tower's
# post_layernorm); the LLM layers (after the features are merged into the text embeddings), linear- and
# full-attention alike, each with its own attention mask. Packed images carry no padding (attention runs per
# image through cu_seqlens), so no call needs splitting to keep padded rows out of the statistics.
_CALIBRATION = Calibration(
    stages=(CaptureStage("model.vision_tower.encoder.layers.0", per_vision_call=True), CaptureStage("model.merger"),
            CaptureStage("model.language_model.layers.0")),
    forward=forward, capturing=per_size_runs, open_encoder=CalibrationEncoder)

# Paddable MLPs: the encoder's fc1 -> fc2 (GELU between, like 2.6-4.5's SigLIP) and the LLM's. The encoder's width,
# vision_config.intermediate_size, also sizes the vit_merger's MLP (transformers' `window_intermediate_size`, vLLM's
# `inter_4x`: 4x it), so that MLP (linear_1 -> GELU -> linear_2, as exact to pad) grows with the encoder's. The
# merger's MLP is sized by hidden widths: never padded.
FAMILY = Family(name="minicpmv4_6", config_class=MiniCPMV4_6Config, model_class=MiniCPMV4_6ForConditionalGeneration,
                components=tuple(family_components("minicpmv4_6")), blocks=_blocks,
                embedding="model.language_model.embed_tokens.weight", lm_head="lm_head", describe=_describe,
                paddable_mlps={"vision": PaddableMlp("mlp.fc2", ("mlp.fc1",), ("vision_config", "intermediate_size")),
                               "vit_merger": PaddableMlp("linear_2", ("linear_1",), None, derived_from="vision"),
                               "llm": PaddableMlp("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"),
                                                  ("text_config", "intermediate_size"))},
                smoothing_pairs=_SMOOTHING_PAIRS,
                token_mixing={"vision": ("self_attn",), "vit_merger": ("self_attn",), "merger": (),
                              "llm": ("self_attn", "linear_attn")},
                norm_offset=norm_offset, calibration=_CALIBRATION, serve=ServedMiniCPMV4_6,
                vllm_inputs=MiniCPMV4_6VllmInputs, load_code=_LOAD,
                write_tiny=write_tiny, gguf=GGUF_LAYOUT, chat=chat,
                # vLLM's 4.6 renames its modules (model.language_model. → language_model.model.,
                # model.vision_tower. → vpm., the vit_merger at the top): quantization_config names every module,
                # and vLLM maps those names to its own.
                plain_quantization_names=True, graphs=build_program, programs=PROGRAMS)
