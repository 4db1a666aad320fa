"""`tiny:4.6`: a tiny random MiniCPM-V 4.6 in the official layout, written by transformers' own classes.

The config is `MiniCPMV4_6Config`, the weights are `MiniCPMV4_6ForConditionalGeneration`'s initialization under
the seed, saved by `save_pretrained` (bf16 safetensors, the tied `lm_head` not stored), so the layout is by
construction the one transformers loads. Widths are tiny but keep what matters to quantization and export: the
vision MLP width is 16 mod 32 like 4304 (and the `vit_merger`'s 4x wider one is 64 mod 128 like 17216),
`insert_layer_id` lies inside the vision layers (layers before and after the `vit_merger` both exist), and the LLM
has both layer kinds (transformers' default pattern: full attention every 4th layer, so 4 layers are 3
linear-attention + 1 full). `tiny:4.6-outliers` gives 2 channels of every norm that feeds Linears a 20-50x gain
(`mcq.models.tiny.add_outliers`), as `tiny:4.5-outliers` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoTokenizer, MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
from transformers.utils import logging as hf_logging

from mcq.errors import McqError

from ..tiny import add_outliers
from ..tiny_tokenizer import write_tiny_qwen_tokenizer
from .calibration import norm_offset
from .facts import PROCESSOR_TOKENS, RELEASE

if TYPE_CHECKING:
    from ..tiny import TinySpec

LLM_LAYERS = 4
VISION_LAYERS = 3
# The vit_merger runs after this vision layer (the release: 6 of 27); 1 leaves one layer before it, one after.
INSERT_LAYER_ID = 1

# The norms that feed Linears (`add_outliers`): the encoder's and the vit_merger's layer_norm1/2, the mergers'
# pre_norm before their MLPs, the LLM's input and post-attention RMSNorms (which scale by 1 + weight).
OUTLIER_NORMS = ("input_layernorm", "post_attention_layernorm", "layer_norm1", "layer_norm2", "pre_norm")

# tokenizer_config.json entries that differ from the resampler family's tiny tokenizer: transformers' own tokenizer
# class (no remote code), the named tokens the processor reads, Qwen3.5's context length.
_TOKENIZER_CONFIG = {"tokenizer_class": "Qwen2Tokenizer", "auto_map": None, "extra_special_tokens": PROCESSOR_TOKENS,
                     "model_max_length": 262144}


def tiny_config(tokenizer, llm_layers: int, vision_layers: int) -> MiniCPMV4_6Config:
    ids = {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"), "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    # 16 value heads, as the release has: vLLM fuses in_proj_b and in_proj_a (one row per value head each) into one
    # Linear, which vLLM's CPU int4 kernel holds only 32 rows wide. Two value heads per key head, to exercise the
    # repeat of key heads (the release has one).
    text = {"model_type": "qwen3_5_text", "vocab_size": len(tokenizer), "hidden_size": 256, "intermediate_size": 768,
            "num_hidden_layers": llm_layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
            "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_num_key_heads": 8,
            "linear_num_value_heads": 16, "tie_word_embeddings": True, **ids}
    # 464 = 16 x 29: like 4304 = 16 x 269, no group size of 32 or more divides it.
    vision = {"hidden_size": 128, "intermediate_size": 464, "num_hidden_layers": vision_layers,
              "num_attention_heads": 2, "image_size": 980, "patch_size": 14}
    return MiniCPMV4_6Config(text_config=text, vision_config=vision, insert_layer_id=INSERT_LAYER_ID,
                             image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.video_token_id,
                             tie_word_embeddings=True, dtype="bfloat16", **ids)


def write_tiny(staging: Path, spec: TinySpec) -> None:
    """Write the checkpoint `spec` asks for into `staging` (an empty directory)."""
    unsupported = [flag for flag, on in (("--real-widths", spec.real_widths), ("--real-vocab", spec.real_vocab)) if on]
    if unsupported:
        raise McqError(f"{unsupported[0]} is not available for a tiny MiniCPM-V {RELEASE} yet")
    llm_layers, vision_layers = spec.llm_layers or LLM_LAYERS, spec.vision_layers or VISION_LAYERS
    if vision_layers <= INSERT_LAYER_ID:
        raise McqError(f"MiniCPM-V {RELEASE} needs more than {INSERT_LAYER_ID} vision layers: its vit_merger runs "
                       f"after layer {INSERT_LAYER_ID}")
    write_tiny_qwen_tokenizer(staging, RELEASE, _TOKENIZER_CONFIG)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    config = tiny_config(tokenizer, llm_layers, vision_layers)
    torch.manual_seed(spec.seed)
    model = MiniCPMV4_6ForConditionalGeneration(config)
    if spec.outliers:
        add_outliers(model, spec.seed, OUTLIER_NORMS, offset=norm_offset)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    # save_pretrained draws a progress bar per shard: noise in the output of the command that asked for tiny:4.6.
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(staging)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    MiniCPMV4_6ImageProcessorPil().save_pretrained(staging)
    # The processor and its video processor with their class defaults. Written as data: transformers builds the
    # video processor only with torchvision, which mcq does not depend on (AutoProcessor needs it to load these).
    for name, entry in (("processor_config.json", {"processor_class": "MiniCPMV4_6Processor"}),
                        ("video_preprocessor_config.json", {"video_processor_type": "MiniCPMV4_6VideoProcessor"})):
        (staging / name).write_text(json.dumps(entry, indent=2) + "\n")
