"""`tiny:4.6`: a tiny random MiniCPM-V 4.6 in the official layout, written by transformers' own classes.

The config is `MiniCPMV4_6Config`, the weights are `MiniCPMV4_6ForConditionalGeneration`'s initialization under
the seed, saved by `save_pretrained` (bf16 safetensors, the tied `lm_head` not stored), so the layout is by
construction the one transformers loads. Widths are tiny but keep what matters to quantization and export: the
vision MLP width is 16 mod 32 like 4304 (and the `vit_merger`'s 4x wider one is 64 mod 128 like 17216),
`insert_layer_id` lies inside the vision layers (layers before and after the `vit_merger` both exist), and the LLM
has both layer kinds (transformers' default pattern: full attention every 4th layer, so 4 layers are 3
linear-attention + 1 full). `tiny:4.6-outliers` gives 2 channels of every norm that feeds Linears a 20-50x gain
(`mcq.models.tiny.add_outliers`), as `tiny:4.5-outliers` does.

`real_widths` keeps the release's widths (`REAL_TEXT`, `REAL_VISION`) with few layers, the shape the benchmarks use;
`real_vocab` gives the embedding table (and the tied `lm_head`) the release's 248,094 rows, the small tokenizer's ids
being the first of them. Real widths are initialized unit by unit in bf16 (`mcq.models.tiny_blocks`: a layer, the
vit_merger, the merger, each table) and written tensor by tensor into the one `model.safetensors` that
`save_pretrained` writes, so the full 1.3B model (24 + 27 layers, 2.6 GB) is written holding one unit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoTokenizer, MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration, PreTrainedModel
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

# The release's widths: openbmb/MiniCPM-V-4.6's config.json as NVIDIA/TensorRT-LLM copies it ("a faithful, minimal
# config.json for openbmb/MiniCPM-V-4.6": tests/unittest/_torch/modeling/test_modeling_minicpmv4_6.py, commit
# 57b55f72). Blaizzy/mlx-vlm's defaults agree where it has them (mlx_vlm/models/minicpmv4_6/config.py: the vision
# widths, the linear-attention heads, rope). The text widths are Qwen3.5-0.8B's (its config.json as public mirrors
# copy it); the 4.6 release differs from it in the vocabulary (248,094 rows, not 248,320) and in rope (plain
# partial rope, not Qwen3.5's interleaved multimodal rope).
REAL_TEXT = {"hidden_size": 1024, "intermediate_size": 3584, "num_attention_heads": 8, "num_key_value_heads": 2,
             "head_dim": 256, "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
             "linear_num_value_heads": 16, "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-06,
             "max_position_embeddings": 262144,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25}}
REAL_VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "image_size": 980,
               "patch_size": 14, "layer_norm_eps": 1e-06}
REAL_VOCAB_SIZE = 248094
REAL_INSERT_LAYER_ID = 6

# The norms that feed Linears (`add_outliers`): the encoder's and the vit_merger's layer_norm1/2, the mergers'
# pre_norm before their MLPs, the LLM's input and post-attention RMSNorms (which scale by 1 + weight).
OUTLIER_NORMS = ("input_layernorm", "post_attention_layernorm", "layer_norm1", "layer_norm2", "pre_norm")

# tokenizer_config.json entries that differ from the resampler family's tiny tokenizer: transformers' own tokenizer
# class (no remote code), the named tokens the processor reads, Qwen3.5's context length.
_TOKENIZER_CONFIG = {"tokenizer_class": "Qwen2Tokenizer", "auto_map": None, "extra_special_tokens": PROCESSOR_TOKENS,
                     "model_max_length": 262144}


def tiny_config(tokenizer, llm_layers: int, vision_layers: int, real_widths: bool = False,
                real_vocab: bool = False) -> MiniCPMV4_6Config:
    ids = {"bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"), "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    vocab = {"vocab_size": REAL_VOCAB_SIZE if real_vocab else len(tokenizer)}
    if real_widths:
        text, vision = dict(REAL_TEXT), dict(REAL_VISION)
    else:
        # 16 value heads, as the release has: vLLM fuses in_proj_b and in_proj_a (one row per value head each) into
        # one Linear, which vLLM's CPU int4 kernel holds only 32 rows wide. Two value heads per key head, to exercise
        # the repeat of key heads (the release has one).
        text = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 64, "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_num_key_heads": 8,
                "linear_num_value_heads": 16}
        # 464 = 16 x 29: like 4304 = 16 x 269, no group size of 32 or more divides it.
        vision = {"hidden_size": 128, "intermediate_size": 464, "num_attention_heads": 2, "image_size": 980,
                  "patch_size": 14}
    text = {"model_type": "qwen3_5_text", **vocab, **text, "num_hidden_layers": llm_layers, "tie_word_embeddings": True,
            **ids}
    vision = {**vision, "num_hidden_layers": vision_layers}
    return MiniCPMV4_6Config(text_config=text, vision_config=vision,
                             insert_layer_id=_insert_layer_id(real_widths, vision_layers),
                             image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.video_token_id,
                             tie_word_embeddings=True, dtype="bfloat16", **ids)


def _insert_layer_id(real_widths: bool, vision_layers: int) -> int:
    """The release's 6 at real widths when vision layers follow it, else the tiny model's 1."""
    return REAL_INSERT_LAYER_ID if real_widths and vision_layers > REAL_INSERT_LAYER_ID + 1 else INSERT_LAYER_ID


def write_tiny(staging: Path, spec: TinySpec) -> None:
    """Write the checkpoint `spec` asks for into `staging` (an empty directory)."""
    llm_layers, vision_layers = spec.llm_layers or LLM_LAYERS, spec.vision_layers or VISION_LAYERS
    if vision_layers <= INSERT_LAYER_ID:
        raise McqError(f"MiniCPM-V {RELEASE} needs more than {INSERT_LAYER_ID} vision layers: its vit_merger runs "
                       f"after layer {INSERT_LAYER_ID}")
    write_tiny_qwen_tokenizer(staging, RELEASE, _TOKENIZER_CONFIG)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    config = tiny_config(tokenizer, llm_layers, vision_layers, spec.real_widths, spec.real_vocab)
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    if _per_unit(spec):
        _write_by_unit(staging, config, spec, eos)
    else:
        _write_whole(staging, config, spec, eos)
    MiniCPMV4_6ImageProcessorPil().save_pretrained(staging)
    # The processor and its video processor with their class defaults. Written as data: transformers builds the
    # video processor only with torchvision, which mcq does not depend on (AutoProcessor needs it to load these).
    for name, entry in (("processor_config.json", {"processor_class": "MiniCPMV4_6Processor"}),
                        ("video_preprocessor_config.json", {"video_processor_type": "MiniCPMV4_6VideoProcessor"})):
        (staging / name).write_text(json.dumps(entry, indent=2) + "\n")


def _per_unit(spec: TinySpec) -> bool:
    """Real widths are written unit by unit (one function, so a test can run that writer at tiny widths)."""
    return spec.real_widths


def _write_whole(staging: Path, config: MiniCPMV4_6Config, spec: TinySpec, eos: list[int]) -> None:
    """Small widths: the whole model initialized at once under the spec's seed and saved by `save_pretrained`."""
    torch.manual_seed(spec.seed)
    model = MiniCPMV4_6ForConditionalGeneration(config)
    if spec.outliers:
        add_outliers(model, spec.seed, OUTLIER_NORMS, offset=norm_offset)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = eos
    # save_pretrained draws a progress bar per shard: noise in the output of the command that asked for tiny:4.6.
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(staging)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _write_by_unit(staging: Path, config: MiniCPMV4_6Config, spec: TinySpec, eos: list[int]) -> None:
    """Real widths: what `_write_whole` writes, each unit initialized in bf16 when the writer reaches its first
    tensor and released with its last, so memory holds one unit, not the model."""
    from ..shards import Shard, TensorEntry, write_shard
    from ..tiny_blocks import init_unit, init_units
    from ..weights import shell_model

    shell = shell_model(config)
    # save_pretrained stores a tied weight once, under the name it is tied to (lm_head under the embedding table).
    tied = set(shell.all_tied_weights_keys)
    entries = [TensorEntry(name, torch.bfloat16, tuple(tensor.shape))
               for name, tensor in shell.state_dict().items() if name not in tied]
    # One file, as save_pretrained writes any model under its 50 GB shard limit (the release itself: 2.6 GB).
    shard = Shard("model.safetensors", entries)
    units = init_units(shell)
    pending: dict[str, torch.Tensor] = {}

    def tensors():
        for entry in shard.layout():
            if entry.name not in pending:
                name, module = next((n, m) for n, m in units if entry.name.startswith(n + "."))
                outlier_seed = init_unit(module, name, spec.seed, _owner(shell, name)._init_weights, torch.bfloat16)
                if spec.outliers:
                    add_outliers(module, outlier_seed, OUTLIER_NORMS, offset=norm_offset)
                # Detached: the writer reads bytes through numpy, which refuses tensors that require grad.
                pending.update({f"{name}.{n}": p.detach() for n, p in module.named_parameters()})
                module.to("meta")
            yield entry.name, pending.pop(entry.name)

    write_shard(staging / "model.safetensors", shard, tensors())
    # What save_pretrained writes beside the weights: the config naming the model class, the generation config.
    shell.config.architectures = [type(shell).__name__]
    shell.config.save_pretrained(staging)
    shell.generation_config.eos_token_id = eos
    shell.generation_config.save_pretrained(staging)


def _owner(shell: nn.Module, name: str) -> PreTrainedModel:
    """The model whose `_init_weights` initializes the module `name`: the nearest enclosing PreTrainedModel, as
    transformers' `initialize_weights` dispatches (the language model's initializes its layers, the vision tower's
    its own, the composite model's the merger)."""
    owner, path = shell, ""
    for part in name.split("."):
        path = f"{path}.{part}" if path else part
        module = shell.get_submodule(path)
        if isinstance(module, PreTrainedModel):
            owner = module
    return owner
