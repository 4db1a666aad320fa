"""The resampler family's (2.6 / 4.0 / 4.5) tiny checkpoints (`mcq.models.tiny`), written in the exact official
on-disk layout: config.json, sharded bf16 safetensors + `model.safetensors.index.json`, a small BPE tokenizer with
every special token of the release, `preprocessor_config.json` and `generation_config.json`. Widths are small but
keep the properties that matter to quantization and export: the LLM and vision widths divide 128 while the vision
MLP width does not divide 32 (like 4304), the resampler has a real `kv_proj` (vision width != LLM width), and the
image processor is the official one (448 slices, 14-pixel patches, a 70 x 70 position table).

`outliers` scales a few input channels of every norm that feeds a Linear by 20-50x, the activation outliers that
make calibration-aware quantization (AWQ, GPTQ) beat round-to-nearest. `real_widths` keeps the true 4.5 widths with
few layers, the shape the performance benchmarks use; `real_vocab` gives the embedding table and `lm_head` the
official 151,748 rows (the small tokenizer's ids are the first rows; the rest are rows no token maps to, as the
official vocabularies have a few).

Weights are written shard by shard, tensor by tensor (`mcq.models.shards`). Small widths are initialized as one
model in memory (a few MB; the bytes every test was written against). Real widths are initialized one block at a
time (a decoder or encoder layer, the resampler, each table) from a seed derived from the spec's seed and the
block's name, and released once written, so the full 8.7B layout (36 + 27 layers, 17 GB) is written holding one
block.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mcq.errors import McqError

from ..tiny import add_outliers
from ..tiny_tokenizer import write_tiny_tokenizer
from .configuration import MiniCPMVConfig
from .image_processing import MiniCPMVImageProcessor
from .modeling import MiniCPMV
from .tokenization import load_tokenizer

if TYPE_CHECKING:
    from ..tiny import TinySpec

# The official 4.5 config.json's vocab_size (../shared/reference): the rows of its embedding table and lm_head.
REAL_VOCAB_SIZE = 151748

# Layers of a resampler-family tiny model unless the spec says otherwise.
_DEFAULT_LAYERS = 2

# The token config.json and generation_config.json name as bos_token_id, per version.
CONFIG_BOS = {"4.5": "<|endoftext|>", "2.6": "<|endoftext|>", "4.0": "<s>"}

# LLM fields per version, as the official config.json files spell them (tiny widths).
_LLM_FIELDS = {
    "4.5": {"head_dim": 64, "max_window_layers": 36, "use_sliding_window": False,
            "sliding_window": None, "attention_bias": False, "rope_theta": 1000000, "max_position_embeddings": 40960},
    "2.6": {"max_window_layers": 28, "use_sliding_window": False,
            "sliding_window": None, "rope_theta": 1000000.0, "max_position_embeddings": 32768},
    "4.0": {"head_dim": 64, "attention_bias": False, "mlp_bias": False,
            "rope_theta": 10000.0, "max_position_embeddings": 32768, "scale_emb": 12},
}


def tiny_config(spec: TinySpec, vocab_size: int, special_ids: dict[str, int]) -> dict:
    if spec.real_widths:
        llm = {"hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32, "num_key_value_heads": 8,
               "head_dim": 128}
        vision = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16}
    else:
        llm = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 2}
        # 464 = 16 x 29: like 4304 = 16 x 269, no group size of 32 or more divides it.
        vision = {"hidden_size": 128, "intermediate_size": 464, "num_attention_heads": 2}
    fields = dict(_LLM_FIELDS[spec.version])
    if spec.real_widths:
        fields.pop("head_dim", None)
        llm.setdefault("head_dim", 128)
    return {
        "version": float(spec.version),
        "architectures": ["MiniCPMV"],
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
            "AutoModel": "modeling_minicpmv.MiniCPMV",
            "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
        },
        "model_type": "minicpmv",
        **fields,
        **llm,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "num_hidden_layers": spec.llm_layers or _DEFAULT_LAYERS,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
        "bos_token_id": special_ids["bos"],
        "eos_token_id": special_ids["eos"],
        "batch_vision_input": True,
        "batch_3d_resampler": True,
        "drop_vision_last_layer": False,
        "image_size": 448,
        "patch_size": 14,
        "query_num": 64,
        "slice_config": {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"},
        "slice_mode": True,
        "vision_config": {**vision, "image_size": 980, "model_type": "siglip",
                          "num_hidden_layers": spec.vision_layers or _DEFAULT_LAYERS, "patch_size": 14},
    }


# The norms that feed Linears (`add_outliers`).
OUTLIER_NORMS = ("input_layernorm", "post_attention_layernorm", "layer_norm1", "layer_norm2", "ln_kv")


def _generation_config(special_ids: dict[str, int], version: str) -> dict:
    return {
        "bos_token_id": special_ids["bos"],
        "do_sample": True,
        "eos_token_id": [token for token in (special_ids["eos"], special_ids["pad"]) if token is not None],
        "pad_token_id": special_ids["pad"],
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        **({"chat_template_kwargs": {"enable_thinking": False}} if version == "4.5" else {}),
    }


def write_tiny(staging: Path, spec: TinySpec) -> None:
    """Write the checkpoint `spec` asks for into `staging` (an empty directory)."""
    if spec.real_vocab and spec.version != "4.5":
        raise McqError(f"--real-vocab is the 4.5 vocabulary ({REAL_VOCAB_SIZE} rows); version {spec.version} has "
                       "another")
    write_tiny_tokenizer(staging, spec.version)
    tokenizer = load_tokenizer(staging, spec.version)
    # config.json's bos_token_id is the LLM's own BOS, not the tokenizer's bos_token: the official 4.5 and 2.6
    # configs name Qwen's <|endoftext|> while their tokenizer_config.json says <|im_start|>.
    special_ids = {"bos": tokenizer.convert_tokens_to_ids(CONFIG_BOS[spec.version]),
                   "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    vocab_size = REAL_VOCAB_SIZE if spec.real_vocab else len(tokenizer)
    config = MiniCPMVConfig(**tiny_config(spec, vocab_size, special_ids))
    _write_weights(staging, config, spec)
    config.save_pretrained(staging)
    (staging / "generation_config.json").write_text(
        json.dumps(_generation_config(special_ids, spec.version), indent=2) + "\n")
    MiniCPMVImageProcessor(version=float(spec.version)).save_pretrained(staging)


def _write_weights(staging: Path, config: MiniCPMVConfig, spec: TinySpec) -> None:
    """The bf16 shards and their index, in the layout `save_pretrained` writes (official tensor names; shards of a
    third of the weights, so that even the tiny model is sharded with an index, like the official release)."""
    from . import checkpoint_names
    from ..shards import TensorEntry, plan_shards, write_index, write_shard
    from ..weights import shell_model

    shell = shell_model(config)
    shapes = checkpoint_names.to_stored(shell.state_dict())
    entries = [TensorEntry(name, torch.bfloat16, tuple(tensor.shape)) for name, tensor in shapes.items()]
    shards = plan_shards(entries, max(sum(e.nbytes for e in entries) // 3, 1 << 16))
    tensors = _block_tensors(shell, spec) if _per_block(spec) else _model_tensors(config, spec)
    for shard in shards:
        write_shard(staging / shard.file, shard, ((e.name, tensors(e.name)) for e in shard.layout()))
    if len(shards) > 1:
        write_index(staging / "model.safetensors.index.json", shards, shell.num_parameters())


def _per_block(spec: TinySpec) -> bool:
    return spec.real_widths


def _model_tensors(config: MiniCPMVConfig, spec: TinySpec):
    """Small widths: the whole model initialized at once under the spec's seed (transformers' init order)."""
    from . import checkpoint_names

    torch.manual_seed(spec.seed)
    model = MiniCPMV(config)
    if spec.outliers:
        add_outliers(model, spec.seed, OUTLIER_NORMS)
    stored = checkpoint_names.to_stored(model.to(torch.bfloat16).state_dict())
    return stored.pop


def _block_tensors(shell: MiniCPMV, spec: TinySpec):
    """Real widths: each block initialized when its first tensor is written, released with its last one."""
    from . import checkpoint_names
    from ..tiny_blocks import init_units

    units = init_units(shell)
    pending: dict[str, torch.Tensor] = {}

    def tensor(stored: str) -> torch.Tensor:
        if stored not in pending:
            param = checkpoint_names.params_of(stored)[0]
            name, module = next((n, m) for n, m in units if param.startswith(n + "."))
            pending.update(_init_unit(shell, name, module, spec))
        return pending.pop(stored)
    return tensor


@torch.no_grad()
def _init_unit(shell: MiniCPMV, name: str, module: nn.Module, spec: TinySpec) -> dict[str, torch.Tensor]:
    """One unit's stored tensors (bf16), initialized by the init of the model that owns it, then released from the
    shell."""
    from . import checkpoint_names
    from ..tiny_blocks import init_unit

    owner = shell.llm if name.startswith("llm.") else shell
    outlier_seed = init_unit(module, name, spec.seed, owner._init_weights)
    if spec.outliers:
        add_outliers(module, outlier_seed, OUTLIER_NORMS)
    stored = checkpoint_names.to_stored({f"{name}.{n}": p.to(torch.bfloat16) for n, p in module.named_parameters()})
    module.to("meta")
    return stored
