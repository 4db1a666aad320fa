"""The three graphs of a MiniCPM-V ONNX export, written op by op from the model's weights.

- `vision_encoder`: patchified slices → navit SigLIP → resampler → `image_features [G, queries, hidden]`. What the
  torch model computes from `tgt_sizes` with data-dependent code (bucketized position ids, the resampler's 2D
  sin-cos keys, padding masks, the 4.5 packing of video frames into temporal groups) comes in as inputs, computed
  on the host by the same functions the torch model calls (`runtime.vision_inputs`); ONNX has no bucketize, and
  the packing is a gather whose indices only the host knows.
- `embed_tokens`: `input_ids` → `inputs_embeds` (times `scale_emb` for 4.0's MiniCPM4).
- `decoder_model_merged`: the LLM on `inputs_embeds` with a KV cache: one graph for prefill (empty past) and
  decode, the contract onnxruntime-genai and transformers.js use (`past_key_values.{i}.key` → `present.{i}.key`).

The math mirrors the modules the torch model runs (transformers' Qwen3 / Qwen2 / Llama decoder layers and SigLIP
encoder layers, mcq's resampler), in float32. Structure (which norms and biases exist, layer counts, rotary
frequencies) is read from the model's own module tree built on the meta device, so the two cannot disagree on it.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from mcq.errors import McqError

from .builder import GraphBuilder

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
# Additive mask value for positions that must not be attended to (transformers uses finfo.min the same way).
MASKED = float(np.finfo(np.float32).min)
# Rotary variants whose frequencies depend on the sequence length at run time (not a constant of the graph).
_DYNAMIC_ROPE = {"dynamic", "longrope"}


# -- shared pieces ---------------------------------------------------------------------------------------------

def layer_norm(b: GraphBuilder, x: str, writer, prefix: str, eps: float) -> str:
    with b.scope(prefix):
        return b.op("LayerNormalization", x, b.weight(f"{prefix}.weight", writer.array(f"{prefix}.weight")),
                    b.weight(f"{prefix}.bias", writer.array(f"{prefix}.bias")), axis=-1, epsilon=eps)


def rms_norm(b: GraphBuilder, x: str, writer, name: str, eps: float) -> str:
    """x * rsqrt(mean(x²) + eps) * weight, as transformers' RMSNorm computes it in float32 (written with primitive
    ops, which onnxruntime fuses into its SimplifiedLayerNormalization kernel)."""
    with b.scope(name.removesuffix(".weight")):
        variance = b.op("ReduceMean", b.op("Mul", x, x), b.const([-1], np.int64), keepdims=1)
        inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", variance, b.const(eps))))
        return b.op("Mul", b.op("Mul", x, inv), b.weight(name, writer.array(name)))


def split_heads(b: GraphBuilder, x: str, heads: int, head_dim: int) -> str:
    """[B, L, heads*head_dim] → [B, heads, L, head_dim]."""
    return b.op("Transpose", b.op("Reshape", x, b.const([0, 0, heads, head_dim], np.int64)), perm=[0, 2, 1, 3])


def merge_heads(b: GraphBuilder, x: str, width: int) -> str:
    """[B, heads, L, head_dim] → [B, L, heads*head_dim]."""
    return b.op("Reshape", b.op("Transpose", x, perm=[0, 2, 1, 3]), b.const([0, 0, width], np.int64))


def attend(b: GraphBuilder, q: str, k: str, v: str, additive_mask: str, scale: float) -> str:
    """softmax(q k^T * scale + mask) v over the last two axes (float32 softmax, as eager/SDPA on CPU)."""
    scores = b.op("MatMul", b.op("Mul", q, b.const(scale)), b.op("Transpose", k, perm=[0, 1, 3, 2]))
    return b.op("MatMul", b.op("Softmax", b.op("Add", scores, additive_mask), axis=-1), v)


def _layer_count(names: list[str], prefix: str) -> int:
    indices = {int(name[len(prefix):].split(".", 1)[0]) for name in names if name.startswith(prefix)}
    return max(indices) + 1 if indices else 0


# -- embed_tokens ----------------------------------------------------------------------------------------------

def build_embed_tokens(b: GraphBuilder, writer, scale_emb: float, hidden: int) -> None:
    ids = b.input("input_ids", INT64, ["batch_size", "sequence_length"])
    table = writer.large_weight(b, "llm.model.embed_tokens.weight")
    with b.scope("llm.model.embed_tokens"):
        embeds = b.op("Gather", table, ids, axis=0)
        if scale_emb != 1.0:
            # MiniCPM4 (4.0) scales text embeddings only; vision features are written in unscaled afterwards.
            embeds = b.op("Mul", embeds, b.const(scale_emb))
    b.output(embeds, "inputs_embeds", FLOAT, ["batch_size", "sequence_length", hidden])


# -- decoder_model_merged --------------------------------------------------------------------------------------

class DecoderShape:
    """What the decoder graph needs to know about the LLM, read from the model's meta-device module tree."""

    def __init__(self, shell, names: list[str]):
        llm = shell.llm
        config = llm.config
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise McqError("the LLM uses sliding-window attention, which the ONNX export does not implement")
        if config.hidden_act != "silu":
            raise McqError(f"the LLM's activation {config.hidden_act!r} is not supported by the ONNX export (silu)")
        rotary = llm.model.rotary_emb
        if rotary.rope_type in _DYNAMIC_ROPE:
            raise McqError(f"rope type {rotary.rope_type!r} changes with the sequence length and is not supported by "
                           "the ONNX export")
        self.layers = _layer_count(names, "llm.model.layers.")
        self.hidden = config.hidden_size
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.vocab = config.vocab_size
        self.eps = config.rms_norm_eps
        self.inv_freq = rotary.inv_freq.float().numpy()
        self.rotary_scale = float(rotary.attention_scaling)
        attn = llm.model.layers[0].self_attn
        self.qk_norm = shell.spec.qk_norm
        self.scaling = float(attn.scaling)


