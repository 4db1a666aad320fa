"""`quantize()`: one call from a checkpoint to a quantized variant directory (what `mcq quantize` runs).

model → recipe → plan (one decision per Linear) → calibration samples (awq/gptq) → the engine (block by block for
compressed-tensors, transformers' loader for bitsandbytes) → staged output with model card and manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mcq.errors import McqError

from .recipe import CALIBRATED_METHODS, QuantPlan, Recipe, layer_pattern, load_recipe, plan_quantization

DEFAULT_RECIPES = {"awq": "awq-w4g128", "gptq": "gptq-w4g128", "rtn": "rtn-w4g128", "bnb-nf4": "bnb-nf4",
                   "bnb-int8": "bnb-int8"}
METHODS = tuple(DEFAULT_RECIPES)


@dataclass
class QuantizeResult:
    out: str
    recipe: str
    method: str
    format: str
    targets: list[str]                       # the runtimes the plan was fitted to
    layers: dict[str, dict[str, int]]       # per component: quantized / kept / changed
    changes: list[dict[str, Any]]            # per kind of layer the plan changed from its rule: what and why
    runtimes: dict[str, str]                 # every runtime of the format: "target", "loads", or why not
    bytes_before: dict[str, int]
    bytes_after: dict[str, int]
    seconds: float
    calibration: dict[str, Any] = field(default_factory=dict)
    data_free_blocks: list[str] = field(default_factory=list)
    skipped_pairs: list[dict[str, Any]] = field(default_factory=list)   # AWQ smoothing pairs not applied, and why
    # mcq's AWQ search per component: pairs smoothed and their loss against plain rounding, Linears clipped and
    # their output error against min/max ranges (`LlmCompressorBlockQuantizer.search_report`; per block in the manifest)
    awq_search: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_recipe(method: str | None, recipe: str | Path | None,
                   target: str | list[str] | None = None) -> Recipe:
    """The recipe to run: `recipe` if given (checked against `method`), else the method's built-in default;
    planned for `target` (runtime names) instead of the recipe's own targets when given."""
    loaded = _resolve_recipe(method, recipe)
    return loaded if target is None else loaded.with_targets(target)


def _resolve_recipe(method: str | None, recipe: str | Path | None) -> Recipe:
    if method is not None and method not in METHODS:
        raise McqError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if recipe is None:
        if method is None:
            raise McqError("pass --method or --recipe")
        return load_recipe(DEFAULT_RECIPES[method])
    loaded = load_recipe(recipe)
    if method is not None:
        family, _, bits = method.partition("-")
        recipe_bits = {rule.bits for rule in loaded.rules}
        if loaded.method != family or (bits == "nf4" and recipe_bits != {4}) or (bits == "int8" and recipe_bits != {8}):
            raise McqError(f"recipe {loaded.name} is a {loaded.method} recipe ({'/'.join(map(str, sorted(recipe_bits)))}"
                           f"-bit), not {method}")
    return loaded


def _compressed_tensors_variant(checkpoint, plan: QuantPlan, staging: Path, samples: list[dict],
                                device: str, progress: bool) -> tuple[list[str], list[dict[str, Any]], dict]:
    from tqdm import tqdm

    from mcq.models.runtimes import RUNTIMES
    from mcq.models.weights import CheckpointReader, named_blocks, shell_model

    from .llmc import LlmCompressorBlockQuantizer
    from .sequential import BlockHandler, SequentialDriver
    from .writers.compressed_tensors import CompressedTensorsWriter, quantization_config

    path = checkpoint.path
    model = shell_model(checkpoint.config)
    reader = CheckpointReader(path)
    source_dtype = reader.dtype_of(checkpoint.family.embedding)
    quantizer = LlmCompressorBlockQuantizer(plan, checkpoint.family, scale_dtype=source_dtype, device=device)
    writer = CompressedTensorsWriter(reader, staging,
                                     official_layout=any(RUNTIMES[t].official_layout for t in plan.targets))
    blocks = [name for name, _ in named_blocks(model)]
    bar = tqdm(total=len(blocks), desc=f"{plan.recipe.method} {plan.recipe.name}", unit="block", disable=not progress)

    def emit(name: str, block: torch.nn.Module) -> None:
        writer.add_block(name, block, quantizer.packed_tensors(name, block))
        bar.update(1)

    driver = SequentialDriver(model, reader, samples, torch.float32, device)
    with bar:   # closed on an error too, so that the error's line does not start on the bar's
        driver.run(BlockHandler(quantizer.quantize, emit), progress=lambda name: bar.set_postfix_str(name))
    stored_config = json.loads((path / "config.json").read_text())
    for component, width in quantizer.padded_widths.items():
        if checkpoint.family.paddable_mlps[component].derived_from:
            continue   # the model computes its width from its source MLP's, written here too
        *parents, key = checkpoint.family.paddable_mlps[component].width_key
        section = stored_config
        for parent in parents:
            section = section[parent]
        section[key] = width
    args = plan.recipe.method_args
    stored_config["quantization_config"] = quantization_config(
        plan, scale_dtype=source_dtype,
        observer=args.get("weight_observer", "minmax") if plan.recipe.method != "gptq" else "minmax",
        actorder=args.get("actorder") if plan.recipe.method == "gptq" else None,
        plain_names=checkpoint.family.plain_quantization_names)
    writer.finish(stored_config, path)
    return quantizer.data_free_blocks, quantizer.skipped_pairs, quantizer.search_report()


