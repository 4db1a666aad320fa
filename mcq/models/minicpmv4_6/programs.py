"""MiniCPM-V 4.6 as runtime-neutral torch programs: plain modules built tensor by tensor from an `ExportWeights`,
for the exporters that trace them: ONNX (`torch.onnx.export`, every piece of state an explicit input and output)
and Core ML (`torch.jit.trace`: the same layers, the decoder's state in buffers, `StatefulDecoder`). Sizes come
from the config, never from a traced tensor's shape (Core ML's converter rejects those on dynamic axes).

- `VisionSlice`: one image (an overview or a slice of `h x w` patches, L = h * w) → its L / 16 LLM tokens: SigLIP
  embeddings, the encoder layers with the window-attention `vit_merger` after layer `insert_layer_id`, the
  post-layernorm and the downsampling `merger`. What transformers computes from `target_sizes` with data-dependent
  code (nearest-neighbour position ids, the vit_merger's window order, the 2 x 2 merge orders) comes in as index
  inputs, computed on the host by `vision_indices` with transformers' own functions. A checkpoint in
  `downsample_mode` 4x has `VisionSlice4x` instead: no vit_merger, the merger over the full grid, L / 4 tokens.
  Core ML traces it whole; the ONNX vision graph is traced in pieces (`VisionEmbeddings`, one SigLIP layer, the
  vit_merger as a layer of its own kind, `VisionHead`) and joined layer by layer.
- `EmbedTokens`: input_ids → inputs_embeds.
- the decoder: the Qwen3.5 hybrid LLM on `inputs_embeds` with explicit state, one graph for prefill (zero /
  empty state) and decode, traced in pieces (`DecoderPrologue`, a `DecoderLayerStep` of each layer kind,
  `DecoderHead`) and joined layer by layer. Per full-attention layer i: `past_key_values.{i}.key` / `.value`
  `[batch, kv_heads, past, head_dim]` → `present.{i}.key` / `.value` (past + new positions). Per linear-attention
  (Gated DeltaNet) layer i: `past_conv.{i}` `[batch, conv_dim, kernel - 1]`, the causal conv1d's last kernel - 1
  inputs (q, k and v projections before the conv) → `present_conv.{i}`, and `past_recurrent.{i}`
  `[batch, value_heads, key_head_dim, value_head_dim]`, the delta rule's state → `present_recurrent.{i}`; both are
  zeros before the first token. The recurrence runs as torch's `scan` over the new positions (an ONNX `Scan`), so
  one program takes a prefill of any length and a one-token decode alike.

The math is transformers 5.17's (`modeling_minicpmv4_6`, `modeling_qwen3_5`), in float32: the recurrent form of the
gated delta rule (`torch_recurrent_gated_delta_rule`, which its chunked prefill computes in another order).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mcq.errors import McqError

from ..familyspec import LayeredProgram, Programs, StateTensor, TracedProgram
from ..traceable import (ROTARY_AND_MASK, LayerNorm, TransposedLinear, causal_padding_mask, checkpoint_parameter,
                         layered_decoder, layout_graphs, linear, named_parameter, rms_normalize, rotary_terms,
                         transposed_linear)
from .calibration import VISUALS, merged_tokens_divisor
from .chat import export_chat_inputs

LLM = "model.language_model"
TOWER = "model.vision_tower"


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, additive_mask=None) -> torch.Tensor:
    """softmax(q k^T * scale (+ mask)) v over the last two axes (eager attention, float32 softmax)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if additive_mask is not None:
        scores = scores + additive_mask
    return torch.matmul(torch.softmax(scores, dim=-1), v)


# -- vision ---------------------------------------------------------------------------------------------------------

class _VisionAttention(nn.Module):
    """SigLIP attention over groups of tokens: `[groups, tokens, width]` → same; each group attends within itself.
    `group`: the tokens per group, or None for one group of them all (the tower's layers: `[1, L, width]`).

    Shapes come from python ints (the config's and `group`), never from a traced tensor's `shape`: torch.jit.trace
    turns those into `int` ops that the Core ML converter cannot take on a dynamic axis."""

    def __init__(self, weights, prefix: str, heads: int, width: int, group: int | None = None):
        super().__init__()
        self.heads, self.head_dim, self.width = heads, width // heads, width
        self.groups, self.tokens = (1, -1) if group is None else (-1, group)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            linear(weights, f"{prefix}.{name}", True) for name in ("q_proj", "k_proj", "v_proj", "out_proj"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def split(t):
            return t.reshape(self.groups, self.tokens, self.heads, self.head_dim).transpose(1, 2)

        out = _attend(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), self.head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(self.groups, self.tokens, self.width))


