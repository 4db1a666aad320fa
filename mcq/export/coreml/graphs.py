"""The torch programs traced into Core ML: plain modules built tensor by tensor from an `ExportWeights`.

They restate the model with only the ops the Core ML converter maps well and the Neural Engine runs: Linears,
layer norms, matmuls, softmax, gathers, reshapes. What the official code computes data-dependently (bucketed
position ids, the resampler's 2D sin-cos term, the padding mask) comes in as inputs the host computes
(`host.vision_inputs`), so one traced program serves every slice shape up to `max_patches`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcq.models.minicpmv.versions import embedding_scale
from mcq.models.traceable import rms_normalize

# Added to attention scores of padded keys. Representable in fp16 (the real minimum would overflow to -inf when
# a score is added to it), and exp(-1e4) is 0 in any precision, so a padded key gets no weight.
MASKED_SCORE = -1.0e4


def _linear(weights, prefix: str, bias: bool) -> nn.Linear:
    # Built on the meta device and given the checkpoint's tensors: no random init, no second copy of the weight.
    weight = weights.tensor(f"{prefix}.weight").float()
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.mcq_source = prefix      # the checkpoint module, for `--from`'s stored levels
    if bias:
        layer.bias = nn.Parameter(weights.tensor(f"{prefix}.bias").float(), requires_grad=False)
    return layer


def _layer_norm(weights, prefix: str, eps: float) -> nn.LayerNorm:
    weight = weights.tensor(f"{prefix}.weight").float()
    norm = nn.LayerNorm(weight.shape[0], eps=eps, device="meta")
    norm.weight = nn.Parameter(weight, requires_grad=False)
    norm.bias = nn.Parameter(weights.tensor(f"{prefix}.bias").float(), requires_grad=False)
    return norm


def _attend(q, k, v, additive_mask, heads: int, width: int) -> torch.Tensor:
    """Multi-head attention on [1, Lq, D] / [1, Lk, D] with an additive key mask [1, 1, 1, Lk] → [1, Lq, D].

    The query is scaled before the product (not the scores): smaller fp16 intermediates, and the pattern stays a
    plain matmul-softmax-matmul the converter does not try to fuse into an op the interpreter would need."""
    head_dim = width // heads     # python ints: a traced `shape[-1]` would become an `int` op the converter rejects
    q = (q * head_dim**-0.5).reshape(1, -1, heads, head_dim).transpose(1, 2)
    k = k.reshape(1, -1, heads, head_dim).transpose(1, 2)
    v = v.reshape(1, -1, heads, head_dim).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) + additive_mask
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(1, 2).reshape(1, -1, width)


class _VisionLayer(nn.Module):
    def __init__(self, weights, prefix: str, eps: float, heads: int):
        super().__init__()
        self.heads, self.width = heads, weights.config.vision_config.hidden_size
        self.layer_norm1 = _layer_norm(weights, f"{prefix}.layer_norm1", eps)
        self.q_proj = _linear(weights, f"{prefix}.self_attn.q_proj", True)
        self.k_proj = _linear(weights, f"{prefix}.self_attn.k_proj", True)
        self.v_proj = _linear(weights, f"{prefix}.self_attn.v_proj", True)
        self.out_proj = _linear(weights, f"{prefix}.self_attn.out_proj", True)
        self.layer_norm2 = _layer_norm(weights, f"{prefix}.layer_norm2", eps)
        self.fc1 = _linear(weights, f"{prefix}.mlp.fc1", True)
        self.fc2 = _linear(weights, f"{prefix}.mlp.fc2", True)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm1(hidden)
        hidden = hidden + self.out_proj(_attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), additive_mask,
                                                self.heads, self.width))
        x = self.layer_norm2(hidden)
        return hidden + self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionSlice(nn.Module):
    """One slice → `[1, query_num, hidden]`: SigLIP tower, post norm and the resampler in one program.

    Inputs (host-computed, see `host.vision_inputs`): `pixel_values` [1, 3, P, P*L] in MiniCPM's row-of-patches
    layout, zero past the slice's patches; `position_ids` [1, L] int32 (0 on padding); `patch_mask` [1, L] (1 on
    real patches); `key_positions` [1, L, hidden], the resampler's 2D sin-cos term of the slice's h x w grid.

    `tower` / `resampler` False leave that half out (its weights unread): `VisionTower` and `GroupResampler`, the
    two programs of a release whose resampler packs video frames, are the halves of this one under the same
    parameter names (so the converted weights keep their names).
    """

    def __init__(self, weights, max_patches: int, tower: bool = True, resampler: bool = True):
        super().__init__()
        config = weights.config
        vision = config.vision_config
        self.max_patches, self.patch, self.vision_width = max_patches, vision.patch_size, vision.hidden_size
        names = weights.names()
        if tower:
            layers = len({n.split(".")[3] for n in names if n.startswith("vpm.encoder.layers.")})
            conv = weights.tensor("vpm.embeddings.patch_embedding.weight").float()
            # The stride-P conv over the row of patches is one Linear on each flattened (channel, row, col) patch.
            self.patch_embedding = nn.Linear(conv[0].numel(), conv.shape[0])
            self.patch_embedding.weight.data.copy_(conv.reshape(conv.shape[0], -1))
            self.patch_embedding.bias.data.copy_(weights.tensor("vpm.embeddings.patch_embedding.bias").float())
            self.position_embedding = nn.Embedding.from_pretrained(
                weights.tensor("vpm.embeddings.position_embedding.weight").float())
            eps = vision.layer_norm_eps
            self.layers = nn.ModuleList(_VisionLayer(weights, f"vpm.encoder.layers.{i}", eps,
                                                     vision.num_attention_heads) for i in range(layers))
            self.post_layernorm = _layer_norm(weights, "vpm.post_layernorm", eps)
        if resampler:
            hidden = config.hidden_size
            self.hidden, self.resampler_heads = hidden, hidden // 128     # as MiniCPMV builds its Resampler
            self.kv_proj = (_linear(weights, "resampler.kv_proj", False) if "resampler.kv_proj.weight" in names
                            else nn.Identity())
            self.ln_kv = _layer_norm(weights, "resampler.ln_kv", 1e-6)
            self.ln_q = _layer_norm(weights, "resampler.ln_q", 1e-6)
            self.query = nn.Parameter(weights.tensor("resampler.query").float(), requires_grad=False)
            self.q_proj = _linear(weights, "resampler.attn.q_proj", True)
            self.k_proj = _linear(weights, "resampler.attn.k_proj", True)
            self.v_proj = _linear(weights, "resampler.attn.v_proj", True)
            self.out_proj = _linear(weights, "resampler.attn.out_proj", True)
            self.ln_post = _layer_norm(weights, "resampler.ln_post", 1e-6)
            self.proj = _linear(weights, "resampler.proj", False)

    def encode(self, pixel_values, position_ids, patch_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower: `[1, L, vision hidden]` after the post norm, and the additive key mask `[1, 1, 1, L]`."""
        patches = pixel_values.reshape(3, self.patch, self.max_patches, self.patch).permute(2, 0, 1, 3)
        hidden = self.patch_embedding(patches.reshape(1, self.max_patches, -1))
        hidden = hidden + self.position_embedding(position_ids)
        additive_mask = ((1.0 - patch_mask) * MASKED_SCORE).reshape(1, 1, 1, self.max_patches)
        for layer in self.layers:
            hidden = layer(hidden, additive_mask)
        return self.post_layernorm(hidden), additive_mask

    def resample(self, features, key_positions, additive_mask) -> torch.Tensor:
        """The resampler: 64 queries over the keys of `features` [1, K, vision hidden] → [1, query_num, hidden]."""
        features = self.ln_kv(self.kv_proj(features))
        query = self.ln_q(self.query).unsqueeze(0)
        out = _attend(self.q_proj(query), self.k_proj(features + key_positions), self.v_proj(features),
                      additive_mask, self.resampler_heads, self.hidden)
        return self.proj(self.ln_post(self.out_proj(out)))

    def forward(self, pixel_values, position_ids, patch_mask, key_positions) -> torch.Tensor:
        features, additive_mask = self.encode(pixel_values, position_ids, patch_mask)
        return self.resample(features, key_positions, additive_mask)


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
    the keys of all its frames, frame-major, in one sequence the 64 queries attend over.

    Inputs: `vision_features` [F, L, vision hidden] (the frames' `VisionTower` outputs), `key_positions`
    [F, L, hidden] (each frame's 2D sin-cos term plus its temporal term, host-computed) and `patch_mask` [F, L].
    F = 1 is an image slice (temporal term zero)."""

    def __init__(self, weights, max_patches: int):
        super().__init__(weights, max_patches, tower=False)

    def forward(self, vision_features, key_positions, patch_mask) -> torch.Tensor:
        additive_mask = ((1.0 - patch_mask) * MASKED_SCORE).reshape(1, 1, 1, -1)
        features = vision_features.reshape(1, -1, self.vision_width)
        return self.resample(features, key_positions.reshape(1, -1, self.hidden), additive_mask)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_normalize(x, eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class _DecoderLayer(nn.Module):
    def __init__(self, weights, prefix: str, shape: "DecoderShape"):
        super().__init__()
        self.shape = shape
        attention = f"{prefix}.self_attn"
        bias = weights.spec.qkv_bias
        self.q_proj = _linear(weights, f"{attention}.q_proj", bias)
        self.k_proj = _linear(weights, f"{attention}.k_proj", bias)
        self.v_proj = _linear(weights, f"{attention}.v_proj", bias)
        self.o_proj = _linear(weights, f"{attention}.o_proj", False)
        self.gate_proj = _linear(weights, f"{prefix}.mlp.gate_proj", False)
        self.up_proj = _linear(weights, f"{prefix}.mlp.up_proj", False)
        self.down_proj = _linear(weights, f"{prefix}.mlp.down_proj", False)
        names = set(weights.names())

        def norm(name: str) -> nn.Parameter | None:
            key = f"{prefix}.{name}.weight"
            return nn.Parameter(weights.tensor(key).float(), requires_grad=False) if key in names else None

        self.input_norm, self.post_norm = norm("input_layernorm"), norm("post_attention_layernorm")
        self.q_norm, self.k_norm = ((norm("self_attn.q_norm"), norm("self_attn.k_norm")) if weights.spec.qk_norm
                                    else (None, None))

    def forward(self, hidden, cos, sin, causal_mask, key_cache, value_cache, index: int, past, end):
        s = self.shape
        x = _rms_norm(hidden, self.input_norm, s.eps)
        q = self.q_proj(x).reshape(1, -1, s.heads, s.head_dim)
        k = self.k_proj(x).reshape(1, -1, s.kv_heads, s.head_dim)
        v = self.v_proj(x).reshape(1, -1, s.kv_heads, s.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = _rms_norm(q, self.q_norm, s.eps), _rms_norm(k, self.k_norm, s.eps)
        half = s.head_dim // 2
        q = _rotate(q.transpose(1, 2), cos, sin, half) * s.head_dim**-0.5
        k = _rotate(k.transpose(1, 2), cos, sin, half)
        # The new keys/values go into the state at [past, end); attention reads the whole [0, end).
        # Updates of the slice's full rank: a lower-rank one is traced as a reshape to the example's length.
        key_cache[index : index + 1, :, :, past:end, :] = k.to(key_cache.dtype)[None]
        value_cache[index : index + 1, :, :, past:end, :] = v.to(value_cache.dtype)[None]
        keys = key_cache[index : index + 1, :, :, :end, :].reshape(1, s.kv_heads, -1, s.head_dim)
        values = value_cache[index : index + 1, :, :, :end, :].reshape(1, s.kv_heads, -1, s.head_dim)
        # Grouped-query attention without repeating K/V (coremltools 9.0 drops SDPA's enable_gqa): the query heads
        # of one K/V head are stacked as rows, [1, kv_heads, repeat * S, head_dim], each group against its own
        # keys. Repeating the cache instead would copy it `repeat` times per layer and call (and, traced with the
        # dynamic length, cost ~10 KB of shape ops per layer in the program).
        repeat = s.heads // s.kv_heads
        grouped = q.reshape(1, s.kv_heads, -1, s.head_dim)
        scores = torch.matmul(grouped, keys.transpose(-1, -2).to(q.dtype)) + causal_mask.repeat(1, 1, repeat, 1)
        attended = torch.matmul(torch.softmax(scores, dim=-1), values.to(q.dtype)).reshape(1, s.heads, -1, s.head_dim)
        hidden = hidden + self.o_proj(attended.transpose(1, 2).reshape(1, -1, s.heads * s.head_dim))
        x = _rms_norm(hidden, self.post_norm, s.eps)
        return hidden + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderShape:
    def __init__(self, config, context: int, layers: int | None = None):
        self.layers = config.num_hidden_layers if layers is None else layers
        self.hidden = config.hidden_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.eps, self.context = config.rms_norm_eps, context
        self.vocab = config.vocab_size

    @property
    def cache_shape(self) -> tuple[int, ...]:
        return (self.layers, 1, self.kv_heads, self.context, self.head_dim)


def _linear_sources(module: nn.Module) -> dict[str, str]:
    """Weight name prefix in the converted program (coremltools names consts after the torch parameter path) →
    checkpoint module of that Linear."""
    return {f"{name.replace('.', '_')}_weight": linear.mcq_source for name, linear in module.named_modules()
            if isinstance(linear, nn.Linear) and hasattr(linear, "mcq_source")}


class StatefulDecoder(nn.Module):
    """Decoder layers `layers` (a range of the LLM's) with their KV cache as two state buffers (`key_cache`,
    `value_cache`, one entry per layer of the range), updated in place. The LLM is converted as several of these,
    a few layers each, so that one chunk is traced and converted at a time (memory does not grow with depth).

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
        self.layers = nn.ModuleList(_DecoderLayer(weights, f"llm.model.layers.{i}", shape) for i in layers)
        self.register_buffer("key_cache", torch.zeros(shape.cache_shape, dtype=torch.float16))
        self.register_buffer("value_cache", torch.zeros(shape.cache_shape, dtype=torch.float16))

    def forward(self, hidden_states, position_cos, position_sin, causal_mask) -> torch.Tensor:
        end = causal_mask.shape[-1]
        past = end - hidden_states.shape[1]
        hidden = hidden_states
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, position_cos, position_sin, causal_mask, self.key_cache, self.value_cache, index,
                           past, end)
        return hidden

    def linear_sources(self) -> dict[str, str]:
        return _linear_sources(self)


class DecoderHead(nn.Module):
    """The final norm and the LM head: hidden states [1, S, hidden] → logits [1, S, vocab]."""

    def __init__(self, weights):
        super().__init__()
        self.eps = weights.config.rms_norm_eps
        self.norm = nn.Parameter(weights.tensor("llm.model.norm.weight").float(), requires_grad=False)
        head = "llm.lm_head" if "llm.lm_head.weight" in weights.names() else "llm.model.embed_tokens"
        self.lm_head = _linear(weights, head, False)

    def forward(self, hidden_states) -> torch.Tensor:
        return self.lm_head(_rms_norm(hidden_states, self.norm, self.eps))

    def linear_sources(self) -> dict[str, str]:
        return _linear_sources(self)


class EmbedTokens(nn.Module):
    """`input_ids` [1, S] int32 → text embeddings [1, S, hidden], times the version's `scale_emb` (4.0) — its own
    small package, so the app can write image features over the placeholder rows before calling the decoder."""

    def __init__(self, weights):
        super().__init__()
        table = weights.tensor("llm.model.embed_tokens.weight").float()
        scale = embedding_scale(weights.config)
        self.embed_tokens = nn.Embedding.from_pretrained(table * scale if scale != 1.0 else table)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)
