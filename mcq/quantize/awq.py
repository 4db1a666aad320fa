"""mcq's AWQ scale search on one block: llm-compressor's algorithm, with the compute spent where it changes the answer.

The algorithm is AWQ as llm-compressor's `AWQModifier` (and AutoAWQ) runs it. For each smoothing pair — a smooth
layer (a norm, or a Linear) whose output channels are the input channels of the balance Linears — candidate
per-channel scales are `mean|x|^r` (or, duo form, `mean|x|^r / mean|ŵ|^(1-r)` with ŵ the weights normalized per
quantization group), normalized by `sqrt(max · min)`, for r on a grid; each candidate's balance weights are scaled,
rounded with min/max ranges and unscaled, `Q(W·s)/s`; the candidate whose *parent* output is closest (mean squared
error) to the float output wins, and its scales are folded into the smooth layer (÷ s) and the balance layers (× s),
which leaves the block's float function unchanged. The parent is the balance layers' lowest common ancestor, as in
llm-compressor: `self_attn` for q/k/v, the MLP for gate/up, the Linear itself for a single balance layer.

What differs is the cost of one grid point. llm-compressor re-runs the parent on every calibration token for each
of its (up to 20) candidates; here:

- One forward of the block over all calibration tokens gives each pair's activation means (over every token, as
  llm-compressor's) and keeps a sample of each parent's inputs. The parent's float output is computed once, on that
  sample.
- The loss is measured on `loss_tokens` tokens, not all of them. A parent that treats tokens independently (a
  Linear, an MLP) gets tokens drawn at random within each recorded call, each call's share proportional to its token
  count: a stratified sample over calls (a calibration sample in the LLM, a batch of equal-size slices in the vision
  tower), so every sample and image contributes in proportion. A parent that mixes tokens (attention) needs whole
  sequences, so it gets whole rows, picked round-robin over the calibration samples' kinds (document, chart, scene,
  video, ...) and within a kind over samples: one row of every kind, then more until the budget is filled.
  docs/design.md gives the measurement behind the default budget.
- Each candidate's `Q(W·s)/s` is computed once per Linear, into a buffer the Linear keeps for the whole grid, by
  `fake_quantize_`: compressed-tensors' qparams, then its quantize-dequantize op for op, in place (so the rounding
  scored here is, bit for bit, the rounding the checkpoint gets; a fresh tensor per step would cost more than the
  arithmetic: a real-width MLP weight is 200 MB, and the page faults of a new one take ten times an in-place pass).
- The two scale forms (`duo_scaling: both`) share the activation powers, the token sample and the reference; at
  r = 1 they are the same candidate (mean|x|, up to a constant the normalization removes), evaluated once.

Then, unlike llm-compressor (and like AutoAWQ, the AWQ paper's second step), `weight_clip` searches each AWQ
Linear's weight ranges on the same token sample: `clip_weight`.

Everything is deterministic: the token sample comes from a generator seeded per call, never from global state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mcq.models.familyspec import PER_HEAD, SmoothingPair


@dataclass(frozen=True)
class Pair:
    """A smoothing pair resolved in one block (names relative to the block)."""

    smooth: str
    balance: tuple[str, ...]
    parent: str
    offset: float = 0.0   # what the smooth layer adds to its weight before scaling (`Family.norm_offset`)
    heads: int = 1        # a per-head pair (`PER_HEAD`): the balance layers take this many copies of its channels

    def balance_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """Scales of the smooth layer's channels (`[..., channels]`) → of the balance layers' inputs."""
        return scales.repeat(*([1] * (scales.dim() - 1)), self.heads) if self.heads > 1 else scales


@dataclass(frozen=True)
class SkippedPair:
    """A smoothing pair that was not applied, and why (the user sees these in the quantize summary and manifest)."""

    smooth: str
    balance: tuple[str, ...]
    reason: str

    def to_dict(self, block: str) -> dict[str, Any]:
        return {"block": block, "smooth": self.smooth, "balance": list(self.balance), "reason": self.reason}


@dataclass(frozen=True)
class SearchSettings:
    n_grid: int
    duo_scaling: bool | str
    loss_tokens: int    # tokens whose parent output enters the grid loss (the recipe's default, see recipe.py)
    weight_clip: bool   # after smoothing, search each AWQ Linear's clipped ranges (`clip_weight`)


@dataclass
class PairResult:
    """What the search found for one pair (for benchmarks and tests)."""

    smooth: str
    parent: str
    tokens: int                 # tokens whose parent output entered the loss
    ratio: float
    duo: bool
    initial_error: float        # the loss of the first candidate (r = 0 without duo: plain rounding)
    best_error: float
    losses: list[tuple[float, bool, float]] = field(default_factory=list)   # (ratio, duo, loss) per candidate


# ---------------------------------------------------------------------------------------------------- resolving

def lowest_common_ancestor(names: Sequence[str]) -> str:
    """The deepest module name that contains every name ("" = the block); a single name is its own ancestor."""
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts):
        if any(part != level[0] for part in level):
            break
        common.append(level[0])
    return ".".join(common)


def _output_width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def resolve_pairs(block: nn.Module, pairs: Sequence[SmoothingPair], methods: dict[str, str],
                  norm_offset: Callable[[nn.Module], float] = lambda module: 0.0
                  ) -> tuple[list[Pair], list[SkippedPair]]:
    """The pairs of `pairs` that can smooth this block, and the ones that cannot, with the reason.

    `methods` maps the block's quantized Linears to their method. A pair concerns AWQ when one of its balance layers
    is an AWQ layer; it is applied only if every balance layer is, the smooth layer exists, and the widths agree
    (under grouped-query attention `v_proj` has fewer outputs than `o_proj` has inputs, so no per-channel scale
    passes between them), or for a per-head pair (`PER_HEAD`) the balance layers take whole heads of them.
    `norm_offset`: the family's (`Family.norm_offset`), for the smooth layers."""
    modules = dict(block.named_modules())
    usable, skipped = [], []
    for smooth, balance, *form in pairs:
        per_head = form == [PER_HEAD]
        if not any(methods.get(name) == "awq" for name in balance):
            continue
        reason = None
        if smooth not in modules:
            reason = f"{smooth} is not in this block"
        else:
            for name in balance:
                if methods.get(name) != "awq":
                    how = f"quantized with {methods[name]}" if name in methods else "kept unquantized"
                    reason = f"{name} is {how}; every balance layer of a pair must be AWQ-quantized"
                    break
                width, fan_in = _output_width(modules[smooth]), modules[name].in_features
                if per_head and fan_in % width:
                    reason = f"{smooth} has {width} channels per head but {name} takes {fan_in} inputs"
                    break
                if width != fan_in and not per_head:
                    reason = f"{smooth} has {width} output channels but {name} takes {fan_in} inputs"
                    if smooth.endswith("v_proj") and fan_in % width == 0:
                        reason += (f" (grouped-query attention: each value head serves {fan_in // width} query "
                                   "heads), so no per-channel scale passes between them")
                    break
        if reason:
            skipped.append(SkippedPair(smooth, tuple(balance), reason))
        else:
            heads = modules[balance[0]].in_features // _output_width(modules[smooth]) if per_head else 1
            usable.append(Pair(smooth, tuple(balance), lowest_common_ancestor(balance), norm_offset(modules[smooth]),
                               heads))
    return usable, skipped