def _bnb_variant(path: Path, plan: QuantPlan, staging: Path, device: str) -> None:
    from .bnb import quantize_bnb

    args = plan.recipe.method_args
    bits = {layer.scheme.bits for layer in plan.quantized()}.pop()
    quantize_bnb(path, staging, bits=bits, quant_type=args.get("quant_type", "nf4"),
                 double_quant=args.get("double_quant", True), compute_dtype=args.get("compute_dtype", "bfloat16"),
                 int8_threshold=args.get("int8_threshold", 6.0),
                 skip_modules=[layer.name for layer in plan.kept()], device=device)


def quantize(model: str | Path, out: str | Path, *, method: str | None = None, recipe: str | Path | None = None,
             target: str | list[str] | None = None, calib: str | None = None, num_samples: int | None = None,
             max_slice_nums: int | None = None, device: str = "cpu", seed: int = 0, force: bool = False,
             progress: bool = True, calibration: tuple[list[dict], dict[str, Any]] | None = None) -> QuantizeResult:
    """Quantize `model` into `out` (see the module doc). `target`: runtime name(s) the output must load in
    (`mcq.models.runtimes.RUNTIMES`), instead of the recipe's `target:`. `calibration`: samples already encoded by
    `mcq.calibration.calibration_samples` and their description, used instead of encoding `calib` here (`mcq build`
    encodes its set once for every variant)."""
    from mcq.extras import require_method
    from mcq.models.family import linear_layers
    from mcq.models.loading import (check_device, check_layout, meta_skeleton, open_checkpoint,
                                    safetensors_component_bytes, stored_tensors)
    from mcq.models.runtimes import RUNTIMES
    from mcq.outputs import check_output, staged_output, write_manifest

    started = time.perf_counter()
    chosen = resolve_recipe(method, recipe, target)
    require_method(chosen.method)
    given = [option for option, value in (("--calib", calib), ("--num-samples", num_samples),
                                          ("--max-slice-nums", max_slice_nums)) if value is not None]
    if given and chosen.method not in CALIBRATED_METHODS:
        raise McqError(f"{given[0]} applies to awq and gptq; {chosen.name} ({chosen.method}) uses no calibration data")
    check_device(device)
    checkpoint = open_checkpoint(model)
    path, config = checkpoint.path, checkpoint.config
    if getattr(config, "quantization_config", None):
        raise McqError(f"{path} is already quantized; quantize the original bf16 checkpoint")
    lacking = {name: why for name in chosen.targets if (why := RUNTIMES[name].lacks(checkpoint.family.name))}
    if lacking and (target is not None or len(lacking) == len(chosen.targets)):
        name, why = next(iter(lacking.items()))
        raise McqError(f"target {name} cannot load MiniCPM-V {checkpoint.release}: {why}")
    if lacking:   # the recipe's own targets name runtimes of other families too: plan for those of this one
        chosen = chosen.with_targets([name for name in chosen.targets if name not in lacking])
    skeleton = meta_skeleton(config)
    check_layout(path, skeleton, stored_tensors(path))
    plan = plan_quantization(chosen, linear_layers(skeleton))
    out = Path(out)
    check_output(out, force, source=path)
    torch.manual_seed(seed)
    samples: list[dict] = []
    described: dict[str, Any] = {}
    if chosen.method in CALIBRATED_METHODS:
        from mcq.calibration import calibration_samples

        samples, described = calibration or calibration_samples(
            path, calib, num_samples or chosen.calibration.num_samples,
            max_slice_nums or chosen.calibration.max_slice_nums, seed)
    data_free: list[str] = []
    skipped: list[dict[str, Any]] = []
    search: dict[str, Any] = {}
    with staged_output(out, force) as staging:
        if chosen.method == "bnb":
            _bnb_variant(path, plan, staging, device)
        else:
            data_free, skipped, search = _compressed_tensors_variant(checkpoint, plan, staging, samples, device,
                                                                     progress)
        result = QuantizeResult(
            out=str(out), recipe=chosen.name, method=chosen.method,
            format="bitsandbytes" if chosen.method == "bnb" else "compressed-tensors (pack-quantized)",
            targets=list(plan.targets), layers=plan.summary(),
            changes=[d for d in plan.decisions() if d["changed"]],
            runtimes=runtime_fit(plan, checkpoint.family.name),
            bytes_before=safetensors_component_bytes(path), bytes_after=safetensors_component_bytes(staging),
            seconds=0.0, calibration=described, data_free_blocks=data_free, skipped_pairs=skipped,
            awq_search=search.get("components", {}))
        _write_card(staging, checkpoint, chosen, result)
        settings = {"method": chosen.method, "device": device, "seed": seed, "calibration": described}
        write_manifest(staging, kind="quantized", source=path, recipe=chosen.to_dict(), settings=settings,
                       extra={"plan": plan.to_dict(), "runtimes": result.runtimes, "skipped_smoothing_pairs": skipped,
                              "awq_search": search})
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def runtime_fit(plan: QuantPlan, family: str) -> dict[str, str]:
    """Every runtime that reads the plan's format: "target" (the plan was fitted to it), "loads" (its rules hold the
    plan as well), or why it cannot (it has no model of `family`; else the first problem, and how many layers have
    one)."""
    from mcq.models.runtimes import RUNTIMES

    fit = {}
    for name, runtime in RUNTIMES.items():
        if plan.recipe.format not in runtime.formats:
            continue
        if why := runtime.lacks(family):
            fit[name] = f"no: {why}"
            continue
        problems = plan.problems(runtime)
        if name in plan.targets:
            fit[name] = "target"
        elif not problems:
            fit[name] = "loads"
        else:
            whys: dict[str, list[str]] = {}
            for layer, why in problems:
                whys.setdefault(why, []).append(layer)
            why, layers = next(iter(whys.items()))
            example = layer_pattern(layers[0]) + (", ..." if len(layers) > 1 else "")
            others = f"; {len(whys) - 1} other reason(s)" if len(whys) > 1 else ""
            fit[name] = f"no: {why} ({len(layers)} layer(s): {example}){others}"
    return fit


