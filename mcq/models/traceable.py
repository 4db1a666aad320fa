"""Torch pieces shared by the families' programs (`programs.py` in a family's folder), which the graph exporters
trace, written for what the converters make of them.

Every parameter a program holds is built from an `ExportWeights` (or a `MetaWeights`: meta tensors, to be traced
without weights) and remembers the checkpoint tensor it holds (`mcq_source`): exporters name the graph's
initializer after it, and the ONNX exporter writes its data from there after tracing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .familyspec import LayeredProgram, TracedProgram

# Added to attention scores of padded keys. Representable in fp16 (the real minimum would overflow to -inf when a
# score is added to it), and exp(-1e4) is 0 in any precision, so a padded key gets no weight.
MASKED_SCORE = -1.0e4


def named_parameter(tensor: torch.Tensor, source: str) -> nn.Parameter:
    """A frozen float32 parameter holding `tensor`, the checkpoint tensor `source` (reshaped, at most)."""
    parameter = nn.Parameter(tensor.float(), requires_grad=False)
    parameter.mcq_source = source
    return parameter


def checkpoint_parameter(weights, name: str) -> nn.Parameter:
    return named_parameter(weights.tensor(name), name)


def linear(weights, prefix: str, bias: bool) -> "TransposedLinear":
    """The checkpoint's Linear `prefix`."""
    return transposed_linear(weights.tensor(f"{prefix}.weight"), weights.tensor(f"{prefix}.bias") if bias else None,
                             prefix)


def transposed_linear(weight: torch.Tensor, bias: torch.Tensor | None, source: str) -> "TransposedLinear":
    """A Linear of `weight` `[out, in]` (the checkpoint module `source`'s, reshaped at most) and `bias`."""
    return TransposedLinear(named_parameter(weight.t().contiguous(), f"{source}.weight"),
                            None if bias is None else named_parameter(bias, f"{source}.bias"))


class LayerNorm(nn.Module):
    """The checkpoint's LayerNorm `prefix` (weight and bias)."""

    def __init__(self, weights, prefix: str, eps: float):
        super().__init__()
        self.weight = checkpoint_parameter(weights, f"{prefix}.weight")
        self.bias = checkpoint_parameter(weights, f"{prefix}.bias")
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def rotary_terms(position_ids: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """cos and sin `[B, 1, S, rotary dims]` of rotate-half RoPE at `position_ids` `[B, S]` (transformers' rotary
    embedding, in float32: the angles of both halves alike, times its attention scaling)."""
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]
    return angles.cos() * scale, angles.sin() * scale


def causal_padding_mask(attention_mask: torch.Tensor, length: int, device) -> torch.Tensor:
    """The additive mask `[B, 1, S, T]` of the last `length` of T positions (`attention_mask` `[B, T]`, 0 on
    padding): causal over the whole sequence (past and new positions), and no attention to padding."""
    total = attention_mask.shape[1]
    query_at = torch.arange(length, device=device) + (total - length)
    allowed = (torch.arange(total, device=device)[None, :] <= query_at[:, None])[None] & \
        (attention_mask[:, None, :] > 0)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last axis, safe in fp16, where Core ML computes: LLM hidden states reach
    thousands, and their squares would overflow fp16 (65504). Dividing by the row's max |x| first gives the same
    result (eps rescaled to match) with squares <= 1.

    The rescaled eps, eps / peak², is computed as (sqrt(eps) / peak)²: peak² underflows fp16 for a row of small
    values (a linear-attention output: peak 1e-4, peak² 1e-8 < fp16's least 6e-8), and eps over zero would zero the
    row. And it is a tensor over a tensor: a Python number over a tensor traces as `reciprocal`, which coremltools
    converts to Core ML's `inverse`, and that computes 1 / (x + 1e-4)."""
    peak = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-4)
    y = x / peak
    ratio = peak.new_full((1,), eps ** 0.5) / peak
    scaled_eps = ratio * ratio
    return y * torch.rsqrt((y * y).mean(dim=-1, keepdim=True) + scaled_eps)


class TransposedLinear(nn.Module):
    """x @ weight^T (+ bias) with the weight stored transposed, `[in, out]`: traced to ONNX, it is one MatMul on an
    initializer named after the checkpoint's weight (the parameter's `mcq_source`), which a MatMulNBits quantizer
    then finds as it is. `as_linear_ops` turns it back into an `nn.Linear` for Core ML."""

    def __init__(self, weight_t: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight_t, self.bias = weight_t, bias
        weight_t.mcq_transposed = True     # its `mcq_source`'s data transposed, for exporters that write it later

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.weight_t)
        return out if self.bias is None else out + self.bias


