"""Torch functions shared by the programs exporters trace (`mcq.export.coreml.graphs`, a family's `programs.py`),
written for what the converters make of them."""

from __future__ import annotations

import torch
from torch import nn


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
