"""`mcq export --format gguf`: the LLM file and the mmproj file llama.cpp / Ollama load, from the checkpoint itself.

No model folder is edited and no remote code runs: tensors are read from the safetensors shards (or from an
`mcq quantize` output with `--from`), renamed and transformed as llama.cpp expects (each family's gguf.py under
mcq/models), and streamed to disk. K-quants go through libllama with an importance matrix from mcq's multimodal
calibration.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mcq.errors import McqError
from mcq.models.ggufspec import GgufTensor

from ..rows import row_ranges
from .imatrix import write_imatrix_file
from .vocab import read_vocab
from .writer import PYTHON_TYPES, check_type, place, require_llama_cpp, stored_types, write_gguf

IMATRIX_SAMPLES = 64     # the AWQ/GPTQ recipes' calibration size
IMATRIX_SLICES = 2
IMATRIX_FILE = "imatrix.safetensors"


@dataclass
class GgufFile:
    path: str
    ggml_type: str
    bytes: int
    tensors: int
    fallbacks: dict[str, str] = field(default_factory=dict)   # tensor → "TYPE (reason)"


@dataclass
class GgufExportResult:
    out: str
    version: str
    llm: GgufFile
    mmproj: GgufFile
    imatrix: dict[str, Any] | None
    weights_from: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.out}: MiniCPM-V {self.version} → GGUF in {self.seconds:.1f} s (weights from "
                 f"{self.weights_from})"]
        for role, file in (("llm", self.llm), ("mmproj", self.mmproj)):
            lines.append(f"  {role:<7}{Path(file.path).name}  {file.ggml_type}  {file.tensors} tensors  "
                         f"{file.bytes / 2**20:.1f} MiB")
            lines += [f"    fallback: {name} → {why}" for name, why in file.fallbacks.items()]
        if self.imatrix:
            lines.append(f"  imatrix: {self.imatrix['entries']} tensors from {self.imatrix['source']}")
        return "\n".join(lines)


def export_gguf(model: str | Path, out: str | Path, *, quant: str = "F16", mmproj_quant: str = "F16",
                imatrix: str | None = "auto", from_dir: str | Path | None = None, calib: str | None = None,
                num_samples: int | None = None, seed: int = 0, force: bool = False,
                progress: bool = True) -> GgufExportResult:
    from mcq.export.weights_source import ExportWeights

    started = time.perf_counter()
    quant, mmproj_quant = check_type(quant, "--quant"), check_type(mmproj_quant, "--mmproj-quant")
    weights = ExportWeights(model, from_dir, every_family=True)
    try:
        return _export(weights, model, Path(out), quant, mmproj_quant, imatrix, from_dir, calib, num_samples, seed,
                       force, progress, started)
    finally:
        weights.close()


def _export(weights, model, out: Path, quant: str, mmproj_quant: str, imatrix: str | None, from_dir, calib,
            num_samples, seed: int, force: bool, progress: bool, started: float) -> GgufExportResult:
    from mcq.outputs import staged_output, write_manifest

    config, layout, version = weights.config, weights.checkpoint.family.gguf, weights.checkpoint.release
    layout.check(config)
    weights.check_output(out, force)
    # Files are named after the checkpoint folder (a tiny model after its spec, not its cache folder).
    name = str(model).replace(":", "-") if str(model).startswith("tiny:") else weights.model_path.name
    params = weights.names()
    llm_tensors = layout.llm_tensors(config, params)
    mmproj_tensors = layout.mmproj_tensors(config, params)
    vocab = read_vocab(weights.path, lambda path: layout.tokenizer(path, config),
                       config.get_text_config().vocab_size)
    needs_libllama = quant not in PYTHON_TYPES or mmproj_quant not in PYTHON_TYPES
    if needs_libllama:
        require_llama_cpp()
    matrix, matrix_info = _imatrix(imatrix, weights, llm_tensors + mmproj_tensors, quant, mmproj_quant, calib,
                                   num_samples, seed, progress)
    bar = _progress_bar(len(llm_tensors) + len(mmproj_tensors), progress)
    try:
        with staged_output(out, force) as staging:
            llm_file = staging / f"{name}-{quant}.gguf"
            mmproj_file = staging / f"mmproj-{name}-{mmproj_quant}.gguf"
            llm = _write_file(llm_file, layout.llm_arch(config), quant,
                              {**_general(name, quant), **layout.llm_metadata(config), **vocab.metadata()},
                              llm_tensors, weights, matrix, bar)
            mmproj = _write_file(mmproj_file, "clip", mmproj_quant,
                                 {**_general(f"mmproj-{name}", mmproj_quant),
                                  "general.type": ("str", "mmproj"),
                                  "general.description": ("str", f"MiniCPM-V {version} {layout.mmproj_description}"),
                                  **layout.mmproj_metadata(config, params, weights.path)},
                                 mmproj_tensors, weights, matrix, bar)
            if matrix_info and matrix_info["source"] == "calibration":
                # Kept beside the files: `--imatrix OUT/imatrix.safetensors` reuses it for another type.
                write_imatrix_file(staging / IMATRIX_FILE, matrix,
                                   {"calibration": json.dumps(matrix_info["calibration"], sort_keys=True)})
            result = GgufExportResult(out=str(out), version=version, llm=llm, mmproj=mmproj, imatrix=matrix_info,
                                      weights_from=str(from_dir) if from_dir else str(weights.model_path), seconds=0.0)
            for file in (result.llm, result.mmproj):
                file.path = str(out / Path(file.path).name)
            _write_card(staging, weights, result, quant, mmproj_quant)
            settings = {"format": "gguf", "quant": quant, "mmproj_quant": mmproj_quant, "imatrix": matrix_info,
                        "from": Path(from_dir).name if from_dir else None, "seed": seed}
            write_manifest(staging, kind="gguf", source=weights.model_path,
                           recipe=getattr(config, "quantization_config", None), settings=settings)
    finally:
        if bar is not None:
            bar.close()
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _general(name: str, type_name: str) -> dict[str, tuple[str, object]]:
    from .writer import file_type

    return {"general.name": ("str", name), "general.file_type": ("u32", file_type(type_name)),
            "general.quantization_version": ("u32", 2)}


def _progress_bar(total: int, enabled: bool, desc: str = "Writing GGUF tensors", unit: str = "tensor"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def _tensor_values(weights, tensor: GgufTensor) -> Iterator[np.ndarray]:
    """A tensor's values as blocks of rows, read from the mapped checkpoint and cast to float32 a block at a time
    (the embedding table and lm_head are 2.5 GB each in float32 at the real vocabulary). A transformed tensor (a
    layer's projection or norm, never one of the large tables) is transformed whole."""
    if tensor.compute is not None:
        yield tensor.compute()
        return
    values = weights.tensor(tensor.source)
    if tensor.transform is not None:
        yield tensor.transform(values.float()).numpy()
        return
    row_bytes = 4 * (values.numel() // max(values.shape[0], 1))
    for start, stop in row_ranges(values.shape[0], row_bytes):
        yield values[start:stop].float().numpy()


def _write_file(path: Path, arch: str, type_name: str, metadata: dict, tensors: list[GgufTensor],
                weights, matrix: dict[str, np.ndarray] | None, bar) -> GgufFile:
    from .writer import llama_quantize

    # A type gguf-py cannot encode is written as F16 first, then re-quantized by libllama.
    written_type = type_name if type_name in PYTHON_TYPES else "F16"
    placements = {t.name: place(t, written_type) for t in tensors}
    target = path if written_type == type_name else path.with_suffix(".f16.gguf")
    if target != path:
        metadata = {**metadata, **_general(metadata["general.name"][1], "F16")}
    write_gguf(target, arch, metadata, tensors, placements, lambda t: _tensor_values(weights, t),
               progress=(lambda _name: bar.update(1)) if bar is not None else None)
    fallbacks = {name: f"{p.ggml_type} ({p.fallback})" for name, p in placements.items() if p.fallback}
    if target != path:
        entries = {t.name: matrix[t.name] for t in tensors if matrix and t.name in matrix}
        llama_quantize(target, path, type_name, entries or None, threads=os.cpu_count() or 1)
        target.unlink()
        fallbacks = _libllama_fallbacks(path, tensors, type_name)
    return GgufFile(path=str(path), ggml_type=type_name, bytes=path.stat().st_size, tensors=len(tensors),
                    fallbacks=fallbacks)


def _libllama_fallbacks(path: Path, tensors: list[GgufTensor], type_name: str) -> dict[str, str]:
    """Matrices whose row length no block of the file's base type divides, with the type llama.cpp stored them in
    instead (its `tensor_type_fallback`)."""
    import gguf

    base = type_name
    while base not in gguf.GGMLQuantizationType.__members__ and "_" in base:
        base = base.rsplit("_", 1)[0]      # Q4_K_M → Q4_K, IQ3_XXS → IQ3 (→ 256 below)
    members = gguf.GGMLQuantizationType.__members__
    block = gguf.GGML_QUANT_SIZES[members[base]][0] if base in members else 256
    stored = stored_types(path)
    return {t.name: f"{stored[t.name]} (rows of {t.shape[-1]} are not a multiple of {type_name}'s block of {block})"
            for t in tensors if t.quantizable and t.shape[-1] % block}


def _imatrix(choice: str | None, weights, tensors: list[GgufTensor], quant: str, mmproj_quant: str,
             calib: str | None, num_samples: int | None, seed: int,
             progress: bool) -> tuple[dict[str, np.ndarray] | None, dict[str, Any] | None]:
    from .imatrix import read_imatrix_file

    if quant in PYTHON_TYPES and mmproj_quant in PYTHON_TYPES:
        if choice not in (None, "auto", "none"):
            raise McqError(f"--imatrix {choice}: no type asked for uses one ({quant}, {mmproj_quant} are encoded "
                           "without it); it applies to K-quants and i-quants")
        return None, None
    choice = choice or "auto"
    if choice == "none":
        return None, None
    if choice != "auto":
        from mcq.outputs import file_sha256

        matrix = read_imatrix_file(Path(choice))
        unknown = sorted(set(matrix) - {t.name for t in tensors})
        if unknown:
            raise McqError(f"--imatrix {choice} names tensors this model does not have: {', '.join(unknown[:3])}")
        # Named by content, not by where it lay: the same matrix gives the same manifest on any machine.
        return matrix, {"source": Path(choice).name, "sha256": file_sha256(Path(choice)), "entries": len(matrix)}
    if weights.quantized_from:
        # An AWQ/GPTQ output already carries its calibration; its smoothed activations are not the source model's.
        return None, None
    from mcq.calibration import calibration_samples

    samples, described = calibration_samples(weights.path, calib, num_samples or IMATRIX_SAMPLES,
                                             IMATRIX_SLICES, seed)
    matrix = _calibration_imatrix(weights, tensors, samples, progress)
    return matrix, {"source": "calibration", "entries": len(matrix), "calibration": described}


def _calibration_imatrix(weights, tensors: list[GgufTensor], samples: list[dict],
                         progress: bool) -> dict[str, np.ndarray]:
    from .imatrix import compute_imatrix

    names = {t.source: t.name for t in tensors if t.quantizable and t.source}
    bar = _progress_bar(len(list(_blocks(weights))), progress, desc="Importance matrix", unit="block")
    try:
        matrix = compute_imatrix(weights.path, weights.config, samples, names,
                                 progress=(lambda _n: bar.update(1)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    # Per input column of the stored matrix: where the layout reorders a matrix's inputs, its entry follows.
    orders = {t.name: list(t.input_order) for t in tensors if t.input_order}
    return {name: values[orders[name]] if name in orders else values for name, values in matrix.items()}


def write_calibration_imatrix(model: str | Path, out_file: Path, samples: list[dict], described: dict[str, Any],
                              progress: bool = True) -> Path:
    """The importance matrix of `model` on encoded calibration `samples`, saved for `export_gguf(imatrix=FILE)`:
    what `imatrix="auto"` computes, done once for several exports (`mcq build`)."""
    from mcq.export.weights_source import ExportWeights

    weights = ExportWeights(model, every_family=True)
    try:
        layout, params = weights.checkpoint.family.gguf, weights.names()
        tensors = layout.llm_tensors(weights.config, params) + layout.mmproj_tensors(weights.config, params)
        matrix = _calibration_imatrix(weights, tensors, samples, progress)
    finally:
        weights.close()
    write_imatrix_file(out_file, matrix, {"calibration": json.dumps(described, sort_keys=True)})
    return out_file


def _blocks(weights):
    from mcq.models.weights import named_blocks, shell_model

    return named_blocks(shell_model(weights.config))


def _write_card(staging: Path, weights, result: GgufExportResult, quant: str, mmproj_quant: str) -> None:
    from mcq.outputs import write_model_card

    llm, mmproj = Path(result.llm.path).name, Path(result.mmproj.path).name
    run = (f"```bash\nllama-mtmd-cli -m {llm} --mmproj {mmproj} --image IMAGE.jpg -p \"Describe the image.\"\n```\n\n"
           f"```python\nfrom llama_cpp import Llama\nfrom llama_cpp.llama_chat_format import MiniCPMv26ChatHandler\n"
           f"llm = Llama(\"{llm}\", chat_handler=MiniCPMv26ChatHandler(clip_model_path=\"{mmproj}\"), n_ctx=4096)\n```")
    fallbacks = "\n".join(f"- `{name}`: {why}" for file in (result.llm, result.mmproj)
                          for name, why in file.fallbacks.items()) or "none"
    imatrix = "none" if not result.imatrix else (f"{result.imatrix['entries']} tensors, from "
                                                 f"{result.imatrix['source']}")
    write_model_card(
        staging, title=f"{weights.model_path.name} — GGUF {quant}", base_model=weights.model_path.name,
        variant={"library": None, "method": "gguf", "format": quant, "tags": ["gguf", "llama.cpp"]},
        source=weights.model_path,
        sections=[
            ("Files", f"| file | type | size |\n| --- | --- | ---: |\n"
                      f"| `{llm}` | {quant} | {result.llm.bytes:,} |\n| `{mmproj}` | {mmproj_quant} | "
                      f"{result.mmproj.bytes:,} |"),
            ("How to run", run),
            ("Fallbacks", fallbacks),
            ("Importance matrix", imatrix),
            ("Weights", f"from `{Path(result.weights_from).name}`"
                        + (" (an mcq quantize output: its calibrated weights, dequantized, then encoded)"
                           if weights.quantized_from else "")),
            ("Model", f"MiniCPM-V {result.version} ({weights.checkpoint.llm_name} LLM), exported by mcq. "
                      "llama.cpp does not group video frames in time: they are separate images there."),
        ])
