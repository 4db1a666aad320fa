"""bitsandbytes variants (NF4/FP4 4-bit, LLM.int8 8-bit): quantized by transformers while loading, saved as a
checkpoint that `from_pretrained` loads again (config.json keeps `quantization_config`, `quant_method:
bitsandbytes`).

This is the recipe of OpenBMB's own int4 releases (nf4 + double quant, `out_proj`/`kv_proj`/`lm_head` kept), run
through mcq's native model, so no remote code is involved. What transformers converts is every module whose type is
exactly `nn.Linear` and that no `llm_int8_skip_modules` entry matches; see `skip_matches` for the matching rule.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from mcq.errors import McqError
from mcq.models.bnb_runtime import quiet_bnb_notices
from mcq.outputs import copy_support_files

# OpenBMB's list for MiniCPM-V int4 (CookBook bnb script): the attention output projections of the vision tower
# and resampler, the resampler's input projection and the LM head stay in the checkpoint's dtype.
OPENBMB_SKIP_MODULES = ("out_proj", "kv_proj", "lm_head")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")

# Files of a checkpoint that the quantized save writes itself (or that describe the source, not the variant).


def skip_matches(entry: str, module_name: str) -> bool:
    """transformers 5.17's rule (`quantizers_utils.should_convert_module`) for one `llm_int8_skip_modules` entry:
    the entry is a regular expression matched at the start of the name (so `llm` skips every `llm.*` module and
    `vpm.encoder.layers.1` also skips layers 10-19), or a plain-string suffix of the name, not aligned to dots (so
    `proj` skips every `*_proj`). Restated here (transformers' function is internal) so that `quantize_bnb` can
    validate entries and predict what stays unquantized; it checks the prediction against the loaded model, so a
    change of rule in transformers fails loudly instead of silently quantizing a different set of layers."""
    return bool(re.match(f"{entry}\\.", module_name) or re.match(entry, module_name) or module_name.endswith(entry))


def bnb_skip_modules(skip_modules: list[str], linear_names: list[str], renamed_linears: list[str],
                     lm_head: str = "llm.lm_head") -> list[str]:
    """The skip list written to config.json: the caller's entries (each checked to match some Linear), plus
    `lm_head` (the family's output head) and the Linears stored under another name, unless an entry already covers
    them."""
    for entry in skip_modules:
        if not isinstance(entry, str) or not entry:
            raise McqError(f"bnb skip_modules: {entry!r} is not a module name or pattern")
        try:
            re.compile(entry)
        except re.error as err:
            raise McqError(f"bnb skip_modules: {entry!r} is not a valid regular expression ({err})") from None
        if not any(skip_matches(entry, name) for name in linear_names):
            raise McqError(f"bnb skip_modules: {entry!r} matches no Linear of the model (a typo?)")
    skip = list(dict.fromkeys(skip_modules))
    # transformers adds the output embeddings to the skip list only when the caller gives none; with a list, an
    # unlisted lm_head is quantized. A 4-bit LM head costs much more quality than the bytes it saves, so it is kept.
    required = [lm_head]
    # Linears whose official tensor is packed or transposed (resampler q/k/v → `in_proj_weight`, `proj` → `x @ W`)
    # are rebuilt by transformers' checkpoint conversion on save and load; that conversion chunks/transposes plain
    # tensors and cannot carry bnb's packed blocks and their quant state, so these must stay unquantized.
    required += renamed_linears
    for name in required:
        if not any(skip_matches(entry, name) for entry in skip):
            skip.append(name)
    return skip


def quantize_bnb(source: Path, staging_dir: Path, *, bits: int, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: str = "bfloat16", int8_threshold: float = 6.0, skip_modules: list[str],
                 device: str = "cpu") -> dict[str, Any]:
    """Quantize the checkpoint at `source` with bitsandbytes and save it, with its tokenizer/processor/generation
    files, into `staging_dir` (an existing empty directory, normally from `mcq.outputs.staged_output`).

    `bits` 4 uses `quant_type` (nf4/fp4), `double_quant` and `compute_dtype`; `bits` 8 is LLM.int8 with outlier
    `int8_threshold`. Returns what was done: Linears converted per component, the Linears kept, the skip list as
    written, and weight bytes per component before and after.
    """
    import torch
    from torch import nn

    from mcq.models.family import component_of
    from mcq.models.loading import load_model, meta_skeleton, open_checkpoint, safetensors_component_bytes
    from mcq.models.minicpmv.checkpoint_names import RENAMES

    _check_arguments(bits, quant_type, compute_dtype, int8_threshold, device)
    _check_installed()
    bnb = _import_bitsandbytes()
    from transformers import BitsAndBytesConfig

    checkpoint = open_checkpoint(source)
    path, config = checkpoint.path, checkpoint.config
    stored_quantization = getattr(config, "quantization_config", None)
    if stored_quantization is not None:
        method = (stored_quantization.get("quant_method", "unknown") if isinstance(stored_quantization, dict)
                  else type(stored_quantization).__name__)
        raise McqError(f"{path} is already quantized ({method}); quantize the original bf16 checkpoint")
    staging_dir = Path(staging_dir)
    skeleton = meta_skeleton(config)
    # transformers converts exactly nn.Linear (not subclasses); the skeleton has no bnb modules, so type() is exact.
    linear_names = [name for name, module in skeleton.named_modules() if type(module) is nn.Linear]
    renamed = sorted({param.rsplit(".", 1)[0] for rename in RENAMES for param in rename.params})
    skip = bnb_skip_modules(list(skip_modules), linear_names, [name for name in renamed if name in linear_names],
                            checkpoint.family.lm_head)

    if bits == 4:
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype), llm_int8_skip_modules=skip)
        quantized_type = bnb.nn.Linear4bit
    else:
        quantization_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=float(int8_threshold),
                                                 llm_int8_skip_modules=skip)
        quantized_type = bnb.nn.Linear8bitLt
    # dtype "auto": the Linears that stay unquantized (and norms, embeddings) keep the checkpoint's dtype.
    model = load_model(checkpoint, dtype="auto", device=device, quantization_config=quantization_config)

    converted: Counter[str] = Counter()
    kept = []
    for name, module in model.named_modules():
        if isinstance(module, quantized_type):
            converted[component_of(name)] += 1
        elif isinstance(module, nn.Linear):
            kept.append(name)
    expected_kept = sorted(n for n in linear_names if any(skip_matches(entry, n) for entry in skip))
    if sorted(kept) != expected_kept:
        raise RuntimeError(f"bitsandbytes kept {sorted(kept)} unquantized, the skip list implies {expected_kept}: "
                           "transformers' matching rule changed (see skip_matches)")

    model.save_pretrained(staging_dir)
    del model
    copy_support_files(path, staging_dir)
    written = json.loads((staging_dir / "config.json").read_text())["quantization_config"]
    if written.get("quant_method") != "bitsandbytes" or written.get("llm_int8_skip_modules") != skip:
        raise RuntimeError(f"the saved config.json does not hold the bitsandbytes settings: {written}")

    return {
        "method": "bitsandbytes",
        "version": checkpoint.release,
        "bits": bits,
        "format": quant_type if bits == 4 else "int8",
        "settings": ({"quant_type": quant_type, "double_quant": double_quant, "compute_dtype": compute_dtype}
                     if bits == 4 else {"int8_threshold": float(int8_threshold)}),
        "skip_modules": skip,
        "converted": {component: converted.get(component, 0) for component in checkpoint.family.components},
        "kept": sorted(kept),
        "bytes_before": safetensors_component_bytes(path),
        "bytes_after": safetensors_component_bytes(staging_dir),
    }


def _check_arguments(bits: int, quant_type: str, compute_dtype: str, int8_threshold: float, device: str) -> None:
    if bits not in (4, 8):
        raise McqError(f"bitsandbytes bits must be 4 or 8, got {bits!r}")
    if bits == 4 and quant_type not in QUANT_TYPES:
        raise McqError(f"bitsandbytes 4-bit quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if bits == 4 and compute_dtype not in COMPUTE_DTYPES:
        raise McqError(f"bitsandbytes compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got "
                       f"{compute_dtype!r}")
    if bits == 8 and (isinstance(int8_threshold, bool) or not isinstance(int8_threshold, (int, float))
                      or not int8_threshold >= 0):
        raise McqError(f"bitsandbytes int8_threshold must be a number >= 0, got {int8_threshold!r}")
    from mcq.models.loading import check_device

    check_device(device)


def _check_installed() -> None:
    missing = [name for name in ("bitsandbytes", "accelerate") if find_spec(name) is None]
    if missing:
        raise McqError(f"bitsandbytes variants need {' and '.join(missing)}: pip install {' '.join(missing)}")


def _import_bitsandbytes():
    quiet_bnb_notices()
    import bitsandbytes

    return bitsandbytes