class _VisionLayer(nn.Module):
    def __init__(self, weights, prefix: str, vision):
        super().__init__()
        eps = vision.layer_norm_eps
        self.layer_norm1 = LayerNorm(weights, f"{prefix}.layer_norm1", eps)
        self.self_attn = _VisionAttention(weights, f"{prefix}.self_attn", vision.num_attention_heads,
                                          vision.hidden_size)
        self.layer_norm2 = LayerNorm(weights, f"{prefix}.layer_norm2", eps)
        self.fc1 = linear(weights, f"{prefix}.mlp.fc1", True)
        self.fc2 = linear(weights, f"{prefix}.mlp.fc2", True)
        self.approximate = "tanh" if vision.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.fc2(F.gelu(self.fc1(self.layer_norm2(hidden)), approximate=self.approximate))


class _WindowMerger(nn.Module):
    """The vit_merger: attention inside each 2 x 2 window, then each window's 4 tokens → 1 (MLP + their mean)."""

    def __init__(self, weights, prefix: str, vision):
        super().__init__()
        eps = vision.layer_norm_eps
        self.layer_norm1 = LayerNorm(weights, f"{prefix}.layer_norm1", eps)
        self.window = vision.window_kernel_size[0] * vision.window_kernel_size[1]
        self.self_attn = _VisionAttention(weights, f"{prefix}.self_attn", vision.num_attention_heads,
                                          vision.hidden_size, self.window)
        self.pre_norm = LayerNorm(weights, f"{prefix}.pre_norm", eps)
        self.linear_1 = linear(weights, f"{prefix}.linear_1", True)
        self.linear_2 = linear(weights, f"{prefix}.linear_2", True)
        self.width = vision.hidden_size

    def forward(self, hidden, window_index, window_inverse, merge_order) -> torch.Tensor:
        """`[1, L, width]` and the window tables → `[1, L / window², width]`."""
        width, hidden = self.width, hidden[0]
        windows = self.layer_norm1(hidden)[window_index].reshape(-1, self.window, width)
        hidden = hidden + self.self_attn(windows).reshape(-1, width)[window_inverse]
        grouped = hidden[merge_order].reshape(-1, self.window, width)
        merged = self.linear_2(F.gelu(self.linear_1(self.pre_norm(grouped.reshape(-1, self.window * width))),
                                      approximate="tanh"))
        return (merged + grouped.mean(dim=1))[None]


class VisionSlice(nn.Module):
    """One image → `[L / 16, llm_hidden]` (see the module doc). Inputs: `pixel_values` `[1, 3, P, P * L]` (the
    processor's row of patches), and the host's `vision_indices`: `position_ids` `[L]`, `window_index` and
    `window_inverse` `[L]` (the vit_merger's window order and its inverse), `merge_order` `[L]` (each 2 x 2 block's
    tokens consecutive, for the vit_merger's merge) and `merger_order` `[L / 4]` (the same on the merged grid)."""

    def __init__(self, weights):
        super().__init__()
        config = weights.config
        vision = config.vision_config
        if config.merger_times != 1 or vision.insert_layer_id < 0:
            raise McqError("the ONNX and Core ML exports of MiniCPM-V 4.6 follow the release's vision path "
                           "(merger_times 1, a vit_merger); this checkpoint differs")
        self.patch, self.width, self.channels = vision.patch_size, vision.hidden_size, vision.num_channels
        conv = f"{TOWER}.embeddings.patch_embedding"
        weight = weights.tensor(f"{conv}.weight")
        # The stride-P conv over the row of patches is one Linear on each flattened (channel, row, col) patch.
        self.patch_embedding = transposed_linear(weight.reshape(weight.shape[0], -1), weights.tensor(f"{conv}.bias"),
                                                 conv)
        self.position_embedding = checkpoint_parameter(weights, f"{TOWER}.embeddings.position_embedding.weight")
        self.layers = nn.ModuleList(_VisionLayer(weights, f"{TOWER}.encoder.layers.{i}", vision)
                                    for i in range(vision.num_hidden_layers))
        self.insert_layer_id = vision.insert_layer_id
        self.vit_merger = _WindowMerger(weights, f"{TOWER}.vit_merger", vision) if _windowed(config) else None
        self.post_layernorm = LayerNorm(weights, f"{TOWER}.post_layernorm", vision.layer_norm_eps)
        self.merge = config.merge_kernel_size[0] * config.merge_kernel_size[1]
        self.pre_norm = LayerNorm(weights, "model.merger.mlp.0.pre_norm", 1e-6)
        self.linear_1 = linear(weights, "model.merger.mlp.0.linear_1", True)
        self.linear_2 = linear(weights, "model.merger.mlp.0.linear_2", True)

    def forward(self, pixel_values, position_ids, window_index, window_inverse, merge_order, merger_order):
        windows = (window_index, window_inverse, merge_order)
        return _merge_tokens(self, self._encoded(pixel_values, position_ids, windows), merger_order)

    def _encoded(self, pixel_values, position_ids, windows) -> torch.Tensor:
        """The tower's output `[1, tokens, width]` before its post norm: through the vit_merger after layer
        `insert_layer_id` where `windows` gives its index tables, past it otherwise."""
        hidden = _embed_patches(self, pixel_values, position_ids)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if index == self.insert_layer_id and windows is not None:
                hidden = self.vit_merger(hidden, *windows)
        return hidden


