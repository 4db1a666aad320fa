"""MiniCPM-V 4.6 as mcq's tools see it (`mcq.models.familyspec.Family`): transformers' own classes, and its blocks in
the order data flows through them: vision layers up to `insert_layer_id`, the window-attention `vit_merger`, the
remaining vision layers, the downsampling `merger`, the LLM's decoder layers (linear- and full-attention alike)."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

from ..families import family_components
from ..familyspec import Family, PaddableMlp
from .facts import RELEASE
from .tiny import write_tiny


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
_LOAD = ("from transformers import AutoModelForImageTextToText, CompressedTensorsConfig\n"
         "model = AutoModelForImageTextToText.from_pretrained(\n"
         "    PATH, quantization_config=CompressedTensorsConfig(dequantize=True))")

# Only the LLM's MLP is paddable: the encoder's fc1 -> fc2 is exact to pad like SigLIP's, but its width,
# vision_config.intermediate_size, also sizes the vit_merger's MLP (4x it), so padding the encoder MLPs through
# config.json would change the vit_merger's shapes too. Without it, fallback_group goes per channel on the encoder's
# fc2 where no group a target runs divides its width, and `pad` is refused.
# calibrates=False: the block-by-block driver captures block inputs through the resampler family's forward only;
# 4.6's vision path (the vit_merger's windows and the shrinking target_sizes) is not wired into it yet, so there are
# no smoothing pairs or token-mixing modules to declare for AWQ either.
FAMILY = Family(name="minicpmv4_6", config_class=MiniCPMV4_6Config, model_class=MiniCPMV4_6ForConditionalGeneration,
                components=tuple(family_components("minicpmv4_6")), blocks=_blocks,
                embedding="model.language_model.embed_tokens.weight", lm_head="lm_head", describe=_describe,
                paddable_mlps={"llm": PaddableMlp("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"),
                                                  ("text_config", "intermediate_size"))},
                smoothing_pairs={}, token_mixing={},
                calibrates=False, load_code=_LOAD, write_tiny=write_tiny)
