"""MiniCPM-V 4.6's GGUF layout (`mcq.models.ggufspec.GgufLayout`): the LLM file as llama.cpp's `qwen35`
architecture, the mmproj file with projector `minicpmv4_6` (SigLIP2 layers, the window-attention vit_merger, the
downsampling merger).

Facts from llama.cpp's own converter and loader (convert_hf_to_gguf.py `MiniCPMV4_6*` and the Qwen3.5 classes it
derives from, src/models/qwen35.cpp, tools/mtmd/clip.cpp), written here without its code:
- Qwen3.5's RMSNorms compute x̂ · (1 + w); llama.cpp's compute x̂ · w, so those weights are stored + 1 (not the
  linear attention's gated norm, which already scales by w).
- The linear attention's decay A is stored as -exp(A_log), `dt_bias` as `ssm_dt.bias`, the depthwise conv kernel
  without its singleton axis (and float32, as llama.cpp keeps every conv kernel).
- With fewer key heads than value heads, ggml broadcasts key heads tiled (k0 k1 .. k0 k1 ..), while the checkpoint
  groups the value heads of one key head together: every value-head axis (the v rows of in_proj_qkv, in_proj_z,
  in_proj_a/b, A_log, dt_bias, the conv's v channels, out_proj's inputs) is reordered from grouped to tiled.
- Tied embeddings: only `token_embd` is written; llama.cpp reuses it as the output head.
- Every converted parameter is cast to float32 before these transforms, so they are computed in float32 here too.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mcq.errors import McqError

from ..ggufspec import GgufLayout, GgufTensor, Metadata
from .calibration import image_blocks

ARCH = "qwen35"
PROJECTOR = "minicpmv4_6"
LLM = "model.language_model."
# llama.cpp's loader requires rope sections; Qwen3.5's default when rope_parameters has none.
DEFAULT_MROPE_SECTION = [11, 11, 10, 0]
# downsample_mode → the merger's token reduction per side (clip.vision.projector.scale_factor)
SCALE_FACTORS = {"16x": 4, "4x": 2}


def check_exportable(config) -> None:
    text = config.text_config
    rope = text.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise McqError(f"rope type {rope['rope_type']!r} is not supported by mcq's GGUF export of MiniCPM-V 4.6")
    if config.downsample_mode not in SCALE_FACTORS:
        raise McqError(f"downsample_mode {config.downsample_mode!r}: llama.cpp's MiniCPM-V 4.6 projector has "
                       f"{', '.join(SCALE_FACTORS)}")
    if config.merger_times != 1:
        raise McqError(f"merger_times {config.merger_times}: llama.cpp's MiniCPM-V 4.6 projector has one merger MLP")
    if text.linear_num_value_heads % text.linear_num_key_heads:
        raise McqError(f"linear attention with {text.linear_num_value_heads} value heads over "
                       f"{text.linear_num_key_heads} key heads: llama.cpp needs a whole number per key head")


def llm_arch(_config) -> str:
    return ARCH


def llm_metadata(config) -> Metadata:
    text = config.text_config
    rope = text.rope_parameters or {}
    sections = list(rope.get("mrope_section") or DEFAULT_MROPE_SECTION)
    return {
        f"{ARCH}.block_count": ("u32", text.num_hidden_layers),
        f"{ARCH}.context_length": ("u32", text.max_position_embeddings),
        f"{ARCH}.embedding_length": ("u32", text.hidden_size),
        f"{ARCH}.feed_forward_length": ("u32", text.intermediate_size),
        f"{ARCH}.attention.head_count": ("u32", text.num_attention_heads),
        f"{ARCH}.attention.head_count_kv": ("u32", text.num_key_value_heads),
        f"{ARCH}.rope.freq_base": ("f32", float(rope.get("rope_theta", 10000.0))),
        f"{ARCH}.attention.layer_norm_rms_epsilon": ("f32", float(text.rms_norm_eps)),
        f"{ARCH}.attention.key_length": ("u32", text.head_dim),
        f"{ARCH}.attention.value_length": ("u32", text.head_dim),
        f"{ARCH}.ssm.conv_kernel": ("u32", text.linear_conv_kernel_dim),
        f"{ARCH}.ssm.state_size": ("u32", text.linear_key_head_dim),
        f"{ARCH}.ssm.group_count": ("u32", text.linear_num_key_heads),
        f"{ARCH}.ssm.time_step_rank": ("u32", text.linear_num_value_heads),
        f"{ARCH}.ssm.inner_size": ("u32", text.linear_value_head_dim * text.linear_num_value_heads),
        f"{ARCH}.attention.recurrent_layers": ("bools", [kind == "linear_attention" for kind in text.layer_types]),
        f"{ARCH}.full_attention_interval": ("u32", getattr(text, "full_attention_interval", None) or 4),
        f"{ARCH}.rope.dimension_count": ("u32", int(text.head_dim * rope.get("partial_rotary_factor", 0.25))),
        f"{ARCH}.rope.dimension_sections": ("i32s", (sections + [0] * 4)[:4]),
    }


def tiled_value_heads(values: torch.Tensor, dim: int, key_heads: int, head_width: int) -> torch.Tensor:
    """Reorder the value heads along `dim` from grouped by key head (g0v0 g0v1 .. g1v0 ..) to tiled (g0v0 g1v0 ..
    g0v1 g1v1 ..); `head_width` entries per value head along that axis."""
    shape = list(values.shape)
    per_key = shape[dim] // key_heads // head_width
    grouped = values.reshape(*shape[:dim], key_heads, per_key, head_width, *shape[dim + 1:])
    return grouped.transpose(dim, dim + 1).reshape(shape)


def _tiled_tail(values: torch.Tensor, skip: int, key_heads: int, head_width: int) -> torch.Tensor:
    """Rows after the first `skip` (the q and k parts of in_proj_qkv / the conv's channels) tiled as above."""
    return torch.cat([values[:skip], tiled_value_heads(values[skip:], 0, key_heads, head_width)])


def llm_tensors(config, params: list[str]) -> list[GgufTensor]:
    import gguf

    text = config.text_config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN35, text.num_hidden_layers)
    hidden, ff = text.hidden_size, text.intermediate_size
    heads, kv_heads, head_dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    key_heads, value_heads = text.linear_num_key_heads, text.linear_num_value_heads
    key_width, value_width = text.linear_key_head_dim, text.linear_value_head_dim
    qk = 2 * key_heads * key_width
    qkv = qk + value_heads * value_width
    regrouped = key_heads != value_heads

    def tiled(head_width: int, skip: int = 0):
        """Rows after `skip` reordered to tiled value heads (nothing to do when every key head has one)."""
        if not regrouped:
            return lambda values: values
        return partial(_tiled_tail, skip=skip, key_heads=key_heads, head_width=head_width)

    def plus_one(weight: torch.Tensor) -> torch.Tensor:
        return weight + 1

    # out_proj's inputs are value-head channels: its columns are reordered, and its importance matrix with them.
    out_order = tuple(tiled_value_heads(torch.arange(value_heads * value_width), 0, key_heads, value_width).tolist())
    input_orders = {"linear_attn.out_proj.weight": out_order} if regrouped else {}
    # The stored conv kernel is [channels, 1, kernel] (depthwise); its v channels are value heads too.
    conv_kernel = (qkv, text.linear_conv_kernel_dim)
    linear = {
        "linear_attn.in_proj_qkv.weight": ((qkv, hidden), tiled(value_width, qk)),
        "linear_attn.in_proj_z.weight": ((value_heads * value_width, hidden), tiled(value_width)),
        "linear_attn.in_proj_b.weight": ((value_heads, hidden), tiled(1)),
        "linear_attn.in_proj_a.weight": ((value_heads, hidden), tiled(1)),
        "linear_attn.A_log": ((value_heads,), lambda a_log: -torch.exp(tiled(1)(a_log))),
        "linear_attn.dt_bias": ((value_heads,), tiled(1)),
        "linear_attn.conv1d.weight": (conv_kernel, lambda w: tiled(value_width, qk)(w.squeeze(1))),
        "linear_attn.norm.weight": ((value_width,), None),
        "linear_attn.out_proj.weight": ((hidden, value_heads * value_width),
                                        (lambda w: w[:, list(out_order)]) if regrouped else None),
    }
    full = {
        # q_proj holds each head's query and its output gate
        "self_attn.q_proj.weight": ((2 * heads * head_dim, hidden), None),
        "self_attn.k_proj.weight": ((kv_heads * head_dim, hidden), None),
        "self_attn.v_proj.weight": ((kv_heads * head_dim, hidden), None),
        "self_attn.o_proj.weight": ((hidden, heads * head_dim), None),
        "self_attn.q_norm.weight": ((head_dim,), plus_one),
        "self_attn.k_norm.weight": ((head_dim,), plus_one),
    }
    common = {
        "input_layernorm.weight": ((hidden,), plus_one),
        "post_attention_layernorm.weight": ((hidden,), plus_one),
        "mlp.gate_proj.weight": ((ff, hidden), None),
        "mlp.up_proj.weight": ((ff, hidden), None),
        "mlp.down_proj.weight": ((hidden, ff), None),
    }
    # gguf-py's names for the text model's parameters as llama.cpp's converter spells them
    spelled = {"linear_attn.dt_bias": "linear_attn.dt_proj.bias"}

    def entry(param: str, shape: tuple[int, ...], transform, input_order=None) -> GgufTensor:
        hf = "model." + param.removeprefix(LLM)
        for ours, theirs in spelled.items():
            hf = hf.replace(ours, theirs)
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise McqError(f"gguf-py has no {ARCH} name for {param}")
        conv = param.endswith("conv1d.weight")
        return GgufTensor(name, param, shape, quantizable=len(shape) == 2 and not conv, transform=transform,
                          float32=conv, input_order=input_order)

    tensors = [entry(f"{LLM}embed_tokens.weight", (text.vocab_size, hidden), None)]
    for i, kind in enumerate(text.layer_types):
        mixer = linear if kind == "linear_attention" else full
        tensors += [entry(f"{LLM}layers.{i}.{name}", shape, transform, input_orders.get(name))
                    for name, (shape, transform) in (mixer | common).items()]
    tensors.append(entry(f"{LLM}norm.weight", (hidden,), plus_one))
    if not text.tie_word_embeddings:
        tensors.append(GgufTensor("output.weight", "lm_head.weight", (text.vocab_size, hidden), True))
    return tensors


