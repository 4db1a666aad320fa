"""MiniCPM-V 2.6 / 4.0 / 4.5 (the resampler family) as runtime-neutral torch programs: plain modules built tensor by
tensor from an `ExportWeights` (or, to be traced without weights, a `MetaWeights`), which both graph exporters trace.

- ONNX (`torch.onnx.export` on the meta device, `mcq.export.onnx.traced`), the onnx-community layout, each input as
  the host computes it (`mcq.export.onnx.runtime`):
  - the vision graph: slices padded to a common length → navit SigLIP → resampler → `image_features
    [groups, query_num, hidden]`, traced in pieces (`VisionEmbeddings`, one `_VisionLayer`, `VisionHead`) and joined
    layer by layer. What the torch model computes from `tgt_sizes` with data-dependent code comes in
    as inputs, computed on the host by the same functions the torch model calls: navit position ids (ONNX has no
    bucketize), the patch mask, the resampler's key positions (2D sin-cos, plus 4.5's temporal term), and a packing
    index with its key-padding mask, which names for each output block the rows of the slices it attends over (the
    frames of a 4.5 temporal group one after the other, or one slice of an image).
  - `EmbedTokens`: `input_ids` → `inputs_embeds` (times 4.0's `scale_emb`).
  - the decoder: the LLM on `inputs_embeds` with its KV cache explicit (`past_key_values.{i}.key` →
    `present.{i}.key`), one graph for prefill (empty past) and decode, traced in pieces (`DecoderPrologue`, one
    `DecoderLayerStep`, `DecoderHead`) and joined layer by layer.
- Core ML (`torch.jit.trace` and coremltools, `mcq.export.coreml.convert`): `VisionSlice` (one slice padded to
  `max_patches` → its query_num tokens), `VisionTower` and `GroupResampler` (the two halves, for releases whose
  resampler packs video frames), `StatefulDecoder` chunks (the KV cache in state buffers), `DecoderHead` and
  `EmbedTokens`.

Both are made of the same layers (`_VisionTower`, `_Resampler`, `_DecoderLayer`), written with the ops the Core ML
converter maps well and the Neural Engine runs (Linears, layer norms, matmuls, softmax, gathers, reshapes), with
sizes from the config, never from a traced tensor's shape (jit.trace records those as `int` ops the converter
rejects on dynamic axes). The math is transformers' (Qwen3 / Qwen2 / Llama decoder layers, SigLIP encoder layers)
and mcq's resampler, in float32. Linears keep their weights transposed (`TransposedLinear`: one MatMul on an
initializer named after the weight, where ONNX export puts MatMulNBits); Core ML gets them back as `nn.Linear`s
(`as_linear_ops`), the ops its compressions act on.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mcq.errors import McqError

from ..familyspec import LayeredProgram, StateTensor, TracedProgram
from ..traceable import (MASKED_SCORE, ROTARY_AND_MASK, LayerNorm, causal_padding_mask, checkpoint_parameter,
                         layered_decoder, layout_graphs, linear, rms_normalize, rotary_terms, transposed_linear)
from ..weights import shell_model
from .versions import embedding_scale

# Rotary variants whose frequencies depend on the sequence length at run time (not a constant of the program).
_DYNAMIC_ROPE = {"dynamic", "longrope"}
LLM_LAYERS = "llm.model.layers."
VISION_LAYERS = "vpm.encoder.layers."


def _layer_count(weights, prefix: str) -> int:
    indices = {int(name[len(prefix):].split(".", 1)[0]) for name in weights.names() if name.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def _attend(q, k, v, additive_mask, heads: int, width: int) -> torch.Tensor:
    """Multi-head attention of queries `[..., Lq, width]` over keys and values `[..., Lk, width]` (leading axes
    broadcast) with an additive key mask `[..., 1, 1, Lk]` → `[..., Lq, width]`.

    The query is scaled before the product (not the scores): smaller fp16 intermediates, and the pattern stays a
    plain matmul-softmax-matmul the Core ML converter does not try to fuse into an op the interpreter would need."""
    head_dim = width // heads

    def split(t: torch.Tensor) -> torch.Tensor:       # [..., L, width] → [..., heads, L, head_dim]
        return t.unflatten(-1, (heads, head_dim)).transpose(-2, -3)

    scores = torch.matmul(split(q * head_dim**-0.5), split(k).transpose(-1, -2)) + additive_mask
    return torch.matmul(torch.softmax(scores, dim=-1), split(v)).transpose(-2, -3).flatten(-2)


def _additive(keep: torch.Tensor) -> torch.Tensor:
    """0 where `keep` (bool: ONNX's masks, or 1.0 / 0.0: Core ML's, which has no bool inputs) is set, MASKED_SCORE
    elsewhere."""
    return (1.0 - (keep.float() if keep.dtype == torch.bool else keep)) * MASKED_SCORE


# -- vision -----------------------------------------------------------------------------------------------------

class _VisionLayer(nn.Module):
    def __init__(self, weights, prefix: str, vision):
        super().__init__()
        self.heads, self.width = vision.num_attention_heads, vision.hidden_size
        eps = vision.layer_norm_eps
        self.layer_norm1 = LayerNorm(weights, f"{prefix}.layer_norm1", eps)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            linear(weights, f"{prefix}.self_attn.{name}", True) for name in ("q_proj", "k_proj", "v_proj", "out_proj"))
        self.layer_norm2 = LayerNorm(weights, f"{prefix}.layer_norm2", eps)
        self.fc1 = linear(weights, f"{prefix}.mlp.fc1", True)
        self.fc2 = linear(weights, f"{prefix}.mlp.fc2", True)
        self.approximate = "tanh" if vision.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm1(hidden)
        hidden = hidden + self.out_proj(_attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), additive_mask,
                                                self.heads, self.width))
        return hidden + self.fc2(F.gelu(self.fc1(self.layer_norm2(hidden)), approximate=self.approximate))


class _VisionTower(nn.Module):
    """SigLIP: slices `[N, C, P, P * L]` (MiniCPM's row of patches) → `[N, L, width]` after the post norm."""

    def __init__(self, weights):
        super().__init__()
        vision = weights.config.vision_config
        if vision.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise McqError(f"vision activation {vision.hidden_act!r} is not supported by the graph exports")
        self.patch = vision.patch_size
        conv = "vpm.embeddings.patch_embedding"
        weight = weights.tensor(f"{conv}.weight")
        # The stride-P conv over the row of patches is one Linear on each flattened (channel, row, col) patch.
        self.patch_embedding = transposed_linear(weight.reshape(weight.shape[0], -1), weights.tensor(f"{conv}.bias"),
                                                 conv)
        self.position_embedding = checkpoint_parameter(weights, "vpm.embeddings.position_embedding.weight")
        self.layers = nn.ModuleList(_VisionLayer(weights, f"{VISION_LAYERS}{i}", vision)
                                    for i in range(_layer_count(weights, VISION_LAYERS)))
        self.post_layernorm = LayerNorm(weights, "vpm.post_layernorm", vision.layer_norm_eps)

    def forward(self, pixel_values, position_ids, additive_mask) -> torch.Tensor:
        hidden = _embed_patches(self, pixel_values, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, additive_mask)
        return self.post_layernorm(hidden)


def _embed_patches(tower, pixel_values, position_ids) -> torch.Tensor:
    """A tower's patch embeddings plus its position embeddings, `[N, L, width]`."""
    patches = pixel_values.unflatten(-1, (-1, tower.patch)).permute(0, 3, 1, 2, 4).flatten(2)
    return tower.patch_embedding(patches) + F.embedding(position_ids, tower.position_embedding)


class _Resampler(nn.Module):
    """mcq's Resampler: query_num queries over the keys `[..., K, vision width]` (keys ln_kv(kv_proj(x)) plus their
    positions `[..., K, hidden]`, values without them) → `[..., query_num, hidden]`."""

    def __init__(self, weights):
        super().__init__()
        self.hidden = weights.config.hidden_size
        self.heads = self.hidden // 128     # as MiniCPMV builds its Resampler
        names = set(weights.names())
        self.kv_proj = linear(weights, "resampler.kv_proj", False) if "resampler.kv_proj.weight" in names else None
        self.ln_kv = LayerNorm(weights, "resampler.ln_kv", 1e-6)
        self.ln_q = LayerNorm(weights, "resampler.ln_q", 1e-6)
        self.query = checkpoint_parameter(weights, "resampler.query")
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            linear(weights, f"resampler.attn.{name}", True) for name in ("q_proj", "k_proj", "v_proj", "out_proj"))
        self.ln_post = LayerNorm(weights, "resampler.ln_post", 1e-6)
        self.proj = linear(weights, "resampler.proj", False)

    def forward(self, features, key_positions, additive_mask) -> torch.Tensor:
        if self.kv_proj is not None:
            features = self.kv_proj(features)
        features = self.ln_kv(features)
        query = self.ln_q(self.query).unsqueeze(0)     # the same queries for every block: broadcast
        out = _attend(self.q_proj(query), self.k_proj(features + key_positions), self.v_proj(features),
                      additive_mask, self.heads, self.hidden)
        return self.proj(self.ln_post(self.out_proj(out)))


