"""The resampler releases' GGUF layout (`mcq.models.ggufspec.GgufLayout`): what llama.cpp expects of their two
files, per version: metadata keys and tensor names.

The LLM file is an ordinary text model of llama.cpp's architecture for the version's LLM (`VersionSpec.gguf_arch`:
`qwen3` for 4.5, `qwen2` for 2.6, `minicpm` for 4.0); its tensor names come from gguf-py's own name tables. The
mmproj file (`general.architecture = clip`, projector `resampler`) holds the SigLIP tower and the resampler under
the names clip.cpp looks up; gguf-py's mmproj table gets several of those wrong (`pos_embd_k`, a bare
`resampler.proj`, no `post_layernorm`), so they are spelled out here. Sources: shared/research/gguf_minicpmv.md
§2-3, checked against llama.cpp's loader (clip.cpp `load_tensors`, src/models/*.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcq.errors import McqError

from ..ggufspec import GgufLayout, GgufTensor, Metadata
from .versions import embedding_scale, version_spec


@dataclass(frozen=True)
class LlamaCppArch:
    """How llama.cpp runs one of its LLM architectures, where that differs from the transformers model."""

    # rope on interleaved pairs: HF's rotate-half q/k rows are permuted per head (`permute_for_rope`)
    interleaved_rope: bool = False
    # every input embedding, image ones included, times `{arch}.embedding_scale` (MiniCPM's muP scales, written
    # explicitly since llama.cpp's defaults are MiniCPM 2's)
    scales_embeddings: bool = False


LLAMA_CPP_ARCHS = {"qwen2": LlamaCppArch(), "qwen3": LlamaCppArch(),
                   "minicpm": LlamaCppArch(interleaved_rope=True, scales_embeddings=True)}
PROJECTOR = "resampler"


def check_exportable(config) -> None:
    """Refuse configs whose LLM llama.cpp would run differently from the model (one line, before any work)."""
    spec = version_spec(config.version)
    if spec.gguf_arch not in LLAMA_CPP_ARCHS:
        raise McqError(f"MiniCPM-V {spec.version}: mcq's GGUF export has no rules for llama.cpp's {spec.gguf_arch}")
    if getattr(config, "rope_scaling", None):
        raise McqError(f"rope_scaling {config.rope_scaling} is not supported by mcq's GGUF export yet")
    if getattr(config, "tie_word_embeddings", False):
        raise McqError("tied word embeddings are not supported by mcq's GGUF export")


# -- the LLM file ------------------------------------------------------------------------------------------------

def llm_arch(config) -> str:
    return version_spec(config.version).gguf_arch


def llm_metadata(config) -> Metadata:
    """The LLM's architecture keys (the tokenizer is written separately)."""
    arch = llm_arch(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keys: dict[str, tuple[str, object]] = {
        f"{arch}.context_length": ("u32", config.max_position_embeddings),
        f"{arch}.embedding_length": ("u32", config.hidden_size),
        f"{arch}.block_count": ("u32", config.num_hidden_layers),
        f"{arch}.feed_forward_length": ("u32", config.intermediate_size),
        f"{arch}.attention.head_count": ("u32", config.num_attention_heads),
        f"{arch}.attention.head_count_kv": ("u32", config.num_key_value_heads),
        # llama.cpp's default base is 10000; 4.5 and 2.6 use 1e6.
        f"{arch}.rope.freq_base": ("f32", float(config.rope_theta)),
        f"{arch}.attention.layer_norm_rms_epsilon": ("f32", float(config.rms_norm_eps)),
        f"{arch}.attention.key_length": ("u32", head_dim),
        f"{arch}.attention.value_length": ("u32", head_dim),
        f"{arch}.rope.dimension_count": ("u32", head_dim),
        f"{arch}.vocab_size": ("u32", config.vocab_size),
    }
    if LLAMA_CPP_ARCHS[arch].scales_embeddings:
        # The official 4.0 LLM is Llama with the text embeddings multiplied by scale_emb, nothing else: no residual
        # or logit scaling (llama.cpp's defaults for `minicpm` are MiniCPM 2's muP values, so write all three).
        keys[f"{arch}.embedding_scale"] = ("f32", embedding_scale(config))
        keys[f"{arch}.residual_scale"] = ("f32", 1.0)
        keys[f"{arch}.logit_scale"] = ("f32", 1.0)
    return keys


def llm_tensors(config, params: list[str]) -> list[GgufTensor]:
    import gguf

    spec = version_spec(config.version)
    arch = spec.gguf_arch
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    hidden, ff, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"embed_tokens.weight": (vocab, hidden), "norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
             "self_attn.q_proj.weight": (q_out, hidden), "self_attn.k_proj.weight": (kv_out, hidden),
             "self_attn.v_proj.weight": (kv_out, hidden), "self_attn.o_proj.weight": (hidden, q_out),
             "mlp.gate_proj.weight": (ff, hidden), "mlp.up_proj.weight": (ff, hidden),
             "mlp.down_proj.weight": (hidden, ff)}
    if spec.qkv_bias:
        layer |= {"self_attn.q_proj.bias": (q_out,), "self_attn.k_proj.bias": (kv_out,),
                  "self_attn.v_proj.bias": (kv_out,)}
    if spec.qk_norm:
        layer |= {"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)}

    def entry(hf: str, shape: tuple[int, ...]) -> GgufTensor:
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise McqError(f"gguf-py has no {arch} name for {hf}")
        transform = None
        if LLAMA_CPP_ARCHS[arch].interleaved_rope and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if hf.endswith("q_proj.weight") else config.num_key_value_heads
            transform = partial(permute_for_rope, heads=heads)
        return GgufTensor(name, f"llm.{hf}", shape, quantizable=len(shape) == 2, transform=transform)

    tensors = [entry("model.embed_tokens.weight", shapes["embed_tokens.weight"])]
    for i in range(config.num_hidden_layers):
        tensors += [entry(f"model.layers.{i}.{name}", shape) for name, shape in layer.items()]
    tensors += [entry("model.norm.weight", shapes["norm.weight"]), entry("lm_head.weight", shapes["lm_head.weight"])]
    return tensors


def permute_for_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF Llama keeps q/k rows in rotate-half order (each head's first half, then its second half); llama.cpp's
    `minicpm` applies rope to interleaved pairs. Reorder each head's rows so pair i is (row i, row i + d/2)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# -- the mmproj file ---------------------------------------------------------------------------------------------

def vision_layers(params: list[str]) -> int:
    """The encoder layers the model runs (drop_vision_last_layer leaves one of the config's out)."""
    return len({n.split(".")[3] for n in params if n.startswith("vpm.encoder.layers.")})


def mmproj_metadata(config, params: list[str], path: Path) -> Metadata:
    spec = version_spec(config.version)
    vision = config.vision_config
    return {
        "clip.has_text_encoder": ("bool", False),
        "clip.has_vision_encoder": ("bool", True),
        "clip.has_minicpmv_projector": ("bool", True),
        "clip.projector_type": ("str", PROJECTOR),
        "clip.minicpmv_version": ("i32", spec.gguf_projector_version),
        "clip.minicpmv_query_num": ("u32", config.query_num),
        # The slice resolution (448), not the tower's position grid size (980 = 70 patches).
        "clip.vision.image_size": ("u32", config.image_size),
        "clip.vision.patch_size": ("u32", vision.patch_size),
        "clip.vision.embedding_length": ("u32", vision.hidden_size),
        "clip.vision.feed_forward_length": ("u32", vision.intermediate_size),
        # Required by the loader, unused by the resampler projector (its output width comes from resampler.proj).
        "clip.vision.projection_dim": ("u32", config.hidden_size),
        "clip.vision.attention.head_count": ("u32", vision.num_attention_heads),
        "clip.vision.attention.layer_norm_epsilon": ("f32", float(vision.layer_norm_eps)),
        "clip.vision.block_count": ("u32", vision_layers(params)),
        "clip.vision.image_mean": ("f32s", [0.5, 0.5, 0.5]),
        "clip.vision.image_std": ("f32s", [0.5, 0.5, 0.5]),
        # gelu_pytorch_tanh; without the key clip.cpp would use gelu_quick.
        "clip.use_gelu": ("bool", True),
    }


def mmproj_tensors(config, params: list[str]) -> list[GgufTensor]:
    spec = version_spec(config.version)
    vision = config.vision_config
    width, ff, patch, embed = vision.hidden_size, vision.intermediate_size, vision.patch_size, config.hidden_size
    grid = vision.image_size // patch
    tensors = [
        GgufTensor("v.patch_embd.weight", "vpm.embeddings.patch_embedding.weight", (width, 3, patch, patch), False),
        GgufTensor("v.patch_embd.bias", "vpm.embeddings.patch_embedding.bias", (width,), False),
        GgufTensor("v.position_embd.weight", "vpm.embeddings.position_embedding.weight", (grid * grid, width), False),
    ]
    layer = {"attn_q": ("self_attn.q_proj", width, width), "attn_k": ("self_attn.k_proj", width, width),
             "attn_v": ("self_attn.v_proj", width, width), "attn_out": ("self_attn.out_proj", width, width),
             "ffn_up": ("mlp.fc1", ff, width), "ffn_down": ("mlp.fc2", width, ff)}
    for i in range(vision_layers(params)):
        prefix = f"vpm.encoder.layers.{i}"
        for gguf_name, (module, rows, cols) in layer.items():
            tensors.append(GgufTensor(f"v.blk.{i}.{gguf_name}.weight", f"{prefix}.{module}.weight", (rows, cols), True))
            tensors.append(GgufTensor(f"v.blk.{i}.{gguf_name}.bias", f"{prefix}.{module}.bias", (rows,), False))
        for norm in ("1", "2"):
            for part in ("weight", "bias"):
                tensors.append(GgufTensor(f"v.blk.{i}.ln{norm}.{part}", f"{prefix}.layer_norm{norm}.{part}",
                                          (width,), False))
    tensors += [GgufTensor(f"v.post_ln.{part}", f"vpm.post_layernorm.{part}", (width,), False)
                for part in ("weight", "bias")]
    tensors += [
        GgufTensor("resampler.query", "resampler.query", (config.query_num, embed), False),
        GgufTensor("resampler.kv.weight", "resampler.kv_proj.weight", (embed, width), True),
        GgufTensor("resampler.attn.q.weight", "resampler.attn.q_proj.weight", (embed, embed), True),
        GgufTensor("resampler.attn.k.weight", "resampler.attn.k_proj.weight", (embed, embed), True),
        GgufTensor("resampler.attn.v.weight", "resampler.attn.v_proj.weight", (embed, embed), True),
        GgufTensor("resampler.attn.q.bias", "resampler.attn.q_proj.bias", (embed,), False),
        GgufTensor("resampler.attn.k.bias", "resampler.attn.k_proj.bias", (embed,), False),
        GgufTensor("resampler.attn.v.bias", "resampler.attn.v_proj.bias", (embed,), False),
        GgufTensor("resampler.attn.out.weight", "resampler.attn.out_proj.weight", (embed, embed), True),
        GgufTensor("resampler.attn.out.bias", "resampler.attn.out_proj.bias", (embed,), False),
    ]
    for norm in ("ln_q", "ln_kv", "ln_post"):
        tensors += [GgufTensor(f"resampler.{norm}.{part}", f"resampler.{norm}.{part}", (embed,), False)
                    for part in ("weight", "bias")]
    # mcq holds `proj` as a Linear (weight = official proj transposed), which is what clip.cpp's `proj.weight` is.
    # llama.cpp multiplies every input embedding by `minicpm.embedding_scale`, image ones included, where the
    # official 4.0 scales only text embeddings: the projection is divided by it to cancel that.
    scale = embedding_scale(config) if LLAMA_CPP_ARCHS[spec.gguf_arch].scales_embeddings else 1.0
    tensors.append(GgufTensor("resampler.proj.weight", "resampler.proj.weight", (embed, embed), True,
                              transform=(lambda weight: weight / scale) if scale != 1.0 else None))

    # Required by the loader, recomputed by the graph at run time; written as the official 2D sin-cos table.
    tensors.append(GgufTensor("resampler.pos_embed_k", "", (grid * grid, embed), False,
                              compute=partial(sincos_table, embed, grid)))
    return tensors


def sincos_table(embed: int, grid: int) -> np.ndarray:
    """The resampler's 2D sin-cos position table (grid x grid positions, width embed), float32 `[grid², embed]`:
    the first half encodes the column, the second the row, each as [sin, cos] of positions x frequencies."""
    quarter = embed // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def encode(positions: np.ndarray) -> np.ndarray:
        angles = positions.reshape(-1, 1) * omega.reshape(1, -1)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def image_blocks(data: dict[str, Any]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """The processor's slices of an encoded sample (`GgufLayout.image_blocks`): it lists them, one `[3, patch,
    rows * columns * patch]` tensor each, with their sizes in `tgt_sizes` (none in a text-only sample)."""
    if "pixel_values" not in data:
        return []
    return [(pixels, (int(rows), int(columns))) for pixels, (rows, columns) in zip(data["pixel_values"][0],
                                                                                  data["tgt_sizes"][0].tolist())]


def _tokenizer(path: Path, config):
    from .tokenization import load_tokenizer

    return load_tokenizer(path, config.version)


LAYOUT = GgufLayout(check=check_exportable, llm_arch=llm_arch, llm_metadata=llm_metadata, llm_tensors=llm_tensors,
                    mmproj_metadata=mmproj_metadata, mmproj_tensors=mmproj_tensors,
                    mmproj_description="vision tower and resampler", tokenizer=_tokenizer,
                    projector=PROJECTOR, image_blocks=image_blocks)