def as_linear_ops(module: nn.Module) -> nn.Module:
    """`module` with each `TransposedLinear` made an `nn.Linear` (weight `[out, in]`, remembering its checkpoint
    module in `mcq_source`), for converters that compress the weights of linear ops (Core ML)."""
    for child in list(module.modules()):
        for attribute, linear in list(child.named_children()):
            if isinstance(linear, TransposedLinear):
                weight = linear.weight_t.t().contiguous()
                replacement = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
                replacement.weight = nn.Parameter(weight, requires_grad=False)
                if linear.bias is not None:
                    replacement.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
                replacement.mcq_source = linear.weight_t.mcq_source.removesuffix(".weight")
                setattr(child, attribute, replacement)
    return module


# What a decoder's prologue gives every layer, with its dynamic axes: the rotary terms and the additive causal and
# padding mask (`rotary_terms`, `causal_padding_mask`).
ROTARY_AND_MASK = {"position_cos": {0: "batch_size", 2: "sequence_length"},
                   "position_sin": {0: "batch_size", 2: "sequence_length"},
                   "additive_mask": {0: "batch_size", 2: "sequence_length", 3: "total_sequence_length"}}


def layout_graphs(vision: Callable, embed: Callable, decoder: Callable) -> Callable:
    """A family's `Family.graphs` from the builders of its vision program, its embedding module and its decoder
    (each from the weights)."""
    builders = {"vision_encoder": vision, "embed_tokens": lambda weights: embed_program(embed(weights)),
                "decoder_model_merged": decoder}
    return lambda weights, graph: builders[graph](weights)


def embed_program(module: nn.Module) -> TracedProgram:
    """The `embed_tokens` graph of `module` (input_ids `[batch, sequence]` → inputs_embeds)."""
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "inputs_embeds": {0: "batch_size", 1: "sequence_length"}}
    dynamic = torch.export.Dim.DYNAMIC
    return TracedProgram(module.eval(), (torch.zeros(2, 3, dtype=torch.long),), ("input_ids",), ("inputs_embeds",),
                         ({0: dynamic, 1: dynamic},), axes)


def layered_decoder(prologue: nn.Module, shared: dict[str, dict[int, str]], layer: Callable[[int], nn.Module],
                    kind: Callable[[int], Any], layers: int, layer_prefix: str, head: nn.Module, hidden: int,
                    states) -> LayeredProgram:
    """The `decoder_model_merged` graph in pieces (a `LayeredProgram`): `prologue` maps (inputs_embeds
    `[B, S, hidden]`, attention_mask `[B, past + S]`, position_ids `[B, S]`) to the values every layer reads, named
    and with their dynamic axes in `shared`; `layer(i)` maps (hidden_states, *those values, *layer i's two states:
    `states` holds two per layer, in layer order) to (layer_output, *its two states out); `head` maps hidden_states
    to logits `[B, S, vocab]`."""
    batch, length, past = 2, 3, 2
    dynamic = torch.export.Dim.DYNAMIC
    sequence = {0: "batch_size", 1: "sequence_length"}
    axes = {"inputs_embeds": sequence, "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": sequence, "logits": sequence, "hidden_states": sequence, "layer_output": sequence,
            **shared}
    for state in states:
        grows = state.shape[2] is None
        axes[state.name] = {0: "batch_size", **({2: "past_sequence_length"} if grows else {})}
        axes[state.output] = {0: "batch_size", **({2: "total_sequence_length"} if grows else {})}
    example = (torch.zeros(batch, length, hidden), torch.ones(batch, past + length, dtype=torch.long),
               torch.arange(past, past + length).repeat(batch, 1))
    inputs = ("inputs_embeds", "attention_mask", "position_ids")
    with torch.no_grad():      # the shared values' shapes, as the layers' examples
        values = prologue.eval()(*example)
    prologue_program = TracedProgram(prologue, example, inputs, tuple(shared),
                                     tuple({axis: dynamic for axis in axes[name]} for name in inputs), axes)

    def layer_program(index: int) -> TracedProgram:
        own = states[2 * index: 2 * index + 2]
        names = ("hidden_states", *shared, *(state.name for state in own))
        layer_example = (torch.zeros(batch, length, hidden), *values,
                         *(torch.zeros([batch if axis == 0 else (past if size is None else size)
                                        for axis, size in enumerate(state.shape)]) for state in own))
        return TracedProgram(layer(index).eval(), layer_example, names,
                             ("layer_output", *(state.output for state in own)),
                             tuple({axis: dynamic for axis in axes[name]} for name in names), axes)

    head_program = TracedProgram(head.eval(), (torch.zeros(batch, length, hidden),), ("hidden_states",), ("logits",),
                                 ({0: dynamic, 1: dynamic},), axes)
    return LayeredProgram(prologue_program, layer_program, kind, layers, lambda index: f"{layer_prefix}{index}.",
                          head_program, tuple(states), "inputs_embeds")