def _embed_patches(tower, pixel_values, position_ids) -> torch.Tensor:
    """`[1, L, width]`: the patch embeddings of a row of patches plus their position embeddings."""
    channels, patch = tower.channels, tower.patch
    patches = pixel_values.reshape(channels, patch, -1, patch).permute(2, 0, 1, 3)
    return tower.patch_embedding(patches.reshape(1, -1, channels * patch * patch)) + \
        tower.position_embedding[position_ids]


def _merge_tokens(vision, hidden, merger_order) -> torch.Tensor:
    """The tower's output `[1, tokens, width]` → its LLM tokens: the post norm, then the merger over each 2 x 2
    block (`merger_order`)."""
    merged = vision.pre_norm(vision.post_layernorm(hidden[0])[merger_order].reshape(-1, vision.merge * vision.width))
    return vision.linear_2(F.gelu(vision.linear_1(merged)))


class VisionEmbeddings(nn.Module):
    """The ONNX vision graph's prologue: `VisionSlice`'s inputs but `merger_order` → patch_embeddings `[1, L,
    width]`. The window tables pass through as graph inputs, which the vit_merger's piece reads."""

    def __init__(self, vision: VisionSlice):
        super().__init__()
        self.channels, self.patch = vision.channels, vision.patch
        self.patch_embedding, self.position_embedding = vision.patch_embedding, vision.position_embedding

    def forward(self, pixel_values, position_ids, *window_tables) -> torch.Tensor:
        return _embed_patches(self, pixel_values, position_ids)


class VisionHead(nn.Module):
    """The ONNX vision graph's head: (the tower's last output `[1, tokens, width]`, merger_order) → image_features."""

    def __init__(self, vision: VisionSlice):
        super().__init__()
        self.merge, self.width = vision.merge, vision.width
        self.post_layernorm, self.pre_norm = vision.post_layernorm, vision.pre_norm
        self.linear_1, self.linear_2 = vision.linear_1, vision.linear_2

    def forward(self, hidden_states, merger_order) -> torch.Tensor:
        return _merge_tokens(self, hidden_states, merger_order)


class VisionSlice4x(VisionSlice):
    """`downsample_mode` 4x: the tower without its vit_merger, the merger over the full grid, so an image keeps 4x
    the tokens (`[L / 4, llm_hidden]`), as transformers' `get_image_features` computes it. Inputs: `pixel_values`,
    `position_ids` and `merger_order` `[L]`."""

    def forward(self, pixel_values, position_ids, merger_order):
        return _merge_tokens(self, self._encoded(pixel_values, position_ids, None), merger_order)


def _windowed(config) -> bool:
    """Whether the checkpoint's images go through the vit_merger (`downsample_mode` 16x, the release's)."""
    return config.downsample_mode != "4x"