def _write_card(staging: Path, checkpoint, recipe: Recipe, result: QuantizeResult) -> None:
    from mcq.models.runtimes import RUNTIMES
    from mcq.outputs import format_component_bytes, write_model_card

    source = checkpoint.path
    load = f"```python\n{checkpoint.family.load_code[recipe.format]}\n```"
    runtime_rows = ["| runtime | built for it | its rules hold this output | how to load |",
                    "| --- | --- | --- | --- |"]
    for name, fit in result.runtimes.items():
        runtime = RUNTIMES[name]
        loads = "yes" if fit in ("target", "loads") else fit
        test = runtime.checked_by.get(checkpoint.family.name)
        checked = f" Checked by mcq's `{test}`." if test else ""
        runtime_rows.append(f"| `{name}`: {runtime.description} | {'yes' if fit == 'target' else 'no'} | {loads} | "
                            f"{runtime.load}.{checked} {runtime.notes} |".replace("  |", " |"))
    runtimes = ("Built for: " + ", ".join(f"`{t}`" for t in result.targets) + " (the recipe's `target:`; "
                "`mcq quantize --target` plans it for others).\n\n" + "\n".join(runtime_rows))
    layer_rows = ["| component | quantized | kept | changed |", "| --- | ---: | ---: | ---: |"]
    layer_rows += [f"| {c} | {v['quantized']} | {v['kept']} | {v['changed']} |" for c, v in result.layers.items()]
    changes = "\n".join(f"- `{c['layers']}` ({c['count']}): {c['scheme']}: {c['reason']}" for c in result.changes)
    skipped = "\n".join(f"- {line}" for line in skipped_pair_lines(result.skipped_pairs))
    if skipped:
        changes += f"\n\nAWQ smoothing pairs not applied (their layers are rounded without AWQ scales):\n{skipped}"
    search = "\n".join(f"- {line}" for line in search_lines(result.awq_search))
    if search:
        changes += f"\n\nAWQ search (per block in mcq-manifest.json):\n{search}"
    calibration = (json.dumps(result.calibration, indent=2, sort_keys=True) if result.calibration
                   else "none (data-free method)")
    write_model_card(
        staging, title=f"{source.name} — {recipe.name}", base_model=source.name,
        variant={"method": recipe.method, "format": "bitsandbytes" if recipe.method == "bnb" else "compressed-tensors",
                 "bits": min(rule.bits for rule in recipe.rules), "tags": list(result.targets)},
        source=source,
        sections=[
            ("Runtimes", runtimes),
            ("How to load", load),
            ("Recipe", f"`{recipe.name}` ({recipe.method}): {recipe.description}\n\n```yaml\n{recipe.text.strip()}\n```"),
            ("Layers", "\n".join(layer_rows) + "\n\nChanged from their rule (per kind of layer; every layer with its "
             f"reason is in mcq-manifest.json):\n{changes or 'none'}"),
            ("Calibration set", f"```json\n{calibration}\n```"),
            ("Sizes", format_component_bytes(result.bytes_before, result.bytes_after)),
            ("Model", f"MiniCPM-V {checkpoint.release} ({checkpoint.llm_name} LLM), quantized by mcq."),
        ])