def build_decoder(b: GraphBuilder, writer, shape: DecoderShape) -> None:
    s = shape
    n_rep = s.heads // s.kv_heads
    cache_dims = ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]
    embeds = b.input("inputs_embeds", FLOAT, ["batch_size", "sequence_length", s.hidden])
    attention_mask = b.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
    position_ids = b.input("position_ids", INT64, ["batch_size", "sequence_length"])
    past = [(b.input(f"past_key_values.{i}.key", FLOAT, cache_dims),
             b.input(f"past_key_values.{i}.value", FLOAT, cache_dims)) for i in range(s.layers)]

    with b.scope("rotary"):
        # angle = position * inv_freq, duplicated over both halves (transformers' rotary embedding, float32)
        angles = b.op("Mul", b.op("Unsqueeze", b.op("Cast", position_ids, to=FLOAT), b.const([-1], np.int64)),
                      b.weight("llm.model.rotary_emb.inv_freq", s.inv_freq))
        angles = b.op("Unsqueeze", b.op("Concat", angles, angles, axis=-1), b.const([1], np.int64))
        cos, sin = b.op("Cos", angles), b.op("Sin", angles)     # [B, 1, S, head_dim]
        if s.rotary_scale != 1.0:
            cos, sin = b.op("Mul", cos, b.const(s.rotary_scale)), b.op("Mul", sin, b.const(s.rotary_scale))

    with b.scope("mask"):
        # Key j is visible to query i when it is not padding and j <= past + i. Queries of all n_rep heads that
        # share a KV head are stacked along the query axis (see `attention`), so the mask is tiled to match.
        scalar = b.const([], np.int64)
        past_length = b.op("Reshape", b.op("Shape", past[0][0], start=2, end=3), scalar)
        total_length = b.op("Reshape", b.op("Shape", attention_mask, start=1, end=2), scalar)
        one = b.const(1, np.int64)
        query_positions = b.op("Unsqueeze", b.op("Range", past_length, total_length, one), b.const([1], np.int64))
        key_positions = b.op("Unsqueeze", b.op("Range", b.const(0, np.int64), total_length, one),
                             b.const([0], np.int64))
        causal = b.op("LessOrEqual", key_positions, query_positions)                      # [S, T]
        not_padding = b.op("Unsqueeze", b.op("Cast", attention_mask, to=BOOL), b.const([1, 2], np.int64))
        visible = b.op("And", causal, not_padding)                                       # [B, 1, S, T]
        additive = b.op("Where", visible, b.const(0.0), b.const(MASKED))
        if n_rep > 1:
            additive = b.op("Tile", additive, b.const([1, 1, n_rep, 1], np.int64))

    hidden = embeds
    for i in range(s.layers):
        prefix = f"llm.model.layers.{i}"
        with b.scope(prefix):
            normed = rms_norm(b, hidden, writer, f"{prefix}.input_layernorm.weight", s.eps)
            attn, key, value = _decoder_attention(b, writer, s, f"{prefix}.self_attn", normed, cos, sin, past[i],
                                                  additive, n_rep)
            b.output(key, f"present.{i}.key", FLOAT, [*cache_dims[:2], "total_sequence_length", s.head_dim])
            b.output(value, f"present.{i}.value", FLOAT, [*cache_dims[:2], "total_sequence_length", s.head_dim])
            hidden = b.op("Add", hidden, attn)
            normed = rms_norm(b, hidden, writer, f"{prefix}.post_attention_layernorm.weight", s.eps)
            mlp = f"{prefix}.mlp"
            gate = writer.linear(b, normed, f"{mlp}.gate_proj")
            with b.scope(mlp):
                activated = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), writer.linear(b, normed,
                                                                                               f"{mlp}.up_proj"))
            hidden = b.op("Add", hidden, writer.linear(b, activated, f"{mlp}.down_proj"))
    hidden = rms_norm(b, hidden, writer, "llm.model.norm.weight", s.eps)
    logits = writer.linear(b, hidden, "llm.lm_head")
    b.output(logits, "logits", FLOAT, ["batch_size", "sequence_length", s.vocab])
    b.outputs.insert(0, b.outputs.pop())   # logits first, then present.{i}.key/value (the onnx-community order)