def vision_indices(height: int, width: int, config) -> dict[str, torch.Tensor]:
    """The vision program's index inputs for an image of `height x width` patches, from transformers' own
    functions: `VisionSlice`'s, or in `downsample_mode` 4x `VisionSlice4x`'s."""
    from transformers.vision_utils import get_vision_nearest_position_ids, get_vision_window_index

    vision = config.vision_config
    sizes = torch.tensor([[height, width]])
    position_ids = get_vision_nearest_position_ids(sizes, vision.image_size // vision.patch_size).long()
    merge = config.merge_kernel_size[0]
    if not _windowed(config):
        if height % merge or width % merge:
            raise McqError(f"an image of {height} x {width} patches: MiniCPM-V 4.6's merger takes sides that are "
                           f"multiples of {merge}")
        return {"position_ids": position_ids, "merger_order": _block_order(height, width, merge)}
    window = vision.window_kernel_size[0]
    window_index, bounds = get_vision_window_index(F.pad(sizes, (1, 0), value=1), spatial_merge_size=1,
                                                   window_size=window, patch_size=1)
    # The graph attends within consecutive runs of window² tokens; transformers' windows are those when both sides
    # are even, which the processor's sizes (multiples of 4, for the two merges) always are.
    if height % (2 * window) or width % (2 * window) or bool((bounds.diff() != window * window).any()):
        raise McqError(f"an image of {height} x {width} patches: MiniCPM-V 4.6's processor gives sides that are "
                       f"multiples of {2 * window}")
    return {"position_ids": position_ids, "window_index": window_index.long(),
            "window_inverse": torch.argsort(window_index).long(),
            "merge_order": _block_order(height, width, window), "merger_order": _block_order(
                height // window, width // window, merge)}


def _block_order(height: int, width: int, block: int) -> torch.Tensor:
    """The order that makes each `block x block` tile of a row-major `height x width` grid consecutive (tiles
    row-major, tokens row-major within a tile): the view/permute both of 4.6's merges apply."""
    grid = torch.arange(height * width).view(height // block, block, width // block, block)
    return grid.permute(0, 2, 1, 3).reshape(-1)


# -- text -----------------------------------------------------------------------------------------------------------

class EmbedTokens(nn.Module):
    def __init__(self, weights):
        super().__init__()
        self.table = checkpoint_parameter(weights, f"{LLM}.embed_tokens.weight")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 1.0) -> torch.Tensor:
    """Qwen3.5's RMSNorm: scales by 1 + weight (`offset` 0: by weight); fp16-safe for Core ML (`rms_normalize`)."""
    return rms_normalize(x, eps) * (offset + weight)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary: int) -> torch.Tensor:
    """Rotary embedding on the first `rotary` channels (cos and sin's width: partial rotary), the rest passed
    through."""
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    half = rotary // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def rotary_dim(text) -> int:
    """The channels of each head that rotary embedding turns (Qwen3.5: a quarter), as transformers computes it."""
    return int(text.head_dim * text.rope_parameters.get("partial_rotary_factor", 1.0))


class _FullAttention(nn.Module):
    """Gated full attention. `project` gives the new positions' query, key, value and output gate; `attend` the
    output over the keys and values of every visible position (the cache's and the new ones): the ONNX step
    concatenates them (`forward`), the Core ML chunk writes the new ones into its state first."""

    def __init__(self, weights, prefix: str, text):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
        self.eps, self.rotary = text.rms_norm_eps, rotary_dim(text)
        bias = text.attention_bias
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            linear(weights, f"{prefix}.{name}", bias) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.q_norm = checkpoint_parameter(weights, f"{prefix}.q_norm.weight")
        self.k_norm = checkpoint_parameter(weights, f"{prefix}.k_norm.weight")

    def project(self, x, cos, sin):
        """x `[B, S, hidden]` → query `[B, heads, S, head_dim]`, key and value `[B, kv_heads, S, head_dim]`, gate
        `[B, S, heads * head_dim]`."""
        query, gate = torch.chunk(self.q_proj(x).unflatten(-1, (self.heads, self.head_dim * 2)), 2, dim=-1)
        gate = gate.flatten(2)
        query = _rms_norm(query, self.q_norm, self.eps).transpose(1, 2)
        key = _rms_norm(self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)), self.k_norm, self.eps)
        key = key.transpose(1, 2)
        value = self.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        return _rotate(query, cos, sin, self.rotary), _rotate(key, cos, sin, self.rotary), value, gate

    def attend(self, query, key, value, additive_mask, gate):
        """Grouped-query attention without copies of the keys and values: the query heads of one key/value head are
        stacked as rows, `[B, kv_heads, groups * S, head_dim]`, each block against its own keys."""
        groups = self.heads // self.kv_heads
        # flatten / unflatten rather than reshapes to sizes read from a shape, which a traced Core ML program
        # cannot take (see `_VisionAttention`).
        stacked = query.unflatten(1, (self.kv_heads, groups)).flatten(2, 3)
        out = _attend(stacked, key, value, self.head_dim ** -0.5, additive_mask.repeat(1, 1, groups, 1))
        out = out.unflatten(2, (groups, -1)).flatten(1, 2).transpose(1, 2)
        return self.o_proj(out.flatten(2) * torch.sigmoid(gate))

    def forward(self, x, cos, sin, additive_mask, past_key, past_value):
        query, key, value, gate = self.project(x, cos, sin)
        key = torch.cat([past_key, key], dim=2)
        value = torch.cat([past_value, value], dim=2)
        return self.attend(query, key, value, additive_mask, gate), key, value


def _delta_rule_step(state, step):
    """One token of the gated delta rule (transformers' `torch_recurrent_gated_delta_rule` loop body)."""
    query, key, value, decay, beta = step
    state = state * decay.exp()[..., None, None]
    memory = (state * key[..., None]).sum(dim=-2)
    delta = (value - memory) * beta[..., None]
    state = state + key[..., None] * delta[..., None, :]
    return state, (state * query[..., None]).sum(dim=-2)


