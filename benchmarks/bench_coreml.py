"""Core ML export of MiniCPM-V 4.5 at real widths: export time and package sizes per compression choice.

    python benchmarks/bench_coreml.py [--llm-layers 1] [--vision-layers 1] [--vision fp16,int8,...]
                                      [--llm int4-block32,int8,...] [--check] [--out results.json] [--keep]

JSON goes to stdout (and to --out), progress to stderr.

The model is `mcq make-tiny --real-widths` (LLM hidden 4096 / intermediate 12288, 32 heads / 8 KV heads, vision
1152 / 4304, resampler 4096; random bf16 weights, small vocabulary) with --llm-layers / --vision-layers layers, in a
temp dir removed at the end unless --keep. Each row is one `mcq.export.coreml.export_coreml` call (the code behind
`mcq export --format coreml`), timed whole (`export_s`: read weights, trace, convert, compress, save, manifest):
- vision rows: `--llm none --vision V` for each V, with the vision packages' bytes (4.5: the tower's and the
  resampler's);
- LLM rows: `--vision fp16 --llm L` for each L, with the LLM and embedding packages' bytes and, for int4-block32,
  the ratio to the physical minimum (4 bits per weight + an fp16 scale per 32, other weights fp16) of the whole
  package and of its weight file alone (the program description is a fixed ~40 KB per layer).
`--check` adds the vision packages' cosine to the torch model through mcq's numpy Core ML interpreter (one
448 x 448 slice).

Core ML runs only on Apple hardware: no speed is measured here.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import emit, log, mib, proc_status, release  # noqa: E402

VISION = ("fp16", "int8", "palettize4", "palettize6")
LLM = ("int4-block32", "palettize4", "int8", "fp16")


def vision_cosine(model_dir: Path, export: Path) -> float:
    import numpy as np
    import torch
    from transformers import AutoModel

    import mcq  # noqa: F401
    from mcq.validate.coreml.runtime import CoremlMiniCPMV

    model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pixels = torch.randn(3, 14, 14 * 32 * 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.get_vision_embedding([pixels], torch.tensor([[32, 32]])).numpy().ravel()
    got = CoremlMiniCPMV(export, native=False).encode_slices([pixels], [[32, 32]]).astype(np.float64).ravel()
    return round(float(got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected))), 6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-layers", type=int, default=1)
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--vision", default=",".join(VISION))
    parser.add_argument("--llm", default=",".join(LLM))
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from mcq.export.coreml import export_coreml
    from mcq.models.tiny import TinySpec, make_tiny

    root = Path(tempfile.mkdtemp(prefix="bench-coreml-"))
    rows = []
    try:
        model_dir = root / "model"
        log(f"making a real-width 4.5 model ({args.llm_layers} LLM / {args.vision_layers} vision layers)")
        make_tiny(model_dir, TinySpec(version="4.5", real_widths=True, llm_layers=args.llm_layers,
                                      vision_layers=args.vision_layers), force=True)
        jobs = [("vision", v, {"vision": v, "llm": "none"}) for v in args.vision.split(",") if v]
        jobs += [("llm", m, {"vision": "fp16", "llm": m}) for m in args.llm.split(",") if m]
        for kind, choice, options in jobs:
            out = root / f"{kind}-{choice}"
            log(f"export {kind} {choice}")
            started = time.perf_counter()
            result = export_coreml(model_dir, out, target="iOS18", progress=False, **options)
            row = {"package": kind, "compression": choice, "export_s": round(time.perf_counter() - started, 2)}
            if kind == "vision":
                row["vision_bytes"] = result.vision.bytes + (result.resampler.bytes if result.resampler else 0)
                if args.check:
                    row["vision_cosine_vs_torch"] = vision_cosine(model_dir, out)
            else:
                # the decoder packages and the head together
                llm_bytes = sum(p.bytes for p in result.llm)
                row["llm_bytes"], row["embed_bytes"] = llm_bytes, result.embed.bytes
                if all(p.physical_min_bytes for p in result.llm):
                    minimum = sum(p.physical_min_bytes for p in result.llm)
                    row["llm_physical_min_bytes"] = minimum
                    row["llm_vs_physical_min"] = round(llm_bytes / minimum, 4)
                    row["llm_weights_vs_physical_min"] = round(sum(p.weights_bytes for p in result.llm) / minimum, 4)
            rows.append(row)
            shutil.rmtree(out, ignore_errors=True)
        report = {"benchmark": "coreml-export", "model": f"4.5 real widths, {args.llm_layers} LLM / "
                  f"{args.vision_layers} vision layers", "machine": platform.platform(),
                  "peak_rss_mib": mib(proc_status().get("VmHWM")), "rows": rows}
    finally:
        release(root, args.keep)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
