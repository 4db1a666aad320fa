"""`export_onnx`: a MiniCPM-V checkpoint (or an `mcq quantize` output of it) → an onnxruntime-ready directory.

Layout (onnx-community / transformers.js):

    OUT/
      onnx/vision_encoder{suffix}.onnx        slices + host inputs → image_features [G, 64, hidden]
      onnx/embed_tokens{suffix}.onnx          input_ids → inputs_embeds
      onnx/decoder_model_merged{suffix}.onnx  inputs_embeds, attention_mask, position_ids, past → logits, present
      onnx/*.onnx_data                        weights of a graph over 2 GiB (external data)
      config.json                             the model's config + `transformers.js_config` (dtypes, external data)
      preprocessor_config.json, tokenizer files, generation_config.json, ...   (copied from the model)
      README.md, mcq-manifest.json

The graphs are traced from the family's torch programs (`Family.graphs`, `traced.py`). The resampler family's
(2.6 / 4.0 / 4.5) take what its host computes (`runtime.py`, `OnnxMiniCPMV`); a family with a generic host
(`Family.programs`: 4.6) has a vision encoder that takes one image, and a decoder whose past and present include
every state its layers keep (config.json's `mcq_decoder_state`), run by `program_runtime.OnnxProgramModel`.

Suffixes follow transformers.js (`_fp16`, `_int8`, `_q4`; none for fp32). The output is staged and renamed into
place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mcq.errors import McqError

from .quantize import (
    DEFAULT_BLOCK_SIZE,
    PRECISION_BITS,
    WeightWriter,
    check_options,
    export_recipe,
    float_plans,
    plan_from_mcq,
    plan_onnxruntime,
)
from .runtime import DTYPE_SUFFIXES, GRAPHS
from .traced import write_traced_graph

# What runs an export: mcq's host of the resampler family's graphs, or the host of any family's programs.
_RUNTIMES = {False: "mcq.export.onnx.OnnxMiniCPMV", True: "mcq.export.onnx.program_runtime.OnnxProgramModel"}
# The files a runtime needs beside the graphs; an export without them could not preprocess or tokenize.
REQUIRED_SUPPORT_FILES = ("preprocessor_config.json", "tokenizer_config.json")


@dataclass
class OnnxExportResult:
    out: Path
    model: str
    from_dir: str | None
    precision: str
    block_size: int | None
    files: dict[str, int]                    # path relative to out → bytes
    dtypes: dict[str, str]                   # graph → transformers.js dtype
    external_data: list[str]
    linears: dict[str, dict[str, int]]       # component → {"mcq": n, "onnxruntime": n, "float": n}
    fallbacks: list[str]
    seconds: float
    runtime: str                             # the class that runs it (mcq's host of the family's exports)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "model": self.model, "from": self.from_dir, "precision": self.precision,
                "block_size": self.block_size, "files": self.files, "dtypes": self.dtypes,
                "external_data": self.external_data, "linears": self.linears, "fallbacks": self.fallbacks,
                "seconds": round(self.seconds, 3), "runtime": self.runtime}

    def summary(self) -> str:
        lines = [f"wrote {self.out} (ONNX {self.precision}" + (f" from {self.from_dir}" if self.from_dir else "")
                 + f", {self.seconds:.1f} s)"]
        for name, size in self.files.items():
            if name.startswith("onnx/"):
                lines.append(f"  {name:<44} {size / 2**20:10.2f} MiB")
        for component, counts in self.linears.items():
            parts = [f"{counts[k]} {label}" for k, label in (("mcq", "MatMulNBits from --from"),
                                                              ("onnxruntime", "MatMulNBits by onnxruntime"),
                                                              ("float", "float")) if counts.get(k)]
            lines.append(f"  {component} Linears: {', '.join(parts)}")
        lines += [f"  fallback: {text}" for text in self.fallbacks]
        lines.append(f"  run it: mcq chat --model {self.out / 'onnx'} \"question\" --image IMAGE")
        lines.append(f"  score it: mcq validate --reference MODEL --variant {self.out}")
        return "\n".join(lines)


def export_onnx(model: str | Path, out: str | Path, *, precision: str = "fp32", block_size: int | None = None,
                from_dir: str | Path | None = None, force: bool = False, symmetric: bool = False,
                accuracy_level: int = 4, algorithm: str = "default") -> OnnxExportResult:
    """Export `model` (or, with `from_dir`, its `mcq quantize` output) to ONNX at `precision`.

    int4 / int8 write MatMulNBits: from `from_dir`'s calibrated levels when given (each layer keeps its own group
    size; giving `block_size` is an error), else by onnxruntime's quantizer at `block_size` (default
    DEFAULT_BLOCK_SIZE; `symmetric`, `algorithm`:
    default | rtn | k_quant). `accuracy_level` is MatMulNBits' activation precision on CPU (0: float32, 4: int8,
    onnxruntime-genai's CPU default): on the real-width benchmark 4 decodes 4.7x faster than 0, and on the tiny
    outlier model it moves AWQ int4's mean KL from 0.002484 to 0.002488 (benchmarks/README.md).
    """
    from mcq.models.family import linear_layers
    from mcq.models.loading import load_processor, open_checkpoint, resolve_model_path
    from mcq.models.weights import shell_model
    from mcq.outputs import check_output, staged_output, write_manifest

    from ..weights_source import ExportWeights, MetaWeights

    check_options(precision, block_size, algorithm, from_quantized=from_dir is not None)
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if from_dir is not None and (algorithm != "default" or symmetric):
        # The calibrated levels are written as stored: onnxruntime's quantizer (and its options) does not run.
        raise McqError("--from writes the quantize output's own levels; onnxruntime quantizer options "
                       "(algorithm, symmetric) do not apply to it")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise McqError(f"accuracy_level must be 0-4 (MatMulNBits), got {accuracy_level!r}")
    source = resolve_model_path(model)
    out = Path(out)
    check_output(out, force, source=source)
    if from_dir is not None:
        check_output(out, force, source=resolve_model_path(from_dir))
    for name in REQUIRED_SUPPORT_FILES:
        if not (source / name).is_file():
            raise McqError(f"{source} has no {name}: an ONNX export ships the processor and tokenizer configs a "
                           "runtime needs to prepare inputs")
    family = open_checkpoint(source).family
    # The processor configs must also be valid, before any slow work.
    if family.programs is None:
        load_processor(source)
    else:
        family.calibration.open_encoder(source)
    started = time.perf_counter()
    weights = ExportWeights(model, from_dir, every_family=True)
    try:
        programs = family.programs
        if programs is None:
            weights.spec   # the resampler family's programs are built for the releases it knows (else a McqError)
        shell = shell_model(weights.config)
        linears = linear_layers(shell)
        bits = PRECISION_BITS.get(precision)
        if from_dir is not None:
            plans = plan_from_mcq(weights, linears, precision)
            recipe = None
        elif bits is not None:
            plans = plan_onnxruntime(linears, bits, block_size, symmetric, family.name, algorithm)
            recipe = export_recipe(bits, block_size, symmetric, family.name).to_dict()
        else:
            plans, recipe = float_plans(linears, f"{precision} export"), None
        writer = WeightWriter(weights, precision, plans, accuracy_level, symmetric)
        write = partial(write_traced_graph, graphs=family.graphs, weights=MetaWeights(weights), writer=writer)
        with staged_output(out, force) as staging:
            onnx_dir = staging / "onnx"
            onnx_dir.mkdir()
            dtypes, external = {}, []
            for graph in GRAPHS:
                dtype, is_external = write(graph, onnx_dir=onnx_dir, precision=precision)
                dtypes[graph] = dtype
                if is_external:
                    external.append(f"{graph}{DTYPE_SUFFIXES[dtype]}.onnx")
            state = None if programs is None else programs.state(weights.config)
            _write_configs(staging, source, weights, dtypes, external, state)
            settings = {"precision": precision, "block_size": block_size if recipe else None,
                        "symmetric": symmetric if recipe else None,
                        "accuracy_level": accuracy_level if precision in PRECISION_BITS else None,
                        "algorithm": algorithm if recipe else None,
                        "from": None if from_dir is None else Path(from_dir).name}
            _write_card(staging, source, weights, precision, dtypes, plans, from_dir, generic=programs is not None)
            write_manifest(staging, kind="onnx", source=source, recipe=recipe, settings=settings,
                           extra={"from": None if from_dir is None else _identity(weights.path),
                                  "from_quantization": weights.quantized_from,
                                  "graphs": {g: f"onnx/{g}{DTYPE_SUFFIXES[d]}.onnx" for g, d in dtypes.items()},
                                  "linears": [plan.to_dict() for plan in plans.values()]})
            files = {p.relative_to(staging).as_posix(): p.stat().st_size
                     for p in sorted(staging.rglob("*")) if p.is_file()}
    finally:
        weights.close()
    return OnnxExportResult(
        out=out, model=str(model), from_dir=None if from_dir is None else str(from_dir), precision=precision,
        block_size=block_size if recipe else None, files=files, dtypes=dtypes, external_data=external,
        linears=_count_linears(plans), fallbacks=[f"{p.name}: {p.reason}" for p in plans.values() if p.fallback],
        seconds=time.perf_counter() - started, runtime=_RUNTIMES[family.programs is not None])


def _identity(directory: Path) -> dict[str, Any]:
    """Name and file hashes of the `--from` output (the manifest's `source` identifies the model the same way)."""
    from mcq.outputs import file_sha256

    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and not p.name.startswith("."))
    return {"name": Path(directory).name, "files": {p.name: file_sha256(p) for p in files}}