def _preprocessor(path: Path) -> dict:
    file = path / "preprocessor_config.json"
    if not file.is_file():
        raise McqError(f"{path} has no preprocessor_config.json; the mmproj's image size and normalization are "
                       "read from it")
    return json.loads(file.read_text())


def mmproj_metadata(config, params: list[str], path: Path) -> Metadata:
    vision, processor = config.vision_config, _preprocessor(path)
    return {
        "clip.has_vision_encoder": ("bool", True),
        "clip.vision.projection_dim": ("u32", config.text_config.hidden_size),
        # The slice resolution (448), not the position grid of the tower (980 = 70 patches).
        "clip.vision.image_size": ("u32", int(processor.get("scale_resolution", vision.image_size))),
        "clip.vision.patch_size": ("u32", vision.patch_size),
        "clip.vision.embedding_length": ("u32", vision.hidden_size),
        "clip.vision.feed_forward_length": ("u32", vision.intermediate_size),
        "clip.vision.block_count": ("u32", vision.num_hidden_layers),
        "clip.vision.attention.head_count": ("u32", vision.num_attention_heads),
        "clip.vision.image_mean": ("f32s", [float(x) for x in processor["image_mean"]]),
        "clip.vision.image_std": ("f32s", [float(x) for x in processor["image_std"]]),
        "clip.projector_type": ("str", PROJECTOR),
        "clip.vision.projector.scale_factor": ("u32", SCALE_FACTORS[config.downsample_mode]),
        # the vit_merger's place: after this encoder layer
        "clip.vision.wa_layer_indexes": ("i32s", [config.insert_layer_id]),
        # gelu_pytorch_tanh is ggml's gelu
        "clip.use_gelu": ("bool", True),
        "clip.vision.attention.layer_norm_epsilon": ("f32", float(vision.layer_norm_eps)),
    }