class _LinearAttention(nn.Module):
    """Gated DeltaNet with its conv and recurrent state in and out: over any number of new positions (`forward`, the
    recurrence as a scan), or over exactly one (`step`: the conv as one weighted sum and one delta-rule update, plain
    ops for exporters without loops: Core ML)."""

    def __init__(self, weights, prefix: str, text):
        super().__init__()
        self.k_heads, self.v_heads = text.linear_num_key_heads, text.linear_num_value_heads
        self.k_dim, self.v_dim = text.linear_key_head_dim, text.linear_value_head_dim
        self.eps = text.rms_norm_eps
        self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.out_proj = (
            linear(weights, f"{prefix}.{name}", False)
            for name in ("in_proj_qkv", "in_proj_z", "in_proj_b", "out_proj"))
        # dt_bias is in_proj_a's bias in all but name, and held as one: the Core ML converter fuses a Linear with the
        # add after it, renaming its weight, which `--from`'s stored levels are matched by.
        weight_t = weights.tensor(f"{prefix}.in_proj_a.weight").t().contiguous()
        self.in_proj_a = TransposedLinear(named_parameter(weight_t, f"{prefix}.in_proj_a.weight"),
                                          checkpoint_parameter(weights, f"{prefix}.dt_bias"))
        self.conv = checkpoint_parameter(weights, f"{prefix}.conv1d.weight")   # [conv_dim, 1, kernel]
        self.A_log = checkpoint_parameter(weights, f"{prefix}.A_log")
        self.norm = checkpoint_parameter(weights, f"{prefix}.norm.weight")

    def _heads(self, mixed):
        """The conv's output `[B, S, conv_dim]` → per-head normalized query, key `[B, S, v_heads, k_dim]` and value
        `[B, S, v_heads, v_dim]`."""
        keys = self.k_heads * self.k_dim
        query, key, value = torch.split(mixed, [keys, keys, self.v_heads * self.v_dim], dim=-1)
        query = query.unflatten(-1, (self.k_heads, self.k_dim))
        key = key.unflatten(-1, (self.k_heads, self.k_dim))
        value = value.unflatten(-1, (self.v_heads, self.v_dim))
        if self.v_heads != self.k_heads:
            # Each query/key head serves v_heads // k_heads consecutive value heads.
            query = query.repeat_interleave(self.v_heads // self.k_heads, dim=2)
            key = key.repeat_interleave(self.v_heads // self.k_heads, dim=2)
        query = query * torch.rsqrt((query * query).sum(-1, keepdim=True) + 1e-6) * self.k_dim ** -0.5
        key = key * torch.rsqrt((key * key).sum(-1, keepdim=True) + 1e-6)
        return query, key, value

    def _gates(self, x):
        """The delta rule's write strength beta and log decay (<= 0), `[B, S, v_heads]` each."""
        return torch.sigmoid(self.in_proj_b(x)), -self.A_log.exp() * F.softplus(self.in_proj_a(x))

    def _output(self, out, x):
        """The recurrence's output `[B, S, v_heads, v_dim]` through the gated RMSNorm and out_proj."""
        z = self.in_proj_z(x).unflatten(-1, (self.v_heads, self.v_dim))
        out = _rms_norm(out, self.norm, self.eps, offset=0.0) * F.silu(z)
        return self.out_proj(out.flatten(2))

    def forward(self, x, mask, past_conv, past_recurrent):
        x = x * mask[:, :, None]                    # padding positions add nothing (apply_mask_to_padding_states)
        mixed = torch.cat([past_conv, self.in_proj_qkv(x).transpose(1, 2)], dim=-1)
        present_conv = mixed[:, :, -(self.conv.shape[-1] - 1):]
        mixed = F.silu(F.conv1d(mixed, self.conv, groups=mixed.shape[1])).transpose(1, 2)
        query, key, value = self._heads(mixed)
        beta, decay = self._gates(x)
        steps = tuple(t.transpose(0, 1) for t in (query, key, value, decay, beta))   # time first
        present_recurrent, out = _scan(_delta_rule_step, past_recurrent, steps)
        return self._output(out.transpose(0, 1), x), present_conv, present_recurrent

    def step(self, x, past_conv, past_recurrent):
        """One new position (x `[B, 1, hidden]`) → (output, conv state, recurrent state), as `forward` gives them."""
        mixed = torch.cat([past_conv, self.in_proj_qkv(x).transpose(1, 2)], dim=-1)     # [B, conv_dim, kernel]
        present_conv = mixed[:, :, 1:]
        mixed = F.silu((mixed * self.conv[:, 0]).sum(-1))[:, None]                       # [B, 1, conv_dim]
        query, key, value = self._heads(mixed)
        beta, decay = self._gates(x)
        present_recurrent, out = _delta_rule_step(
            past_recurrent, (query[:, 0], key[:, 0], value[:, 0], decay[:, 0], beta[:, 0]))
        return self._output(out[:, None], x), present_conv, present_recurrent


def _scan(step, init, xs):
    from torch._higher_order_ops.scan import scan

    return scan(step, init, xs)


class _DecoderLayer(nn.Module):
    def __init__(self, weights, prefix: str, text, kind: str):
        super().__init__()
        self.kind, self.eps = kind, text.rms_norm_eps
        self.input_layernorm = checkpoint_parameter(weights, f"{prefix}.input_layernorm.weight")
        self.post_attention_layernorm = checkpoint_parameter(weights, f"{prefix}.post_attention_layernorm.weight")
        self.mixer = (_FullAttention(weights, f"{prefix}.self_attn", text) if kind == "full_attention"
                      else _LinearAttention(weights, f"{prefix}.linear_attn", text))
        self.gate_proj, self.up_proj, self.down_proj = (
            linear(weights, f"{prefix}.mlp.{name}", False) for name in ("gate_proj", "up_proj", "down_proj"))

    def feed_forward(self, hidden):
        """The MLP half of the layer, residual included."""
        x = _rms_norm(hidden, self.post_attention_layernorm, self.eps)
        return hidden + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, hidden, cos, sin, additive_mask, mask, state):
        x = _rms_norm(hidden, self.input_layernorm, self.eps)
        if self.kind == "full_attention":
            out, *state = self.mixer(x, cos, sin, additive_mask, *state)
        else:
            out, *state = self.mixer(x, mask, *state)
        return self.feed_forward(hidden + out), state


def decoder_state(config) -> list[StateTensor]:
    """The decoder's state inputs in order (see the module doc); the batch is axis 0, a KV cache's past axis 2."""
    text = config.text_config
    states = []
    conv_dim = 2 * text.linear_num_key_heads * text.linear_key_head_dim + \
        text.linear_num_value_heads * text.linear_value_head_dim
    for i, kind in enumerate(text.layer_types):
        if kind == "full_attention":
            shape = (None, text.num_key_value_heads, None, text.head_dim)
            states += [StateTensor(f"past_key_values.{i}.key", f"present.{i}.key", shape),
                       StateTensor(f"past_key_values.{i}.value", f"present.{i}.value", shape)]
        elif kind == "linear_attention":
            states += [StateTensor(f"past_conv.{i}", f"present_conv.{i}",
                                  (None, conv_dim, text.linear_conv_kernel_dim - 1)),
                       StateTensor(f"past_recurrent.{i}", f"present_recurrent.{i}",
                                  (None, text.linear_num_value_heads, text.linear_key_head_dim,
                                   text.linear_value_head_dim))]
        else:
            raise McqError(f"LLM layer {i} is of kind {kind!r}, which the ONNX and Core ML exports of MiniCPM-V 4.6 "
                           "do not know")
    return states


class DecoderPrologue(nn.Module):
    """What every layer of the ONNX decoder reads (module doc): (inputs_embeds `[B, S, hidden]`, attention_mask
    `[B, past + S]`, position_ids `[B, S]`) → the rotary terms `[B, 1, S, rotary]`, the additive causal and padding
    mask `[B, 1, S, past + S]` (full attention) and the new positions' padding mask `[B, S]` (linear attention)."""

    def __init__(self, text):
        super().__init__()
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

        rotary = Qwen3_5TextRotaryEmbedding(text)
        self.register_buffer("inv_freq", rotary.inv_freq.float(), persistent=False)
        self.rotary_scale = float(rotary.attention_scaling)

    def forward(self, inputs_embeds, attention_mask, position_ids):
        length = inputs_embeds.shape[1]
        cos, sin = rotary_terms(position_ids, self.inv_freq, self.rotary_scale)
        additive_mask = causal_padding_mask(attention_mask, length, inputs_embeds.device)
        return cos, sin, additive_mask, attention_mask[:, -length:].to(inputs_embeds.dtype)


class DecoderLayerStep(nn.Module):
    """Decoder layer `index` of the ONNX decoder with its two states explicit (module doc): (hidden_states, cos,
    sin, additive_mask, mask, its two states in) → (hidden_states, its two states out)."""

    def __init__(self, weights, index: int):
        super().__init__()
        text = weights.config.text_config
        self.layer = _DecoderLayer(weights, f"{LLM}.layers.{index}", text, text.layer_types[index])

    def forward(self, hidden, cos, sin, additive_mask, mask, first_state, second_state):
        hidden, state = self.layer(hidden, cos, sin, additive_mask, mask, (first_state, second_state))
        return (hidden, *state)


class StatefulDecoder(nn.Module):
    """Decoder layers `layers` (a range of the LLM's) for one new position per call, their state in buffers updated
    in place (what Core ML keeps as the package's states, fp16): `key_cache` / `value_cache`
    `[full-attention layers, 1, kv_heads, context, head_dim]`, `conv_state` `[linear-attention layers, 1, conv_dim,
    kernel - 1]`, `recurrent_state` `[linear-attention layers, 1, v_heads, k_dim, v_dim]`, each present only where
    the range has a layer of its kind (`state_names`).

    One position per call because the delta rule over several positions is a loop (`forward`'s scan), which a
    traced Core ML program cannot hold on a dynamic length: a prefill is one call per token.

    Inputs: `hidden_states` `[1, 1, hidden]`, `position_cos` / `position_sin` `[1, 1, 1, rotary]` (the position's
    rotary terms, host-computed in float32), `causal_mask` `[1, 1, 1, E]` with E the positions cached after the call
    (0 where the query may attend); the call writes position E - 1 of the KV cache and returns the hidden states
    after the range's last layer.
    """

    def __init__(self, weights, layers: range, context: int):
        super().__init__()
        text = weights.config.text_config
        self.layers = nn.ModuleList(_DecoderLayer(weights, f"{LLM}.layers.{i}", text, text.layer_types[i])
                                    for i in layers)
        self.eps, self.rotary = text.rms_norm_eps, rotary_dim(text)
        self.kv_heads, self.head_dim = text.num_key_value_heads, text.head_dim
        shapes = {state.name: state.shape for state in decoder_state(weights.config)}
        full = [i for i in layers if text.layer_types[i] == "full_attention"]
        linear = [i for i in layers if text.layer_types[i] == "linear_attention"]
        # Each layer's index into the state buffer of its kind.
        self.slots = [full.index(i) if i in full else linear.index(i) for i in layers]
        self.state_names = []
        if full:
            cache = (len(full), 1, self.kv_heads, context, self.head_dim)
            self._state("key_cache", cache)
            self._state("value_cache", cache)
        if linear:
            self._state("conv_state", (len(linear), 1, *shapes[f"past_conv.{linear[0]}"][1:]))
            self._state("recurrent_state", (len(linear), 1, *shapes[f"past_recurrent.{linear[0]}"][1:]))

    def _state(self, name: str, shape: tuple[int, ...]) -> None:
        self.register_buffer(name, torch.zeros(shape, dtype=torch.float16))
        self.state_names.append(name)

    def forward(self, hidden_states, position_cos, position_sin, causal_mask) -> torch.Tensor:
        end = causal_mask.shape[-1]
        past = end - 1
        hidden = hidden_states
        for layer, slot in zip(self.layers, self.slots):
            x = _rms_norm(hidden, layer.input_layernorm, self.eps)
            mixer = layer.mixer
            if layer.kind == "full_attention":
                query, key, value, gate = mixer.project(x, position_cos, position_sin)
                # Updates of the slice's full rank: a lower-rank one is traced as a reshape to the example's length.
                self.key_cache[slot:slot + 1, :, :, past:end, :] = key.to(self.key_cache.dtype)[None]
                self.value_cache[slot:slot + 1, :, :, past:end, :] = value.to(self.value_cache.dtype)[None]
                keys = self.key_cache[slot:slot + 1, :, :, :end, :].reshape(1, self.kv_heads, -1, self.head_dim)
                values = self.value_cache[slot:slot + 1, :, :, :end, :].reshape(1, self.kv_heads, -1, self.head_dim)
                out = mixer.attend(query, keys.to(query.dtype), values.to(query.dtype), causal_mask, gate)
            else:
                conv, recurrent = self.conv_state[slot], self.recurrent_state[slot]
                out, conv, recurrent = mixer.step(x, conv.to(x.dtype), recurrent.to(x.dtype))
                self.conv_state[slot:slot + 1] = conv.to(self.conv_state.dtype)[None]
                self.recurrent_state[slot:slot + 1] = recurrent.to(self.recurrent_state.dtype)[None]
            hidden = layer.feed_forward(hidden + out)
        return hidden


class DecoderHead(nn.Module):
    """The final norm and the LM head: hidden states `[1, S, hidden]` → logits `[1, S, vocab]`."""

    def __init__(self, weights):
        super().__init__()
        self.norm = checkpoint_parameter(weights, f"{LLM}.norm.weight")
        self.eps = weights.config.text_config.rms_norm_eps
        self.lm_head = linear(weights, f"{LLM}.embed_tokens" if weights.config.tie_word_embeddings else "lm_head",
                               False)

    def forward(self, hidden_states) -> torch.Tensor:
        return self.lm_head(_rms_norm(hidden_states, self.norm, self.eps))


# -- the programs as the ONNX layout traces them ---------------------------------------------------------------------

def _vision_program(weights) -> TracedProgram:
    """The vision program whole: one image → its LLM tokens (Core ML traces it as one)."""
    config = weights.config
    patch = config.vision_config.patch_size
    height, width = 8, 4     # an example image; every size whose sides are multiples of 4 takes the same program
    example = {"pixel_values": torch.zeros(1, 3, patch, patch * height * width),
               **vision_indices(height, width, config)}
    names = tuple(example)
    # In 4x the merger's order spans every patch (no vit_merger before it), and an image keeps a quarter of them.
    patches_per_token = 16 if _windowed(config) else 4
    axes = {"pixel_values": {3: "patch_columns"}, "position_ids": {0: "patches"}, "window_index": {0: "patches"},
            "window_inverse": {0: "patches"}, "merge_order": {0: "patches"},
            "merger_order": {0: "merged_patches" if _windowed(config) else "patches"},
            "image_features": {0: "image_tokens"}}
    # An image's patches: the processor's slices and overview stay near 448 x 448 pixels (32 x 32 patches of 14),
    # long sides to 4x that; the vision config's image_size bounds the position table.
    side = config.vision_config.image_size // patch
    bounds = {"patches": (16, side * side), "patch_columns": (16 * patch, side * side * patch),
              "merged_patches": (4, side * side // 4), "image_tokens": (1, side * side // patches_per_token)}
    module = VisionSlice(weights) if _windowed(config) else VisionSlice4x(weights)
    return TracedProgram(module.eval(), tuple(example.values()), names, ("image_features",),
                         tuple({axis: torch.export.Dim.DYNAMIC for axis in axes[name]} for name in names),
                         {name: axes[name] for name in (*names, "image_features")}, bounds)


def _layered_vision_program(weights) -> LayeredProgram:
    """The ONNX vision graph in pieces, joined layer by layer: `VisionEmbeddings`, one traced SigLIP layer (and the
    vit_merger, a layer of its own kind after layer `insert_layer_id`), `VisionHead`. The graph's inputs, outputs
    and axes are the whole program's."""
    whole = _vision_program(weights)
    vision, example = whole.module, dict(zip(whole.inputs, whole.example))
    merger_at = None if vision.vit_merger is None else vision.insert_layer_id + 1
    hidden = torch.zeros(1, len(example["position_ids"]), vision.width)
    axes = {**whole.axes, "patch_embeddings": {1: "patches"}, "hidden_states": {1: "patches"},
            "layer_output": {1: "patches"}}

    def program(module: nn.Module, inputs: tuple[str, ...], values: tuple, outputs: tuple[str, ...]) -> TracedProgram:
        return TracedProgram(module.eval(), values, inputs, outputs,
                             tuple({axis: torch.export.Dim.DYNAMIC for axis in axes[name]} for name in inputs), axes)

    tower_inputs = whole.inputs[:-1]       # all but merger_order, the head's
    prologue = program(VisionEmbeddings(vision), tower_inputs, tuple(example[name] for name in tower_inputs),
                       ("patch_embeddings",))
    windowed_hidden = hidden if merger_at is None else hidden[:, :len(example["merger_order"])]
    head = program(VisionHead(vision), ("hidden_states", "merger_order"), (windowed_hidden, example["merger_order"]),
                   ("image_features",))

    def tower_index(index: int) -> int:
        return index - 1 if merger_at is not None and index > merger_at else index

    def layer(index: int) -> TracedProgram:
        if index == merger_at:
            windows = tower_inputs[2:]
            return program(vision.vit_merger, ("hidden_states", *windows),
                           (hidden, *(example[name] for name in windows)), ("layer_output",))
        return program(vision.layers[tower_index(index)], ("hidden_states",), (hidden,), ("layer_output",))

    def prefix(index: int) -> str:
        return f"{TOWER}.vit_merger." if index == merger_at else f"{TOWER}.encoder.layers.{tower_index(index)}."

    return LayeredProgram(prologue, layer, lambda index: "merger" if index == merger_at else "layer",
                          len(vision.layers) + (merger_at is not None), prefix, head, (), "patch_embeddings")


def _decoder_program(weights) -> LayeredProgram:
    text = weights.config.text_config
    shared = {**ROTARY_AND_MASK, "new_positions_mask": {0: "batch_size", 1: "sequence_length"}}
    # A layer of each kind (linear or full attention) is traced once.
    return layered_decoder(DecoderPrologue(text), shared, partial(DecoderLayerStep, weights),
                           lambda index: text.layer_types[index], text.num_hidden_layers, f"{LLM}.layers.",
                           DecoderHead(weights), text.hidden_size, decoder_state(weights.config))


build_program = layout_graphs(_layered_vision_program, EmbedTokens, _decoder_program)


def vision_inputs(config, pixel_values: torch.Tensor, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per image of an encoded sample (`pixel_values` `[1, 3, P, P * patches]`: every image's row of patches, one
    after the other, `target_sizes` `[images, 2]`), `VisionSlice`'s inputs: its pixels and the host's index tables."""
    patch = config.vision_config.patch_size
    inputs, start = [], 0
    for height, width in target_sizes.tolist():
        end = start + patch * height * width
        inputs.append({"pixel_values": pixel_values[..., start:end], **vision_indices(height, width, config)})
        start = end
    return inputs


def image_tokens(config, target_sizes: torch.Tensor) -> list[int]:
    return (target_sizes.prod(-1) // merged_tokens_divisor(config.downsample_mode)).tolist()


PROGRAMS = Programs(vision_inputs=vision_inputs, image_tokens=image_tokens, state=decoder_state,
                    stateful_decoder=StatefulDecoder, head=DecoderHead, decoder_layers=f"{LLM}.layers.",
                    visuals=VISUALS, chat_inputs=export_chat_inputs, vision=_vision_program)