def token_mixing(mixers: Sequence[str]) -> Callable[[str], bool]:
    """Whether a parent (a module name in the block, "" = the block) is, or holds, one of `mixers`, the modules whose
    output at one token depends on other tokens (`Family.token_mixing`)."""
    return lambda parent: any(not parent or m == parent or m.startswith(parent + ".") for m in mixers)


# ---------------------------------------------------------------------------------------------------- the sample

Call = tuple[tuple[Any, ...], dict[str, Any]]


def _allocate(total: int, weights: Sequence[int]) -> list[int]:
    """`total` split over `weights` proportionally, in whole numbers that sum to `total` (largest remainders)."""
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    shares = [int(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (shares[i] - exact[i], i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def _rows_of(call: Call) -> tuple[int, int]:
    """(batch rows, tokens per row) of a block call: its hidden states are the first argument, `[B, L, D]`."""
    hidden = call[0][0]
    return (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 else (1, hidden.shape[0])


def pick_rows(calls: Sequence[Call], origins: Sequence[Sequence[tuple[str, int]]] | None,
              budget: int) -> dict[int, list[int]]:
    """Whole rows (call index → row indices) for parents that mix tokens: one row of every kind of sample, then more
    until they hold `budget` tokens.

    Round-robin over the samples' kinds (sorted), within a kind over its samples in order, a sample's first row
    before any sample's second: every kind is in the loss however small the budget (a whole row can be a 1000-patch
    slice, so a budget counted in rows alone would let one image decide), and first slices come before second
    slices of the same image. Every row when all of them fit."""
    shapes = [_rows_of(call) for call in calls]
    if sum(b * n for b, n in shapes) <= budget:
        return {i: list(range(b)) for i, (b, _) in enumerate(shapes)}
    by_kind: dict[str, list[tuple[int, int, int, int]]] = {}   # kind → (rank within sample, sample, call, row)
    seen: dict[int, int] = {}
    for i, (batch, _) in enumerate(shapes):
        own = list(origins[i]) if origins and i < len(origins) else []
        # One origin for a whole call (the resampler gets a sample's slices in one call) covers all its rows.
        labels = own if len(own) == batch else [own[0] if own else ("", i)] * batch
        for row, (kind, sample) in enumerate(labels):
            rank = seen.get(sample, 0)
            seen[sample] = rank + 1
            by_kind.setdefault(kind, []).append((rank, sample, i, row))
    queues = [sorted(rows) for _, rows in sorted(by_kind.items())]
    picked: dict[int, list[int]] = {}
    tokens, position = 0, 0
    while (position == 0 or tokens < budget) and any(position < len(queue) for queue in queues):
        for queue in queues:
            if position < len(queue) and (position == 0 or tokens < budget):
                _, _, i, row = queue[position]
                picked.setdefault(i, []).append(row)
                tokens += shapes[i][1]
        position += 1
    return {i: sorted(rows) for i, rows in sorted(picked.items())}


def _select_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """`value` with its batch rows narrowed to `rows`: tensors of two or more dims whose first dim is the batch
    (hidden states, masks, per-row position tables); tuples and lists element-wise; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows.to(value.device)) if value.dim() >= 2 and value.shape[0] == batch \
            and batch > 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_select_rows(v, rows, batch) for v in value)
    return value


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _output(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------------- the search

def grid(n_grid: int, duo_scaling: bool | str) -> list[tuple[float, bool]]:
    """The candidates (ratio, duo form), in llm-compressor's order; the r = 1 duo candidate of `both` is dropped
    (it is the plain one)."""
    def ratios(n: int) -> list[float]:
        return [i / (n - 1) for i in range(n)] if n > 1 else [0.0]

    if duo_scaling == "both":
        return [(r, duo) for r in ratios(max(n_grid // 2, 1)) for duo in (False, True) if not (duo and r == 1.0)]
    if duo_scaling:
        return [(0.0, False)] + [(r, True) for r in ratios(n_grid - 1)]
    return [(r, False) for r in ratios(n_grid)]


def normalized_weight_means(weights: Sequence[torch.Tensor], group_sizes: Sequence[int | None]) -> torch.Tensor:
    """Per input channel, the mean over output rows of |w| / (max |w| of its quantization group), over all balance
    layers: the weight side of the duo form."""
    total, rows = 0, 0
    for weight, group in zip(weights, group_sizes):
        chunk = group or weight.shape[1]
        magnitude = weight.abs().reshape(-1, chunk)
        magnitude = magnitude / (magnitude.amax(dim=1, keepdim=True) + 1e-6)
        total = total + magnitude.reshape(weight.shape).sum(0, dtype=torch.float64)
        rows += weight.shape[0]
    return (total / rows).to(torch.float32)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None,
                     candidates: Sequence[tuple[float, bool]]) -> torch.Tensor:
    """`[len(candidates), channels]` scales, each normalized so that max · min = 1."""
    powers: dict[float, torch.Tensor] = {}
    rows = []
    for ratio, duo in candidates:
        power = powers.setdefault(ratio, x_mean.pow(ratio))
        scales = (power / (w_mean.pow(1 - ratio) + 1e-4)) if duo else power
        scales = scales.clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        scales[torch.isinf(scales) | torch.isnan(scales)] = 1
        rows.append(scales)
    return torch.stack(rows)


def fake_quantize_(grouped: torch.Tensor, low: torch.Tensor, high: torch.Tensor, args) -> torch.Tensor:
    """Round `grouped` (`[..., group]`, float32) in place to the integer grid of the ranges [low, high] (`[...]`, one
    per group) and back; returns it. The qparams are compressed-tensors' (`calculate_qparams`: scales rounded to
    `args.scale_dtype`, integer zero points), and the steps are its `fake_quantize`'s for integer types in the same
    order — x / scale + zero point, clamp to the integer range, round, − zero point, × scale — so the result is the
    same bit for bit, without the five temporaries of the weight's size that `fake_quantize` allocates."""
    from compressed_tensors.quantization.utils import calculate_qparams, calculate_range

    if args.type != "int":
        raise ValueError(f"mcq's AWQ rounds to integers only, not {args.type}")
    scale, zero_point = calculate_qparams(low, high, args)
    q_min, q_max = calculate_range(args, grouped.device)
    scale, zero = scale.unsqueeze(-1), zero_point.unsqueeze(-1).to(grouped.dtype)
    return grouped.div_(scale).add_(zero).clamp_(float(q_min), float(q_max)).round_().sub_(zero).mul_(scale)


def fake_quantized(weight: torch.Tensor, scales: torch.Tensor, args, out: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """`Q(W · s) / s` for each row of `scales` (`[G, in]`): `[G, out, in]` (in `out` when given, float32), with
    min/max ranges per group or per output channel and compressed-tensors' qparams and rounding (`args`: the
    layer's QuantizationArgs)."""
    scaled = torch.mul(weight.unsqueeze(0), scales[:, None, :], out=out)
    grouped = scaled.unflatten(-1, (-1, args.group_size or weight.shape[1]))
    fake_quantize_(grouped, grouped.amin(-1), grouped.amax(-1), args)
    return scaled.div_(scales[:, None, :])


@dataclass
class Statistics:
    """What one forward of the block over every calibration call gives the search."""

    x_means: dict[str, torch.Tensor]          # smooth layer → mean |x| per input channel of its balance layers
    inputs: dict[str, torch.Tensor]           # token-wise parent → its inputs at the sampled tokens, `[n, in]`
    calls: dict[str, list[Call]]              # token-mixing parent → its calls on the picked rows
    outputs: list[torch.Tensor]               # the block's output on each call


@torch.no_grad()
def collect(block: nn.Module, pairs: Sequence[Pair], calls: Sequence[Call],
            origins: Sequence[Sequence[tuple[str, int]]] | None, loss_tokens: int, mixing: Callable[[str], bool],
            seed: int = 0, linears: Sequence[str] = ()) -> Statistics:
    """Run the block once on every call with hooks that take the pairs' activation means (over all tokens) and the
    inputs of the token-wise parents and of `linears` (the Linears whose ranges the clip search sets) on the token
    sample (see the module doc). `seed` varies the draw (the budget study uses it)."""
    tokens = [batch * length for batch, length in (_rows_of(call) for call in calls)]
    shares = _allocate(min(loss_tokens, sum(tokens)), tokens)
    rows = pick_rows(calls, origins, loss_tokens)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    inputs: dict[str, list[torch.Tensor]] = {}
    parent_calls: dict[str, list[Call]] = {}
    current = 0

    def activations(smooth: str):
        def hook(module, args):
            x = args[0].detach().flatten(0, -2)
            total = x.abs().sum(0, dtype=torch.float32)
            sums[smooth] = sums[smooth] + total if smooth in sums else total
            counts[smooth] = counts.get(smooth, 0) + x.shape[0]
        return hook

    def token_sample(parent: str):
        def hook(module, args, kwargs):
            if shares[current] == 0:
                return
            x = _first_tensor(args, kwargs).detach().flatten(0, -2)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + current)
            positions = torch.randperm(x.shape[0], generator=generator)[: shares[current]].sort().values
            inputs.setdefault(parent, []).append(x.index_select(0, positions.to(x.device)))
        return hook

    def row_sample(parent: str):
        def hook(module, args, kwargs):
            picked = rows.get(current)
            if picked:
                batch, index = _first_tensor(args, kwargs).shape[0], torch.tensor(picked)
                parent_calls.setdefault(parent, []).append(
                    (_select_rows(args, index, batch), {k: _select_rows(v, index, batch) for k, v in kwargs.items()}))
        return hook

    handles = [block.get_submodule(pair.balance[0]).register_forward_pre_hook(activations(pair.smooth))
               for pair in pairs]
    # A Linear that is both a parent and clipped (fc1, out_proj) is sampled once: both read the same inputs.
    for name in dict.fromkeys([*(pair.parent for pair in pairs), *linears]):
        module = block.get_submodule(name) if name else block
        hook = row_sample(name) if mixing(name) else token_sample(name)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    outputs = []
    try:
        for current, (args, kwargs) in enumerate(calls):
            outputs.append(_output(block(*args, **kwargs)))
    finally:
        for handle in handles:
            handle.remove()
    return Statistics({smooth: sums[smooth] / counts[smooth] for smooth in sums},
                      {parent: torch.cat(x) for parent, x in inputs.items()}, parent_calls, outputs)


class ParentSample:
    """A pair's parent module on the sampled inputs: its float output, computed once, and the loss of the module as
    it now is against it."""

    def __init__(self, block: nn.Module, parent: str, statistics: Statistics):
        self.module = block.get_submodule(parent) if parent else block
        self.sample = statistics.inputs.get(parent)
        self.calls = statistics.calls.get(parent, [])
        self.reference = self.run()
        self.tokens = sum(r.shape[:-1].numel() for r in self.reference)

    @torch.no_grad()
    def run(self) -> list[torch.Tensor]:
        if self.sample is not None:
            return [_output(self.module(self.sample))]
        return [_output(self.module(*args, **kwargs)) for args, kwargs in self.calls]

    def loss(self) -> float:
        squared, count = 0.0, 0
        for output, reference in zip(self.run(), self.reference):
            squared += float(torch.nn.functional.mse_loss(output, reference, reduction="sum"))
            count += reference.numel()
        return squared / count

    def finite(self) -> bool:
        return all(bool(r.isfinite().all()) for r in self.reference)


def pair_scales(block: nn.Module, pair: Pair, x_mean: torch.Tensor, candidates: Sequence[tuple[float, bool]],
                quant_args: dict[str, Any]) -> torch.Tensor:
    """The candidates' scales for `pair` (`[len(candidates), channels]`, channels of the smooth layer: for a per-head
    pair the activation and weight means of a head channel are averaged over the heads)."""
    weights = [block.get_submodule(name).weight.data for name in pair.balance]
    w_mean = None
    if any(duo for _, duo in candidates):
        w_mean = normalized_weight_means(weights, [quant_args[name].group_size for name in pair.balance])
    if pair.heads > 1:
        x_mean = x_mean.view(pair.heads, -1).mean(0)
        w_mean = w_mean.view(pair.heads, -1).mean(0) if w_mean is not None else None
    return candidate_scales(x_mean.to(weights[0].device), w_mean, candidates)


@torch.no_grad()
def candidate_losses(block: nn.Module, pair: Pair, parent: ParentSample, scales: torch.Tensor,
                     quant_args: dict[str, Any]) -> list[float]:
    """The parent's loss with the balance layers at `Q(W·s)/s`, for each row of `scales`; the weights are restored.
    Each balance layer gets one buffer, which every candidate's rounded weights overwrite."""
    layers = [block.get_submodule(name) for name in pair.balance]
    originals = [layer.weight.data for layer in layers]
    buffers = [torch.empty((1, *w.shape), dtype=torch.promote_types(w.dtype, scales.dtype), device=w.device)
               for w in originals]
    losses: list[float] = []
    try:
        for g in range(scales.shape[0]):
            for layer, weight, buffer, name in zip(layers, originals, buffers, pair.balance):
                layer.weight.data = fake_quantized(weight, scales[g: g + 1], quant_args[name], out=buffer)[0]
            losses.append(parent.loss())
    finally:
        for layer, weight in zip(layers, originals):
            layer.weight.data = weight
    return losses


def best_candidate(losses: Sequence[float]) -> int | None:
    """The first candidate of least finite loss (as llm-compressor picks), None when no loss is finite."""
    finite = [g for g, loss in enumerate(losses) if math.isfinite(loss)]
    return min(finite, key=lambda g: (losses[g], g)) if finite else None


def search_block(block: nn.Module, pairs: Sequence[Pair], calls: Sequence[Call],
                 origins: Sequence[Sequence[tuple[str, int]]] | None, settings: SearchSettings,
                 quant_args: dict[str, Any], mixing: Callable[[str], bool]
                 ) -> tuple[list[PairResult], list[ClipResult], list[SkippedPair], list[torch.Tensor]]:
    """Find and apply each pair's scales in place, in order, then (`settings.weight_clip`) each AWQ Linear's clipped
    ranges. Returns what was found, the pairs skipped at run time (no token reached them, or their parent's float
    output is not finite), and the block's outputs on `calls` — the float block's, which the smoothed block
    reproduces (smoothing is exact in float), so the driver need not run it again. Clipping changes only where the
    weights round (what the checkpoint stores); the next block gets float outputs either way, as after smoothing.

    `quant_args`: every AWQ Linear of the block → its QuantizationArgs; `mixing(parent)`: whether that parent mixes
    tokens; `origins[i][row]`: (kind, sample index) of each batch row of call i, for picking rows across kinds."""
    clipped = [name for name in quant_args if settings.weight_clip and clips(name)]
    statistics = collect(block, pairs, calls, origins, settings.loss_tokens, mixing, linears=clipped)
    results, skipped = [], []
    folded: dict[str, torch.Tensor] = {}    # balance layer → the scales its inputs are now divided by
    candidates = grid(settings.n_grid, settings.duo_scaling)
    for pair in pairs:
        if pair.smooth not in statistics.x_means:   # a branch the calibration data never took
            skipped.append(SkippedPair(pair.smooth, pair.balance, "no calibration token reached it"))
            continue
        parent = ParentSample(block, pair.parent, statistics)
        if not parent.finite():
            skipped.append(SkippedPair(pair.smooth, pair.balance, f"the float output of "
                                       f"{pair.parent or 'the block'} is not finite on the calibration data"))
            continue
        scales = pair_scales(block, pair, statistics.x_means[pair.smooth], candidates, quant_args)
        losses = candidate_losses(block, pair, parent, pair.balance_scales(scales), quant_args)
        best = best_candidate(losses)
        if best is None:
            raise RuntimeError(f"AWQ: no finite loss for {pair.smooth} (non-finite values in "
                               f"{pair.parent or 'the block'})")
        apply_scales(block, pair, scales[best])
        folded.update(dict.fromkeys(pair.balance, pair.balance_scales(scales[best])))
        ratio, duo = candidates[best]
        results.append(PairResult(pair.smooth, pair.parent, parent.tokens, ratio, duo, losses[0], losses[best],
                                  [(r, d, loss) for (r, d), loss in zip(candidates, losses)]))
    clip_results = []
    for name in clipped:
        inputs = statistics.inputs.get(name)
        if inputs is None or not inputs.isfinite().all():   # no token reached it: min/max ranges stay
            continue
        if name in folded:
            inputs = inputs / folded[name].to(inputs.device)
        clip_results.append(ClipResult(name, *clip_weight(block.get_submodule(name).weight.data, inputs,
                                                          quant_args[name])))
    return results, clip_results, skipped, statistics.outputs


# ---------------------------------------------------------------------------------------------------- clipping

# The clip search's candidates: the fraction of each group's min/max range kept, 1 (plain min/max) first so that a
# tie keeps the full range, down to about half the range as the AWQ paper's released search, in steps of 0.025.
# Measured on tiny:4.5-outliers (awq-w4g128 as shipped, mean held-out KL; RTN 0.005028, no clipping 0.002859): steps
# of 0.05 (10 candidates) 0.001778 with vision cosine 0.99830 (under the 0.9985 the vision path must keep), 0.025
# (20) 0.000937 / 0.99941, 0.0125 (40) 0.000811 / 0.99946 at twice the cost; a coarse grid refined around each
# group's best (14 roundings to 0.0125) 0.001319: the error is not smooth in the fraction, a local search misses.
CLIP_SHRINKS = tuple(1 - i / 40 for i in range(20))
# Queries and keys: their rounding error reaches the block through softmax(q·k), which a Linear's own output error
# does not measure; the AWQ paper's search leaves them at min/max too.
UNCLIPPED = ("q_proj", "k_proj")


def clips(name: str) -> bool:
    """Whether the clip search sets this Linear's ranges (every AWQ Linear but queries and keys)."""
    return name.rpartition(".")[2] not in UNCLIPPED


@dataclass
class ClipResult:
    """What the clip search did to one Linear (for tests and benchmarks): its output error on the token sample with
    min/max ranges and with the chosen ones, and the mean fraction of the range kept."""

    layer: str
    initial_error: float
    best_error: float
    kept: float


@torch.no_grad()
def clip_weight(weight: torch.Tensor, inputs: torch.Tensor, args) -> tuple[float, float, float]:
    """Clip `weight` (`[out, in]`, in place) per output row and quantization group to the fraction of its min/max
    range (one of CLIP_SHRINKS) that rounds with the least output error on `inputs` (`[n, in]`, as the Linear now
    receives them). Returns the summed squared output error with min/max ranges and with the chosen ones, and the
    mean fraction kept.

    The second step of the AWQ paper's method: min/max spends the int4 levels on a group's extreme weights, and
    shrinking the range trades their error for finer steps everywhere else. A group's error is scored on its own
    share of the output, `Δ·H·Δ` with Δ its rounding error and H = XᵀX over the group's input columns (one small
    Gram matrix per group, so a candidate costs out × in × group multiply-adds, whatever the token count); a group
    wider than the token sample (per-channel ranges: one group of a whole row) is scored on the tokens instead,
    `|X·Δ|²`, out × in × tokens. The weights are clamped to the chosen [lo, hi] (lo ≤ 0 ≤ hi, as compressed-tensors' qparams include zero): their
    min/max is then exactly that range, so the observer that packs them rounds as it was scored here."""
    group = args.group_size or weight.shape[1]
    grouped = weight.float().unflatten(-1, (-1, group))                      # [out, G, group]
    # Group-major, the layout of one batched product per group (`bmm` over G); every candidate's rounding error is
    # written into one buffer of this shape, and its product with the Gram matrix into another.
    by_group = grouped.transpose(0, 1).contiguous()                          # [G, out, group]
    columns = inputs.float().unflatten(-1, (-1, group))                      # [n, G, group]
    delta, product = torch.empty_like(by_group), None
    if group <= columns.shape[0]:
        gram = torch.einsum("ngi,ngj->gij", columns, columns)
        product = torch.empty_like(by_group)

        def score() -> torch.Tensor:                                          # → [G, out]
            return torch.bmm(delta, gram, out=product).mul_(delta).sum(-1)
    else:
        def score() -> torch.Tensor:
            return torch.einsum("goi,ngi->gon", delta, columns).square().sum(-1)
    low, high = by_group.amin(-1).clamp(max=0), by_group.amax(-1).clamp(min=0)  # [G, out]
    factors = torch.tensor(CLIP_SHRINKS, dtype=torch.float32, device=weight.device)
    errors = []
    for kept in factors:
        lo, hi = low * kept, high * kept
        torch.minimum(torch.maximum(by_group, lo[..., None], out=delta), hi[..., None], out=delta)
        fake_quantize_(delta, lo, hi, args).sub_(by_group)
        errors.append(score())
    del delta, product   # two weight-sized buffers, gone before the final clamp takes its own
    errors = torch.stack(errors).transpose(1, 2).contiguous()                 # [A, out, G]
    best = errors.argmin(0)                      # the first least error: on a tie, the widest range
    kept = factors[best]
    lo, hi = low.t() * kept, high.t() * kept
    weight.copy_(torch.minimum(torch.maximum(grouped, lo[..., None]), hi[..., None]).flatten(-2).to(weight.dtype))
    return float(errors[0].sum()), float(errors.gather(0, best[None]).sum()), float(kept.mean())


@torch.no_grad()
def apply_scales(block: nn.Module, pair: Pair, scales: torch.Tensor) -> None:
    """Fold the scales in: balance weights × s on their input channels, the smooth layer's outputs ÷ s (for a norm
    that scales by offset + weight, the weight becomes (offset + weight) / s − offset)."""
    for name in pair.balance:
        layer = block.get_submodule(name)
        layer.weight.data = layer.weight.data * pair.balance_scales(scales).view(1, -1).to(layer.weight.dtype)
    smooth = block.get_submodule(pair.smooth)
    if pair.offset:
        smooth.weight.data = (smooth.weight.data + pair.offset) / scales.to(smooth.weight.dtype) - pair.offset
    elif smooth.weight.dim() == 1:
        smooth.weight.data = smooth.weight.data / scales.to(smooth.weight.dtype)
    else:
        smooth.weight.data = smooth.weight.data / scales.view(-1, 1).to(smooth.weight.dtype)
    if getattr(smooth, "bias", None) is not None:
        smooth.bias.data = smooth.bias.data / scales.to(smooth.bias.dtype)