def mmproj_tensors(config, params: list[str]) -> list[GgufTensor]:
    vision = config.vision_config
    width, ff, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    grid = vision.image_size // patch
    tower = "model.vision_tower."
    tensors = [
        GgufTensor("v.patch_embd.weight", f"{tower}embeddings.patch_embedding.weight", (width, 3, patch, patch),
                   False),
        GgufTensor("v.patch_embd.bias", f"{tower}embeddings.patch_embedding.bias", (width,), False),
        GgufTensor("v.position_embd.weight", f"{tower}embeddings.position_embedding.weight", (grid * grid, width),
                   False, float32=True),
    ]

    def linear(name: str, source: str, rows: int, cols: int) -> list[GgufTensor]:
        return [GgufTensor(f"{name}.weight", f"{source}.weight", (rows, cols), True),
                GgufTensor(f"{name}.bias", f"{source}.bias", (rows,), False)]

    def norm(name: str, source: str, size: int) -> list[GgufTensor]:
        return [GgufTensor(f"{name}.{part}", f"{source}.{part}", (size,), False) for part in ("weight", "bias")]

    def attention(name: str, source: str) -> list[GgufTensor]:
        return [t for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                                       ("attn_out", "out_proj"))
                for t in linear(f"{name}.{ours}", f"{source}.self_attn.{theirs}", width, width)]

    for i in range(vision.num_hidden_layers):
        layer, prefix = f"{tower}encoder.layers.{i}", f"v.blk.{i}"
        tensors += (attention(prefix, layer) + linear(f"{prefix}.ffn_up", f"{layer}.mlp.fc1", ff, width)
                    + linear(f"{prefix}.ffn_down", f"{layer}.mlp.fc2", width, ff)
                    + norm(f"{prefix}.ln1", f"{layer}.layer_norm1", width)
                    + norm(f"{prefix}.ln2", f"{layer}.layer_norm2", width))
    tensors += norm("v.post_ln", f"{tower}post_layernorm", width)
    if config.downsample_mode == "16x":
        # The window-attention merger runs in 16x mode only (llama.cpp leaves it out of a 4x mmproj).
        window = int(np.prod(vision.window_kernel_size))
        merger = f"{tower}vit_merger"
        tensors += (norm("v.vit_merger.ln1", f"{merger}.layer_norm1", width) + attention("v.vit_merger", merger)
                    + norm("v.vit_merger.ds_ln", f"{merger}.pre_norm", window * width)
                    + linear("v.vit_merger.ds_ffn_up", f"{merger}.linear_1", window * ff, window * width)
                    + linear("v.vit_merger.ds_ffn_down", f"{merger}.linear_2", width, window * ff))
    merge = int(np.prod(config.merge_kernel_size)) * width
    out = config.text_config.hidden_size
    tensors += (norm("mm.input_norm", "model.merger.mlp.0.pre_norm", merge)
                + linear("mm.up", "model.merger.mlp.0.linear_1", merge, merge)
                + linear("mm.down", "model.merger.mlp.0.linear_2", out, merge))
    return tensors


def _tokenizer(path: Path, _config):
    # transformers' own Qwen2 tokenizer class, named by tokenizer_config.json (no remote code)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


LAYOUT = GgufLayout(check=check_exportable, llm_arch=llm_arch, llm_metadata=llm_metadata, llm_tensors=llm_tensors,
                    mmproj_metadata=mmproj_metadata, mmproj_tensors=mmproj_tensors,
                    mmproj_description="vision tower, vit_merger and merger", tokenizer=_tokenizer,
                    projector=PROJECTOR, image_blocks=image_blocks)
