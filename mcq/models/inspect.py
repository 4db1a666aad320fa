"""`mcq inspect`: what a checkpoint holds, read from config.json and the safetensors headers (no weights loaded).

The model is built on the meta device for its module tree, so inspecting the 8B release costs no memory.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from .family import component_of, linear_layers
from .minicpmv.checkpoint_names import RENAMES, stored_name
from .loading import check_layout, meta_skeleton, open_checkpoint, stored_tensors


def inspect_model(model: str | Path) -> dict[str, Any]:
    checkpoint = open_checkpoint(model)
    path = checkpoint.path
    stored = stored_tensors(path)
    skeleton = meta_skeleton(checkpoint.config)
    check_layout(path, skeleton, stored)
    params, stored_bytes = defaultdict(int), defaultdict(int)
    for name, parameter in skeleton.named_parameters():
        params[component_of(name)] += parameter.numel()
    for name, tensor in stored.items():
        stored_bytes[component_of(name)] += tensor["data_offsets"][1] - tensor["data_offsets"][0]
    linears = linear_layers(skeleton)
    return {
        "model": str(path),
        "version": checkpoint.release,
        "llm": checkpoint.llm_name,
        "dtypes": sorted({t["dtype"] for t in stored.values()}),
        "components": {c: {"parameters": params[c], "bytes": stored_bytes[c]} for c in checkpoint.family.components},
        "total_parameters": sum(params.values()),
        "total_bytes": sum(stored_bytes.values()),
        "linears": [
            {"name": l.name, "component": l.component, "in_features": l.in_features, "out_features": l.out_features,
             "group_sizes": list(l.group_sizes), "non_divisible": l.non_divisible}
            for l in linears
        ],
        "non_divisible": [l.name for l in linears if l.non_divisible],
        # The renames that apply to this checkpoint (the resampler family's packed attention; none for 4.6).
        "stored_as": [{"stored": r.stored, "params": list(r.params), "transposed": r.transposed} for r in RENAMES
                      if stored_name(r.params[0]) in stored],
    }


def format_inspection(report: dict[str, Any]) -> str:
    lines = [f"{report['model']}: MiniCPM-V {report['version']} ({report['llm']} LLM), "
             f"{report['total_parameters']:,} parameters, {report['total_bytes']:,} bytes "
             f"({', '.join(report['dtypes'])})", "", f"{'component':<12}{'parameters':>16}{'bytes':>18}"]
    for name, part in report["components"].items():
        lines.append(f"{name:<12}{part['parameters']:>16,}{part['bytes']:>18,}")
    lines += ["", f"{'Linear (layer index as *)':<52}{'count':>6}{'in -> out':>16}  divides in_features"]
    groups: dict[tuple, list] = defaultdict(list)
    for linear in report["linears"]:
        pattern = re.sub(r"\.\d+\.", ".*.", linear["name"])
        groups[(pattern, linear["in_features"], linear["out_features"], tuple(linear["group_sizes"]))].append(linear)
    for (pattern, fan_in, fan_out, sizes), members in groups.items():
        flag = "" if len(sizes) == 3 else "   <- NOT divisible by " + ", ".join(
            str(g) for g in (32, 64, 128) if g not in sizes)
        lines.append(f"{pattern:<52}{len(members):>6}{f'{fan_in} -> {fan_out}':>16}  "
                     f"{' '.join(f'g{g}' for g in sizes) or '-'}{flag}")
    if report["stored_as"]:
        lines += ["", "Stored under their official names (nn.MultiheadAttention / x @ proj layout):"]
        lines += [f"  {r['stored']} -> {', '.join(r['params'])}{' (transposed)' if r['transposed'] else ''}"
                  for r in report["stored_as"]]
    return "\n".join(lines)
