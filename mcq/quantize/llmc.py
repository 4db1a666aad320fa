"""AWQ, GPTQ and RTN on one block at a time: mcq's AWQ scale search, llm-compressor's modifiers for the rest.

llm-compressor's own pipelines need the whole model in memory and a torch.fx trace of its forward (which fails on
MiniCPM-V's data-dependent vision path). Its modifiers, though, only need a module and lifecycle events: so for
each block the driver hands over, we open a fresh llm-compressor session whose model *is* the block, let the
modifiers hook it, run the block on the captured calibration calls, and fire the same events the sequential
pipeline fires (calibration start → sequential epoch end → calibration end). GPTQ's Hessians, the observers that set
the weight ranges and the packed format are llm-compressor's and compressed-tensors'; the walk is ours.

AWQ's scale search is mcq's own by default (`mcq.quantize.awq`: the same algorithm at a fraction of the cost), run
on the block before the session, which then only rounds the smoothed weights; `method_args: {engine:
llm-compressor}` runs llm-compressor's `AWQModifier` inside the session instead. Either way the smoothing pairs
come from the model's family (`Family.smoothing_pairs`), and the pairs that cannot be applied are collected with
the reason (`skipped_pairs`), because llm-compressor's own notice of them is a debug log line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import torch
from torch import nn

from mcq.errors import McqError
from mcq.models.family import component_of, pad_intermediate
from mcq.models.familyspec import Family
from mcq.models.loading import PACKED_LINEAR_SUFFIXES

from .awq import Pair, SearchSettings, SkippedPair, resolve_pairs, search_block, token_mixing
from .recipe import LayerScheme, QuantPlan
from .sequential import Call


def _quiet_llmcompressor() -> None:
    """llm-compressor logs every layer at INFO through loguru to *stdout* (which would corrupt `--json`), and its
    import already warns there on a CPU machine; mcq reports its own per-block progress and summary. Its import
    binds its log sink to the `sys.stdout` of that moment, so the import runs with stdout pointed at stderr; then
    logging is disabled (its import re-enables it). Disabling through LLM_COMPRESSOR_LOG_DISABLED instead would
    skip registering its METRIC level, which GPTQ then logs to and fails."""
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        from llmcompressor import LoggerConfig, configure_logger
    from loguru import logger

    configure_logger(LoggerConfig(disabled=True))
    logger.disable("compressed_tensors")


def _cpu_compat(device: torch.device | str) -> None:
    """llm-compressor 0.14 AWQ pins cached activations to page-locked memory before its grid search. Pinning only
    speeds host-to-device copies, and it fails for a CPU run: without CUDA the call raises, and with CUDA present
    `pin_memory()` refuses the broadcast (expanded) tensors among the cached CPU kwargs. So when the blocks run on
    the CPU it becomes a no-op."""
    if torch.device(device).type != "cpu":
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def quantization_args(scheme: LayerScheme, *, observer: str, actorder: str | None = None,
                      scale_dtype: torch.dtype | None = None):
    from compressed_tensors.quantization import QuantizationArgs

    per_group = scheme.group_size is not None
    return QuantizationArgs(
        num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
        strategy="group" if per_group else "channel", group_size=scheme.group_size,
        observer=observer, actorder=actorder if per_group else None, scale_dtype=scale_dtype,
    )


class LlmCompressorBlockQuantizer:
    """Quantizes the Linears a plan selects inside each block, with the recipe's method (see the module doc)."""

    def __init__(self, plan: QuantPlan, family: Family, scale_dtype: torch.dtype, device: torch.device | str = "cpu"):
        _quiet_llmcompressor()
        _cpu_compat(device)
        self.plan, self.family, self.scale_dtype = plan, family, scale_dtype
        self.method = plan.recipe.method
        self.args = dict(plan.recipe.method_args)
        self.engine = self.args.get("engine", "mcq") if self.method == "awq" else "llm-compressor"
        self.data_free_blocks: list[str] = []   # calibrated method, but no calibration input reached the block
        self.skipped_pairs: list[dict] = []     # AWQ smoothing pairs not applied: block, smooth, balance, reason
        self.awq_results: dict[str, list] = {}  # block → mcq.quantize.awq.PairResult per smoothed pair (mcq engine)
        self.clip_results: dict[str, list] = {}  # block → mcq.quantize.awq.ClipResult per clipped Linear (mcq engine)
        self.padded_widths = plan.padded_widths()   # component → intermediate width its MLPs grow to (`pad`)

    def search_report(self) -> dict[str, dict]:
        """What mcq's AWQ search did, for the summary and the manifest: per component, the smoothed pairs with their
        parents' mean loss against plain rounding (best / first candidate), and the clipped Linears with their
        summed output error against min/max ranges and the mean fraction of the range kept; per block, each pair
        and Linear. Empty for other methods and engines."""
        components: dict[str, dict] = {}
        blocks: dict[str, dict] = {}
        for block in dict.fromkeys([*self.awq_results, *self.clip_results]):
            pairs, clipped = self.awq_results.get(block, []), self.clip_results.get(block, [])
            blocks[block] = {
                "pairs": [{"smooth": r.smooth, "parent": r.parent, "tokens": r.tokens, "ratio": r.ratio, "duo": r.duo,
                           "loss_ratio": _ratio(r.best_error, r.initial_error)} for r in pairs],
                "clipped": [{"layer": c.layer, "error_ratio": _ratio(c.best_error, c.initial_error),
                             "kept": round(c.kept, 6)} for c in clipped]}
            totals = components.setdefault(component_of(block + "."),
                                           {"loss_ratios": [], "clip": [0.0, 0.0], "kept": []})
            totals["loss_ratios"] += [entry["loss_ratio"] for entry in blocks[block]["pairs"]]
            totals["clip"][0] += sum(c.initial_error for c in clipped)
            totals["clip"][1] += sum(c.best_error for c in clipped)
            totals["kept"] += [c.kept for c in clipped]
        summary = {component: {"pairs": len(t["loss_ratios"]),
                               "pair_loss_ratio": _mean(t["loss_ratios"]),
                               "clipped": len(t["kept"]),
                               "clip_error_ratio": _ratio(t["clip"][1], t["clip"][0]) if t["kept"] else None,
                               "kept": _mean(t["kept"])}
                   for component, t in components.items()}
        return {"components": summary, "blocks": blocks} if blocks else {}

    def _block_layers(self, block_name: str) -> dict[str, tuple[LayerScheme, str]]:
        """The block's quantized Linears (names relative to the block) → (scheme, method of their rule)."""
        prefix = block_name + "."
        rules = {rule.index: rule for rule in self.plan.recipe.rules}
        return {layer.name[len(prefix):]: (layer.scheme, rules[layer.rule].method or self.method)
                for layer in self.plan.quantized() if layer.name.startswith(prefix)}

    def _observer(self, method: str) -> str:
        return self.args.get("weight_observer", "minmax") if method != "gptq" else "minmax"

    def _config_groups(self, layers: dict[str, LayerScheme], method: str) -> dict:
        from compressed_tensors.quantization import QuantizationScheme

        actorder = self.args.get("actorder", "static") if method == "gptq" else None
        by_scheme: dict[LayerScheme, list[str]] = {}
        for name, scheme in sorted(layers.items()):
            by_scheme.setdefault(scheme, []).append(name)
        return {
            f"{method}_{i}": QuantizationScheme(
                targets=names, weights=quantization_args(scheme, observer=self._observer(method), actorder=actorder,
                                                         scale_dtype=self.scale_dtype))
            for i, (scheme, names) in enumerate(sorted(by_scheme.items(), key=lambda kv: kv[1][0]))
        }

    def _modifiers(self, by_method: dict[str, dict[str, LayerScheme]], llmc_pairs: list[Pair]) -> list:
        """llm-compressor's AWQ smoothing on `llmc_pairs` (engine llm-compressor), then observer ranges for the awq
        and rtn layers, and GPTQ for the layers whose rule says gptq."""
        from llmcompressor.modifiers.gptq import GPTQModifier
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier

        modifiers = []
        if llmc_pairs:
            modifiers.append(AWQModifier(mappings=[AWQMapping(_exact(p.smooth), [_exact(b) for b in p.balance])
                                                   for p in llmc_pairs],
                                         duo_scaling=self.args.get("duo_scaling", True),
                                         n_grid=self.args.get("n_grid", 20)))
        rounded = {**by_method.get("awq", {}), **by_method.get("rtn", {})}
        if rounded:
            modifiers.append(QuantizationModifier(config_groups=self._config_groups(rounded, "rtn")))
        if by_method.get("gptq"):
            modifiers.append(GPTQModifier(config_groups=self._config_groups(by_method["gptq"], "gptq"),
                                          block_size=self.args.get("block_size", 128),
                                          dampening_frac=self.args.get("dampening_frac", 0.01)))
        return modifiers

    def _search(self, block_name: str, block: nn.Module, pairs: list[Pair], layers: dict[str, LayerScheme],
                calls: list[Call]) -> list[torch.Tensor]:
        """mcq's AWQ search (mcq.quantize.awq) on the block's AWQ Linears `layers`: scales, then clipped ranges,
        applied to the block in place; returns the block's outputs."""
        quant_args = {name: quantization_args(scheme, observer="minmax", scale_dtype=self.scale_dtype)
                      for name, scheme in layers.items()}
        settings = SearchSettings(n_grid=self.args["n_grid"], duo_scaling=self.args["duo_scaling"],
                                  loss_tokens=self.args["loss_tokens"], weight_clip=self.args["weight_clip"])
        mixing = token_mixing(self.family.token_mixing.get(component_of(block_name + "."), ()))
        results, clipped, skipped, outputs = search_block(block, pairs, calls, getattr(calls, "origins", None),
                                                          settings, quant_args, mixing)
        self.awq_results[block_name] = results
        self.clip_results[block_name] = clipped
        self.skipped_pairs += [s.to_dict(block_name) for s in skipped]
        return outputs

    def quantize(self, block_name: str, block: nn.Module, calls: list[Call]) -> list[torch.Tensor] | None:
        """Quantize the block in place. Returns its outputs on `calls` as the next block should see them when they
        are already known (mcq's AWQ ran the block; see `search_block`), else None and the driver runs it.

        Under `pad` the block's MLP first grows to the planned width (exact: its outputs, and every later block's
        inputs, are unchanged), so it is calibrated and packed in the layout the plan writes."""
        from llmcompressor.core import LifecycleCallbacks, create_session

        component = component_of(block_name + ".")
        if component in self.padded_widths:
            pad_intermediate(block, self.family.paddable_mlps[component], self.padded_widths[component])
        layers = self._block_layers(block_name)
        if not layers:
            return None
        calibrated = self.method in ("awq", "gptq") and bool(calls)
        if self.method in ("awq", "gptq") and not calls:
            self.data_free_blocks.append(block_name)
        # Without calibration input every layer is rounded to nearest.
        methods = {name: method if calibrated else "rtn" for name, (_, method) in layers.items()}
        by_method: dict[str, dict[str, LayerScheme]] = {}
        for name, (scheme, _) in layers.items():
            by_method.setdefault(methods[name], {})[name] = scheme
        pairs: list[Pair] = []
        outputs = None
        if "awq" in by_method:
            pairs, skipped = resolve_pairs(block, self.family.smoothing_pairs.get(component, ()), methods,
                                           self.family.norm_offset)
            self.skipped_pairs += [s.to_dict(block_name) for s in skipped]
        # A block whose AWQ layers have no pair (the vision MLP's fc2 on its own) still gets clipped ranges.
        if self.engine == "mcq" and (pairs or ("awq" in by_method and self.args["weight_clip"])):
            outputs = self._search(block_name, block, pairs, by_method["awq"], calls)
        llmc_pairs = pairs if self.engine == "llm-compressor" else []
        if unusual := next((p for p in llmc_pairs if p.offset or p.heads > 1), None):
            # Its AWQModifier divides a norm's stored weight by the scales, which for x̂ · (1 + weight) is not the
            # smoothing the balance layers were scaled for, and takes one scale per balance input channel.
            how = f"scales by {unusual.offset:g} + weight" if unusual.offset else "is shared by every head"
            raise McqError(f"engine llm-compressor cannot smooth {unusual.smooth} in {block_name}: the norm {how}; "
                           "use engine mcq")
        modifiers = self._modifiers(by_method, llmc_pairs)
        # The session needs the calibration forward only for what collects statistics in it: GPTQ's Hessians,
        # llm-compressor's AWQ, the imatrix observer's E[x²]; mcq's AWQ has smoothed the block already.
        needs_data = calibrated and (bool(by_method.get("gptq")) or bool(llmc_pairs)
                                     or ("awq" in by_method and self._observer("awq") == "imatrix_mse"))
        # llm-compressor draws its own tqdm bars (AWQ grid search per mapping); they would bury mcq's per-block bar.
        with create_session() as session, torch.no_grad(), _silenced_stderr():
            session.initialize(model=block, recipe=modifiers, start=-1)
            LifecycleCallbacks.calibration_start()
            for args, kwargs in (calls if needs_data else []):
                block(*args, **kwargs)
            LifecycleCallbacks.sequential_epoch_end(list(block.modules()))
            LifecycleCallbacks.calibration_end()
            if llmc_pairs:
                self._collect_llmc_skips(block_name, modifiers[0], llmc_pairs)
            session.finalize()
        if calibrated and "awq" in by_method:
            # AWQ hands the next block the smoothed block's *unquantized* outputs, as llm-compressor's pipeline and
            # AutoAWQ do (the AWQ layers' rounding is applied data-free when packing): each block's scale search
            # then sees the float model's activations instead of compounding the rounding error of every block
            # before it. GPTQ layers keep their quantized weights (GPTQ writes them in place), so a GPTQ block
            # still propagates its quantization error, which GPTQ's later blocks are meant to compensate.
            from compressed_tensors.quantization.lifecycle.helpers import disable_quantization

            block.apply(disable_quantization)
        # GPTQ rewrote its layers after the search ran the block: then the driver computes the outputs.
        return None if by_method.get("gptq") else outputs

    def _collect_llmc_skips(self, block_name: str, modifier, pairs: list[Pair]) -> None:
        """The pairs llm-compressor's AWQModifier resolved but did not smooth (it skips a pair whose parent output
        is not finite, or that no activation reached, with a log line only): every smoothed pair leaves an error
        record, read here before `finalize` clears them."""
        smoothed = {record["layer_name"] for record in modifier._error_metrics}
        self.skipped_pairs += [
            SkippedPair(p.smooth, p.balance, "llm-compressor's AWQ skipped it (no activations reached it, or the "
                                             f"float output of {p.parent or 'the block'} is not finite)"
                        ).to_dict(block_name)
            for p in pairs if p.smooth not in smoothed]

    def packed_tensors(self, block_name: str, block: nn.Module) -> dict[str, torch.Tensor]:
        """Compress the block's quantized Linears to compressed-tensors `pack-quantized` and return those tensors.

        Scales are stored in the checkpoint's dtype, as llm-compressor saves a bf16 model (the engine computes in
        float32 for accurate Hessians and scale search)."""
        from compressed_tensors.compressors.base import compress_module

        tensors = {}
        for name, module in block.named_modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            compress_module(module, "pack-quantized")
            for param in PACKED_LINEAR_SUFFIXES:
                value = getattr(module, param, None)
                if isinstance(value, torch.Tensor):
                    if param == "weight_scale":
                        value = value.to(self.scale_dtype)
                    tensors[f"{block_name}.{name}.{param}"] = value.detach().to("cpu").contiguous()
        return tensors


def _ratio(part: float, whole: float) -> float:
    return round(part / whole, 6) if whole > 0 else 1.0


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _exact(relative_name: str) -> str:
    """An llm-compressor target matching exactly this module name."""
    return "re:^" + relative_name.replace(".", r"\.") + "$"


@contextlib.contextmanager
def _silenced_stderr():
    """Swallow third-party progress output written to stderr during one block (errors still raise)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()):
        yield
