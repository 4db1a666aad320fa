"""`MiniCPMVConfig`: reads the official `config.json` of MiniCPM-V 2.6, 4.0 and 4.5 unchanged.

The official files put every LLM field (hidden_size, num_hidden_layers, rope_theta, ...) at the top level next to
the MiniCPM-V fields, and nest only the SigLIP vision config. We keep exactly that shape: the MiniCPM-V fields are
declared here, the LLM fields stay as plain attributes (so `save_pretrained` writes them back where they were), and
`versions.py` builds the transformers LLM config (Qwen3 / Qwen2 / Llama) from them.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig, SiglipVisionConfig

# Fields that belong to MiniCPM-V itself (or to transformers' bookkeeping), never to the LLM config.
MINICPMV_FIELDS = frozenset(
    {
        "version",
        "query_num",
        "image_size",
        "patch_size",
        "slice_mode",
        "slice_config",
        "vision_config",
        "drop_vision_last_layer",
        "batch_vision_input",
        "batch_3d_resampler",
        "use_image_id",
        "vision_batch_size",
        "auto_map",
        "architectures",
        "model_type",
        "transformers_version",
        "_name_or_path",
        "quantization_config",
    }
)

# The official `configuration_minicpm.py` defaults for fields a config.json may leave out.
DEFAULT_SLICE_CONFIG = {"max_slice_nums": 9, "patch_size": 14, "scale_resolution": 448, "model_type": "minicpmv"}


class MiniCPMVConfig(PreTrainedConfig):
    model_type = "minicpmv"
    sub_configs = {"vision_config": SiglipVisionConfig}

    version: float | str | None = None
    query_num: int = 64
    image_size: int = 448
    patch_size: int = 14
    slice_mode: bool = True
    slice_config: dict | None = None
    vision_config: dict | SiglipVisionConfig | None = None
    # The official class default is True; the released 4.5 config says false explicitly (keep all 27 layers).
    drop_vision_last_layer: bool = True
    batch_vision_input: bool = True
    batch_3d_resampler: bool = True
    use_image_id: bool = True
    vision_batch_size: int = 16

    def __post_init__(self, **kwargs: Any):
        if self.vision_config is None:
            self.vision_config = SiglipVisionConfig(
                hidden_size=1152, image_size=980, intermediate_size=4304, num_attention_heads=16,
                num_hidden_layers=27, patch_size=14,
            )
        elif isinstance(self.vision_config, dict):
            self.vision_config = SiglipVisionConfig(**self.vision_config)
        # An absent slice_config means "no slicing" in the official code (max_slice_nums 1).
        slice_config = {**DEFAULT_SLICE_CONFIG, "max_slice_nums": 1} if self.slice_config is None else self.slice_config
        self.slice_config = {**DEFAULT_SLICE_CONFIG, **slice_config}
        # The official config sets patch_size from the vision tower.
        self.patch_size = self.vision_config.patch_size
        # transformers standardizes a `rope_scaling` it finds here against this config's own RoPE fields, which a
        # MiniCPM-V config does not declare (they are the LLM's), and fails. It is the LLM's setting: kept as a
        # plain attribute, it reaches the LLM config through `llm_kwargs` (saved, transformers 5 writes it as
        # `rope_parameters`, which reads back the same way).
        rope_scaling = kwargs.pop("rope_scaling", None)
        super().__post_init__(**kwargs)
        if rope_scaling is not None:
            self.rope_scaling = rope_scaling

    @property
    def max_slice_nums(self) -> int:
        return int(self.slice_config["max_slice_nums"])

    @max_slice_nums.setter
    def max_slice_nums(self, value: int) -> None:
        # `from_pretrained(dir, max_slice_nums=N)` sets it (transformers passes processor keyword arguments on to
        # the config; vLLM's `--mm-processor-kwargs '{"max_slice_nums": N}'` does): it lives in slice_config.
        self.slice_config = {**self.slice_config, "max_slice_nums": int(value)}

    @property
    def scale_resolution(self) -> int:
        return int(self.slice_config.get("scale_resolution", 448))

    def llm_kwargs(self) -> dict[str, Any]:
        """The top-level fields that describe the LLM, as keyword arguments for its transformers config."""
        fields = self.to_dict()
        return {k: v for k, v in fields.items() if k not in MINICPMV_FIELDS}