def _rotate(b: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] (the halves of head_dim)."""
    half = head_dim // 2
    axis = b.const([-1], np.int64)
    first = b.op("Slice", x, b.const([0], np.int64), b.const([half], np.int64), axis)
    second = b.op("Slice", x, b.const([half], np.int64), b.const([head_dim], np.int64), axis)
    rotated = b.op("Concat", b.op("Neg", second), first, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def _decoder_attention(b, writer, s: DecoderShape, prefix: str, x: str, cos: str, sin: str, past, additive: str,
                       n_rep: int) -> tuple[str, str, str]:
    """Returns (attention output, present key, present value)."""
    q = writer.linear(b, x, f"{prefix}.q_proj")
    k = writer.linear(b, x, f"{prefix}.k_proj")
    v = writer.linear(b, x, f"{prefix}.v_proj")
    with b.scope(prefix):
        q = b.op("Reshape", q, b.const([0, 0, s.heads, s.head_dim], np.int64))
        k = b.op("Reshape", k, b.const([0, 0, s.kv_heads, s.head_dim], np.int64))
        if s.qk_norm:   # Qwen3 normalizes each head's q and k before the rotation
            q = rms_norm(b, q, writer, f"{prefix}.q_norm.weight", s.eps)
            k = rms_norm(b, k, writer, f"{prefix}.k_norm.weight", s.eps)
        q = b.op("Transpose", q, perm=[0, 2, 1, 3])
        k = b.op("Transpose", k, perm=[0, 2, 1, 3])
        v = split_heads(b, v, s.kv_heads, s.head_dim)
        q, k = _rotate(b, q, cos, sin, s.head_dim), _rotate(b, k, cos, sin, s.head_dim)
        key = b.op("Concat", past[0], k, axis=2)
        value = b.op("Concat", past[1], v, axis=2)
        # Grouped-query attention without copying the cache n_rep times: the n_rep query heads of a KV head
        # (heads kv*n_rep .. kv*n_rep + n_rep - 1, transformers' repeat_kv order) go along the query axis.
        grouped = b.op("Reshape", q, b.const([0, s.kv_heads, -1, s.head_dim], np.int64))
        out = attend(b, grouped, key, value, additive, s.scaling)
        out = merge_heads(b, b.op("Reshape", out, b.const([0, s.heads, -1, s.head_dim], np.int64)),
                          s.heads * s.head_dim)
    return writer.linear(b, out, f"{prefix}.o_proj"), key, value


# -- vision_encoder --------------------------------------------------------------------------------------------

class VisionShape:
    def __init__(self, shell, names: list[str]):
        vision_config = shell.vpm.config
        if vision_config.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise McqError(f"vision activation {vision_config.hidden_act!r} is not supported by the ONNX export")
        self.tanh_gelu = vision_config.hidden_act == "gelu_pytorch_tanh"
        self.layers = _layer_count(names, "vpm.encoder.layers.")
        self.hidden = vision_config.hidden_size
        self.heads = vision_config.num_attention_heads
        self.head_dim = self.hidden // self.heads
        self.eps = vision_config.layer_norm_eps
        self.patch = vision_config.patch_size
        self.channels = vision_config.num_channels
        resampler = shell.resampler
        self.queries = resampler.num_queries
        self.embed_dim = resampler.embed_dim
        self.resampler_heads = resampler.attn.num_heads
        self.kv_proj = "resampler.kv_proj.weight" in names


def build_vision_encoder(b: GraphBuilder, writer, s: VisionShape) -> None:
    p = s.patch
    pixels = b.input("pixel_values", FLOAT, ["num_slices", s.channels, p, "patch_row_width"])
    patch_mask = b.input("patch_attention_mask", BOOL, ["num_slices", "num_patches"])
    position_ids = b.input("position_ids", INT64, ["num_slices", "num_patches"])
    key_positions = b.input("resampler_pos_embed", FLOAT, ["num_slices", "num_patches", s.embed_dim])
    packing_index = b.input("resampler_packing_index", INT64, ["num_groups", "group_length"])
    key_padding = b.input("resampler_key_padding_mask", BOOL, ["num_groups", "group_length"])

    with b.scope("vpm.embeddings"):
        # The row of patches [B, C, p, p*L] through the stride-p convolution gives the L patch embeddings.
        conv = b.op("Conv", pixels, writer.large_weight(b, "vpm.embeddings.patch_embedding.weight"),
                    b.weight("vpm.embeddings.patch_embedding.bias",
                             writer.array("vpm.embeddings.patch_embedding.bias")),
                    kernel_shape=[p, p], strides=[p, p])
        patches = b.op("Transpose", b.op("Reshape", conv, b.const([0, 0, -1], np.int64)), perm=[0, 2, 1])
        positions = b.op("Gather", writer.large_weight(b, "vpm.embeddings.position_embedding.weight"), position_ids,
                         axis=0)
        hidden = b.op("Add", patches, positions)
    with b.scope("vpm.mask"):
        additive = b.op("Unsqueeze", b.op("Where", patch_mask, b.const(0.0), b.const(MASKED)),
                        b.const([1, 2], np.int64))
    for i in range(s.layers):
        prefix = f"vpm.encoder.layers.{i}"
        with b.scope(prefix):
            normed = layer_norm(b, hidden, writer, f"{prefix}.layer_norm1", s.eps)
            attn = f"{prefix}.self_attn"
            q, k, v = (split_heads(b, writer.linear(b, normed, f"{attn}.{n}_proj"), s.heads, s.head_dim)
                       for n in ("q", "k", "v"))
            with b.scope(attn):
                out = merge_heads(b, attend(b, q, k, v, additive, s.head_dim**-0.5), s.hidden)
            hidden = b.op("Add", hidden, writer.linear(b, out, f"{attn}.out_proj"))
            normed = layer_norm(b, hidden, writer, f"{prefix}.layer_norm2", s.eps)
            up = writer.linear(b, normed, f"{prefix}.mlp.fc1")
            with b.scope(f"{prefix}.mlp"):
                activated = b.op("Gelu", up, approximate="tanh" if s.tanh_gelu else "none")
            hidden = b.op("Add", hidden, writer.linear(b, activated, f"{prefix}.mlp.fc2"))
    hidden = layer_norm(b, hidden, writer, "vpm.post_layernorm", s.eps)
    features = _resampler(b, writer, s, hidden, key_positions, packing_index, key_padding)
    b.output(features, "image_features", FLOAT, ["num_groups", s.queries, s.embed_dim])


def _resampler(b, writer, s: VisionShape, x: str, key_positions: str, packing_index: str, key_padding: str) -> str:
    """mcq's Resampler.forward: keys = ln_kv(kv_proj(x)) + position (+ temporal term, folded into the position input
    by the host), values without it; the slices of each group gathered into one key sequence; 64 queries attend."""
    d, heads = s.embed_dim, s.resampler_heads
    if s.kv_proj:
        x = writer.linear(b, x, "resampler.kv_proj")
    with b.scope("resampler"):
        x = layer_norm(b, x, writer, "resampler.ln_kv", 1e-6)
        keys = b.op("Add", x, key_positions)
        flat = b.const([-1, d], np.int64)
        # Rows of all slices in one [num_slices * num_patches, D] table; each group gathers its frames' rows.
        keys = b.op("Gather", b.op("Reshape", keys, flat), packing_index, axis=0)       # [G, M, D]
        values = b.op("Gather", b.op("Reshape", x, flat), packing_index, axis=0)
        query = layer_norm(b, writer.large_weight(b, "resampler.query"), writer, "resampler.ln_q", 1e-6)
        additive = b.op("Unsqueeze", b.op("Where", key_padding, b.const(MASKED), b.const(0.0)),
                        b.const([1, 2], np.int64))
    attn = "resampler.attn"
    head_dim = d // heads
    # The queries are the same for every group: [1, heads, Q, head_dim] broadcasts against [G, heads, M, head_dim].
    q = split_heads(b, writer.linear(b, b.op("Unsqueeze", query, b.const([0], np.int64)), f"{attn}.q_proj"),
                    heads, head_dim)
    k = split_heads(b, writer.linear(b, keys, f"{attn}.k_proj"), heads, head_dim)
    v = split_heads(b, writer.linear(b, values, f"{attn}.v_proj"), heads, head_dim)
    with b.scope(attn):
        out = merge_heads(b, attend(b, q, k, v, additive, head_dim**-0.5), d)
    out = writer.linear(b, out, f"{attn}.out_proj")
    with b.scope("resampler"):
        out = layer_norm(b, out, writer, "resampler.ln_post", 1e-6)
    return writer.linear(b, out, "resampler.proj")