def _write_configs(staging: Path, source: Path, weights, dtypes: dict[str, str], external: list[str],
                   state) -> None:
    from mcq.outputs import copy_support_files

    copy_support_files(source, staging)
    # The config of the weights exported (an --from output's, if `pad` widened an MLP), without the quantization
    # the ONNX files no longer use, plus what transformers.js reads to pick the files.
    config = json.loads((weights.path / "config.json").read_text())
    config.pop("quantization_config", None)
    config["transformers.js_config"] = {"dtype": dtypes}
    if external:
        config["transformers.js_config"]["use_external_data_format"] = dict.fromkeys(external, 1)
    if state is not None:
        # A traced decoder's state tensors (`Programs.state`), for hosts that do not read mcq's code: each input,
        # the output that feeds it on the next call, and its shape (null: batch, or a KV cache's past length).
        config["mcq_decoder_state"] = [{"input": s.name, "output": s.output, "shape": list(s.shape)} for s in state]
    (staging / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _count_linears(plans) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for plan in plans.values():
        entry = counts.setdefault(plan.component, {"mcq": 0, "onnxruntime": 0, "float": 0})
        entry[plan.source or "float"] += 1
    return counts


def _write_card(staging: Path, source: Path, weights, precision: str, dtypes: dict[str, str], plans,
                from_dir, generic: bool) -> None:
    from mcq.outputs import write_model_card

    counts = _count_linears(plans)
    rows = ["| component | MatMulNBits (mcq levels) | MatMulNBits (onnxruntime) | float |",
            "| --- | ---: | ---: | ---: |"]
    rows += [f"| {c} | {n['mcq']} | {n['onnxruntime']} | {n['float']} |" for c, n in counts.items()]
    files = "\n".join(f"- `onnx/{g}{DTYPE_SUFFIXES[d]}.onnx` ({d})" for g, d in dtypes.items())
    if precision in PRECISION_BITS:
        origin = (f"Quantized Linears are MatMulNBits with the integer levels and scales of the `mcq quantize` output "
                  f"`{Path(from_dir).name}` (its calibration carries over unchanged)." if from_dir else
                  "Quantized Linears are MatMulNBits written by onnxruntime's quantizer.")
    else:
        origin = ("Weights are stored in float16 and computed in float32." if precision == "fp16" else
                  "Weights are float32.") + (f" They are the dequantized weights of `{Path(from_dir).name}`."
                                             if from_dir else "")
    if generic:
        layout = ("Inputs and outputs follow the onnx-community / transformers.js layout, with the decoder's whole "
                  "state as inputs and outputs (`past_conv.{i}` / `past_recurrent.{i}` of the linear-attention "
                  "layers beside the full-attention layers' KV cache); the vision encoder takes one image and "
                  "host-computed index tables (the family's `Programs.vision_inputs`). See docs/formats/onnx.md.")
        usage = ("```python\nfrom mcq.export.onnx.program_runtime import OnnxProgramModel\n"
                 "model = OnnxProgramModel(\".\")   # runs the three graphs with their state\n```\n\n"
                 "```bash\nmcq validate --reference BASE_MODEL --variant .\n```")
    else:
        layout = ("Inputs and outputs follow the onnx-community / transformers.js layout; the vision encoder also "
                  "takes host-computed position ids, the resampler's key positions, padding masks and the temporal "
                  "packing index (`mcq.export.onnx.runtime.vision_inputs`).")
        usage = ("```bash\nmcq chat --model ./onnx --image photo.jpg \"What is in the image?\"\n```\n\n"
                 "```python\nfrom mcq.export.onnx import OnnxMiniCPMV\nmodel = OnnxMiniCPMV(\"./onnx\")\n"
                 "print(model.chat(msgs=[{\"role\": \"user\", \"content\": [image, \"Describe it.\"]}], "
                 "sampling=False, num_beams=1))\n```")
    sections = [
        ("Files", f"{files}\n\n{layout}"),
        ("Weights", f"Precision {precision}. {origin} Embeddings, norms and the Linears a recipe keeps (lm_head) "
                    "stay float.\n\n" + "\n".join(rows)),
        ("Usage", usage),
    ]
    write_model_card(staging, title=f"{source.name} ONNX ({precision})", base_model=source.name,
                     variant={"library": None, "method": "onnx", "format": precision,
                              "bits": PRECISION_BITS.get(precision), "tags": ["onnx", "onnxruntime"]},
                     sections=sections, source=source)