class VisionEmbeddings(nn.Module):
    """The ONNX vision graph's prologue: (pixel_values `[N, C, P, P * L]` float, patch_attention_mask `[N, L]` bool,
    position_ids `[N, L]`) → (patch_embeddings `[N, L, width]`, vision_mask `[N, 1, 1, L]`: the additive patch mask
    every layer reads)."""

    def __init__(self, tower: _VisionTower):
        super().__init__()
        self.patch, self.patch_embedding, self.position_embedding = (tower.patch, tower.patch_embedding,
                                                                     tower.position_embedding)

    def forward(self, pixel_values, patch_attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        return _embed_patches(self, pixel_values, position_ids), _additive(patch_attention_mask)[:, None, None]


class VisionHead(nn.Module):
    """The ONNX vision graph's head: (the last layer's output `[N, L, width]`, resampler_pos_embed `[N, L, hidden]`,
    resampler_packing_index `[G, M]`, resampler_key_padding_mask `[G, M]` bool, True on padding) → image_features
    `[G, query_num, hidden]`. Rows of every slice form one table `[N * L, ...]`; block g gathers its rows by the
    packing index."""

    def __init__(self, tower: _VisionTower, resampler: _Resampler):
        super().__init__()
        self.post_layernorm, self.resampler = tower.post_layernorm, resampler

    def forward(self, hidden_states, resampler_pos_embed, resampler_packing_index,
                resampler_key_padding_mask) -> torch.Tensor:
        features = self.post_layernorm(hidden_states).flatten(0, 1)[resampler_packing_index]
        key_positions = resampler_pos_embed.flatten(0, 1)[resampler_packing_index]
        additive = _additive(~resampler_key_padding_mask)[:, None, None]
        return self.resampler(features, key_positions, additive)


class VisionSlice(nn.Module):
    """Core ML's vision program: one slice → `[1, query_num, hidden]`, tower and resampler together.

    Inputs (host-computed, `mcq.export.coreml.host.vision_inputs`): `pixel_values` [1, 3, P, P*L] in MiniCPM's
    row-of-patches layout, zero past the slice's patches; `position_ids` [1, L] int32 (0 on padding); `patch_mask`
    [1, L] (1 on real patches); `key_positions` [1, L, hidden], the resampler's 2D sin-cos term of the slice's
    h x w grid. L is the package's `max_patches`.

    `tower` / `resampler` False leave that half out (its weights unread): `VisionTower` and `GroupResampler`, the
    two programs of a release whose resampler packs video frames, are the halves of this one under the same
    parameter names (so the converted weights keep their names)."""

    def __init__(self, weights, max_patches: int, tower: bool = True, resampler: bool = True):
        super().__init__()
        self.max_patches = max_patches
        self.vision_width = weights.config.vision_config.hidden_size
        self.tower = _VisionTower(weights) if tower else None
        self.resampler = _Resampler(weights) if resampler else None

    def encode(self, pixel_values, position_ids, patch_mask) -> tuple[torch.Tensor, torch.Tensor]:
        additive_mask = _additive(patch_mask).reshape(1, 1, 1, self.max_patches)
        return self.tower(pixel_values, position_ids, additive_mask), additive_mask

    def forward(self, pixel_values, position_ids, patch_mask, key_positions) -> torch.Tensor:
        features, additive_mask = self.encode(pixel_values, position_ids, patch_mask)
        return self.resampler(features, key_positions, additive_mask)


class VisionTower(VisionSlice):
    """One slice (or video frame) → `vision_features` `[1, L, vision hidden]`, the tower's output after the post
    norm (rows past the slice's patches are don't-cares: the resampler masks them). Inputs as `VisionSlice`'s
    but `key_positions`."""

    def __init__(self, weights, max_patches: int):
        super().__init__(weights, max_patches, resampler=False)

    def forward(self, pixel_values, position_ids, patch_mask) -> torch.Tensor:
        return self.encode(pixel_values, position_ids, patch_mask)[0]


class GroupResampler(VisionSlice):
    """The resampler over F frames at once → `[1, query_num, hidden]`, as the torch Resampler packs a temporal group:
    the keys of all its frames, frame-major, in one sequence the queries attend over.

    Inputs: `vision_features` [F, L, vision hidden] (the frames' `VisionTower` outputs), `key_positions`
    [F, L, hidden] (each frame's 2D sin-cos term plus its temporal term, host-computed) and `patch_mask` [F, L].
    F = 1 is an image slice (temporal term zero)."""

    def __init__(self, weights, max_patches: int):
        super().__init__(weights, max_patches, tower=False)

    def forward(self, vision_features, key_positions, patch_mask) -> torch.Tensor:
        additive_mask = _additive(patch_mask).reshape(1, 1, 1, -1)
        features = vision_features.reshape(1, -1, self.vision_width)
        return self.resampler(features, key_positions.reshape(1, -1, self.resampler.hidden), additive_mask)


# -- LLM --------------------------------------------------------------------------------------------------------

class EmbedTokens(nn.Module):
    """`input_ids` → text embeddings `[..., hidden]`, times the release's `scale_emb` (4.0's MiniCPM4 scales text
    embeddings only; vision features are written in unscaled afterwards)."""

    def __init__(self, weights):
        super().__init__()
        self.table = checkpoint_parameter(weights, "llm.model.embed_tokens.weight")
        self.scale = embedding_scale(weights.config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = F.embedding(input_ids, self.table)
        return embeds * self.scale if self.scale != 1.0 else embeds


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_normalize(x, eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class DecoderShape:
    def __init__(self, config, context: int = 0, layers: int | None = None):
        self.layers = config.num_hidden_layers if layers is None else layers
        self.hidden = config.hidden_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.eps, self.context = config.rms_norm_eps, context
        self.vocab = config.vocab_size

    @property
    def cache_shape(self) -> tuple[int, ...]:
        return (self.layers, 1, self.kv_heads, self.context, self.head_dim)


class _DecoderLayer(nn.Module):
    def __init__(self, weights, prefix: str, shape: DecoderShape):
        super().__init__()
        self.shape = shape
        attention = f"{prefix}.self_attn"
        bias = weights.spec.qkv_bias
        self.q_proj, self.k_proj, self.v_proj = (linear(weights, f"{attention}.{name}", bias)
                                                 for name in ("q_proj", "k_proj", "v_proj"))
        self.o_proj = linear(weights, f"{attention}.o_proj", False)
        self.gate_proj, self.up_proj, self.down_proj = (linear(weights, f"{prefix}.mlp.{name}", False)
                                                        for name in ("gate_proj", "up_proj", "down_proj"))
        self.input_norm = checkpoint_parameter(weights, f"{prefix}.input_layernorm.weight")
        self.post_norm = checkpoint_parameter(weights, f"{prefix}.post_attention_layernorm.weight")
        self.q_norm, self.k_norm = ((checkpoint_parameter(weights, f"{attention}.q_norm.weight"),
                                     checkpoint_parameter(weights, f"{attention}.k_norm.weight"))
                                    if weights.spec.qk_norm else (None, None))

    def project(self, hidden, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new positions' query (scaled), key and value `[B, heads or kv_heads, S, head_dim]`."""
        s = self.shape
        x = _rms_norm(hidden, self.input_norm, s.eps)
        q = self.q_proj(x).unflatten(-1, (s.heads, s.head_dim))
        k = self.k_proj(x).unflatten(-1, (s.kv_heads, s.head_dim))
        v = self.v_proj(x).unflatten(-1, (s.kv_heads, s.head_dim)).transpose(1, 2)
        if self.q_norm is not None:     # Qwen3 normalizes each head's q and k before the rotation
            q, k = _rms_norm(q, self.q_norm, s.eps), _rms_norm(k, self.k_norm, s.eps)
        half = s.head_dim // 2
        return (_rotate(q.transpose(1, 2), cos, sin, half) * s.head_dim**-0.5,
                _rotate(k.transpose(1, 2), cos, sin, half), v)

    def finish(self, hidden, q, keys, values, additive_mask) -> torch.Tensor:
        """Attention of `q` over every cached position and the MLP: the layer's output hidden states.

        Grouped-query attention without repeating K/V: the query heads of one K/V head are stacked as rows,
        `[B, kv_heads, repeat * S, head_dim]`, each group against its own keys (the mask `[B, 1, S, T]` repeated to
        match). Repeating the cache instead would copy it `repeat` times per layer and call."""
        s = self.shape
        repeat = s.heads // s.kv_heads
        grouped = q.unflatten(1, (s.kv_heads, repeat)).flatten(2, 3)
        scores = torch.matmul(grouped, keys.transpose(-1, -2).to(q.dtype)) + additive_mask.repeat(1, 1, repeat, 1)
        attended = torch.matmul(torch.softmax(scores, dim=-1), values.to(q.dtype))
        attended = attended.unflatten(2, (repeat, -1)).flatten(1, 2).transpose(1, 2).flatten(2)
        hidden = hidden + self.o_proj(attended)
        x = _rms_norm(hidden, self.post_norm, s.eps)
        return hidden + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _lm_head(weights) -> nn.Module:
    head = "llm.lm_head" if "llm.lm_head.weight" in weights.names() else "llm.model.embed_tokens"
    return linear(weights, head, False)


class DecoderPrologue(nn.Module):
    """What every layer of the ONNX decoder reads: (inputs_embeds `[B, S, hidden]`, attention_mask `[B, past + S]`,
    position_ids `[B, S]`) → the rotary terms `[B, 1, S, head_dim]` and the additive causal and padding mask
    `[B, 1, S, past + S]`."""

    def __init__(self, config):
        super().__init__()
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise McqError("the LLM uses sliding-window attention, which the graph exports do not implement")
        if config.hidden_act != "silu":
            raise McqError(f"the LLM's activation {config.hidden_act!r} is not supported by the graph exports (silu)")
        rotary = shell_model(config).llm.model.rotary_emb     # transformers' own, for the LLM's rope type
        if rotary.rope_type in _DYNAMIC_ROPE:
            raise McqError(f"rope type {rotary.rope_type!r} changes with the sequence length and is not supported by "
                           "the graph exports")
        self.register_buffer("inv_freq", rotary.inv_freq.float(), persistent=False)
        self.rotary_scale = float(rotary.attention_scaling)

    def forward(self, inputs_embeds, attention_mask, position_ids):
        cos, sin = rotary_terms(position_ids, self.inv_freq, self.rotary_scale)
        return cos, sin, causal_padding_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.device)


class DecoderLayerStep(nn.Module):
    """Decoder layer `index` of the ONNX decoder, its KV cache explicit: (hidden_states, cos, sin, additive_mask,
    past key, past value `[B, kv_heads, past, head_dim]`) → (hidden_states, present key, present value with the new
    positions appended)."""

    def __init__(self, weights, index: int):
        super().__init__()
        self.layer = _DecoderLayer(weights, f"{LLM_LAYERS}{index}", DecoderShape(weights.config))

    def forward(self, hidden, cos, sin, additive_mask, past_key, past_value):
        q, k, v = self.layer.project(hidden, cos, sin)
        keys, values = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
        return self.layer.finish(hidden, q, keys, values, additive_mask), keys, values


class StatefulDecoder(nn.Module):
    """Decoder layers `layers` (a range of the LLM's) with their KV cache as two state buffers (`key_cache`,
    `value_cache`, one entry per layer of the range), updated in place. Core ML converts the LLM as several of
    these, a few layers each, so that one chunk is traced and converted at a time (memory does not grow with depth).

    Inputs: `hidden_states` [1, S, hidden] (the first chunk's: text embeddings with image features written over the
    placeholders), `position_cos` / `position_sin` [1, 1, S, head_dim] (the rotary terms of the S positions,
    host-computed in float32: fp16 cannot hold positions past 2048 exactly, and a table would cost more than the
    model at tiny sizes), `causal_mask` [1, 1, S, E] with E = positions cached after this call (0 where a query may
    attend, a large negative value elsewhere). The call writes positions [E - S, E) of the cache and returns the
    hidden states after the range's last layer.
    """

    def __init__(self, weights, context: int, layers: range):
        super().__init__()
        self.shape = shape = DecoderShape(weights.config, context, len(layers))
        self.layers = nn.ModuleList(_DecoderLayer(weights, f"{LLM_LAYERS}{i}", shape) for i in layers)
        self.register_buffer("key_cache", torch.zeros(shape.cache_shape, dtype=torch.float16))
        self.register_buffer("value_cache", torch.zeros(shape.cache_shape, dtype=torch.float16))

    def forward(self, hidden_states, position_cos, position_sin, causal_mask) -> torch.Tensor:
        end = causal_mask.shape[-1]
        past = end - hidden_states.shape[1]
        hidden = hidden_states
        for index, layer in enumerate(self.layers):
            q, k, v = layer.project(hidden, position_cos, position_sin)
            # The new keys/values go into the state at [past, end); attention reads the whole [0, end).
            # Updates of the slice's full rank: a lower-rank one is traced as a reshape to the example's length.
            self.key_cache[index : index + 1, :, :, past:end, :] = k.to(self.key_cache.dtype)[None]
            self.value_cache[index : index + 1, :, :, past:end, :] = v.to(self.value_cache.dtype)[None]
            keys = self.key_cache[index : index + 1, :, :, :end, :].flatten(0, 1)
            values = self.value_cache[index : index + 1, :, :, :end, :].flatten(0, 1)
            hidden = layer.finish(hidden, q, keys, values, causal_mask)
        return hidden


class DecoderHead(nn.Module):
    """The final norm and the LM head: hidden states [1, S, hidden] → logits [1, S, vocab]."""

    def __init__(self, weights):
        super().__init__()
        self.eps = weights.config.rms_norm_eps
        self.norm = checkpoint_parameter(weights, "llm.model.norm.weight")
        self.lm_head = _lm_head(weights)

    def forward(self, hidden_states) -> torch.Tensor:
        return self.lm_head(_rms_norm(hidden_states, self.norm, self.eps))


# -- the programs as the ONNX layout traces them ---------------------------------------------------------------------

def decoder_state(config) -> list[StateTensor]:
    """The decoder's state inputs in order: each layer's key and value cache `[batch, kv_heads, past, head_dim]`."""
    shape = DecoderShape(config)
    cache = (None, shape.kv_heads, None, shape.head_dim)
    return [StateTensor(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}", cache)
            for i in range(shape.layers) for kind in ("key", "value")]


def _vision_program(weights) -> LayeredProgram:
    """The vision graph in pieces, joined layer by layer: `VisionEmbeddings`, one traced SigLIP layer, `VisionHead`
    (the tower's post norm and the resampler)."""
    config = weights.config
    vision = config.vision_config
    tower, resampler = _VisionTower(weights), _Resampler(weights)
    patch, width = vision.patch_size, vision.hidden_size
    slices, patches, groups, group_length = 2, 6, 3, 5     # distinct sizes: no axis taken for another
    rows = {0: "num_slices", 1: "num_patches"}
    axes = {"pixel_values": {0: "num_slices", 3: "patch_row_width"}, "patch_attention_mask": rows,
            "position_ids": rows, "patch_embeddings": rows, "vision_mask": {0: "num_slices", 3: "num_patches"},
            "hidden_states": rows, "layer_output": rows, "resampler_pos_embed": rows,
            "resampler_packing_index": {0: "num_groups", 1: "group_length"},
            "resampler_key_padding_mask": {0: "num_groups", 1: "group_length"}, "image_features": {0: "num_groups"}}

    def program(module: nn.Module, example: dict[str, torch.Tensor], outputs: tuple[str, ...]) -> TracedProgram:
        names = tuple(example)
        return TracedProgram(module.eval(), tuple(example.values()), names, outputs,
                             tuple({axis: torch.export.Dim.DYNAMIC for axis in axes[name]} for name in names), axes)

    hidden = torch.zeros(slices, patches, width)
    prologue = program(VisionEmbeddings(tower), {
        "pixel_values": torch.zeros(slices, vision.num_channels, patch, patch * patches),
        "patch_attention_mask": torch.ones(slices, patches, dtype=torch.bool),
        "position_ids": torch.zeros(slices, patches, dtype=torch.long)}, ("patch_embeddings", "vision_mask"))
    head = program(VisionHead(tower, resampler), {
        "hidden_states": hidden, "resampler_pos_embed": torch.zeros(slices, patches, config.hidden_size),
        "resampler_packing_index": torch.zeros(groups, group_length, dtype=torch.long),
        "resampler_key_padding_mask": torch.zeros(groups, group_length, dtype=torch.bool)}, ("image_features",))

    def layer(index: int) -> TracedProgram:
        example = {"hidden_states": hidden, "vision_mask": torch.zeros(slices, 1, 1, patches)}
        return program(tower.layers[index], example, ("layer_output",))

    # Every SigLIP layer is built alike: one trace.
    return LayeredProgram(prologue, layer, lambda index: "layer", len(tower.layers),
                          lambda index: f"{VISION_LAYERS}{index}.", head, (), "patch_embeddings")


def _decoder_program(weights) -> LayeredProgram:
    config = weights.config
    # Every layer of a release is built alike (its q/k/v biases and q/k norms are the release's): one trace.
    return layered_decoder(DecoderPrologue(config), ROTARY_AND_MASK, partial(DecoderLayerStep, weights),
                           lambda index: "layer",
                           _layer_count(weights, LLM_LAYERS), LLM_LAYERS, DecoderHead(weights), config.hidden_size,
                           decoder_state(config))


build_program = layout_graphs(_vision_program, EmbedTokens, _decoder_program)