def format_result(result: QuantizeResult) -> str:
    """The summary table `mcq quantize` prints."""
    lines = [f"{result.out}: {result.recipe} ({result.format}) in {result.seconds:.1f} s, for "
             + ", ".join(result.targets), "",
             f"{'component':<12}{'quantized':>10}{'kept':>6}{'changed':>9}{'bytes before':>16}{'bytes after':>15}"]
    for component, counts in result.layers.items():
        lines.append(f"{component:<12}{counts['quantized']:>10}{counts['kept']:>6}{counts['changed']:>9}"
                     f"{result.bytes_before.get(component, 0):>16,}{result.bytes_after.get(component, 0):>15,}")
    before, after = sum(result.bytes_before.values()), sum(result.bytes_after.values())
    lines.append(f"{'total':<37}{before:>16,}{after:>15,}  ({after / before:.2f}x)")
    lines += [f"changed: {c['layers']} ({c['count']}): {c['scheme']}: {c['reason']}" for c in result.changes]
    loads = [name for name, fit in result.runtimes.items() if fit in ("target", "loads")]
    lines.append("loads in (by each runtime's rules): " + ", ".join(loads))
    lines += [f"not in {name}: {fit.removeprefix('no: ')}" for name, fit in result.runtimes.items()
              if fit not in ("target", "loads")]
    lines += [f"AWQ skipped {line}" for line in skipped_pair_lines(result.skipped_pairs)]
    lines += [f"AWQ search: {line}" for line in search_lines(result.awq_search)]
    if result.data_free_blocks:
        lines.append(f"no calibration input reached {len(result.data_free_blocks)} block(s) (quantized data-free): "
                     + ", ".join(result.data_free_blocks))
    return "\n".join(lines)


def search_lines(components: dict[str, dict[str, Any]]) -> list[str]:
    """One line per component that mcq's AWQ search worked on."""
    lines = []
    for component, found in components.items():
        parts = []
        if found["pairs"]:
            parts.append(f"{found['pairs']} pair(s) smoothed, "
                         f"parent loss {found['pair_loss_ratio']:.2f}x plain rounding")
        if found["clipped"]:
            parts.append(f"{found['clipped']} Linear(s) clipped, "
                         f"output error {found['clip_error_ratio']:.2f}x min/max, "
                         f"{found['kept']:.3f} of the range kept on average")
        lines.append(f"{component}: " + "; ".join(parts))
    return lines


def skipped_pair_lines(skipped: list[dict[str, Any]]) -> list[str]:
    """One line per skipped smoothing pair and reason, naming the blocks it was skipped in (every LLM layer under
    grouped-query attention skips v_proj → o_proj: one line, not 36)."""
    grouped: dict[tuple[str, tuple[str, ...], str], list[str]] = {}
    for entry in skipped:
        grouped.setdefault((entry["smooth"], tuple(entry["balance"]), entry["reason"]), []).append(entry["block"])
    return [f"{smooth} → {', '.join(balance)} in {len(blocks)} block(s) ({_block_range(blocks)}): {reason}"
            for (smooth, balance, reason), blocks in grouped.items()]


def _block_range(blocks: list[str]) -> str:
    """`llm.model.layers.0-35` for consecutive numbered blocks of one stack, else the names."""
    stems = {block.rpartition(".")[0] for block in blocks}
    numbers = [block.rpartition(".")[2] for block in blocks]
    if len(blocks) > 2 and len(stems) == 1 and all(n.isdigit() for n in numbers):
        first, last = int(numbers[0]), int(numbers[-1])
        if [int(n) for n in numbers] == list(range(first, last + 1)):
            return f"{stems.pop()}.{first}-{last}"
    return ", ".join(blocks)
