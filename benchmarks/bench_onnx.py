"""ONNX export of MiniCPM-V 4.5 at real widths: export time, file sizes, and onnxruntime's vision / prefill / decode
speed at fp32 and int4, beside the torch model.

    python benchmarks/bench_onnx.py [--llm-layers 2] [--vision-layers 2] [--threads 2] [--runs 3]
                                    [--decode-tokens 32] [--block-size 32] [--out results.json] [--keep]

JSON goes to stdout (and to --out), progress to stderr.

What is built (in a temp dir, removed at the end unless --keep): `mcq make-tiny --real-widths --llm-layers N
--vision-layers M` (MiniCPM-V 4.5 with the true widths: LLM hidden 4096 / intermediate 12288, 32 heads / 8 KV
heads, vision 1152 / 4304, resampler 4096; random bf16 weights and a small vocabulary, so the embedding table and
lm_head are a rounding error here where an 8B model's are 2 × 622 M parameters).

Variants, each exported in its own child process (`export_s`: wall time of `mcq.export.onnx.export_onnx`, the code
behind `mcq export --format onnx`, and that process's peak RSS):
- `onnx-fp32`: every weight float32;
- `onnx-int4`: every Linear of LLM, vision tower and resampler (lm_head kept) as MatMulNBits, quantized by
  onnxruntime's quantizer at --block-size (asymmetric; the 4304-wide vision fc2 at its fallback block 16), with
  the export's default accuracy_level 4 (int8 activations inside MatMulNBits, onnxruntime-genai's CPU default);
- `onnx-int4-acc0`: the same with accuracy_level 0 (float32 activations);
- `torch`: the checkpoint itself in mcq's torch model, float32 (what `mcq validate` runs on CPU).

Speed, each variant in its own child process with --threads intra-op threads, through the validator's runners
(`OnnxRunner` on `mcq.export.onnx.OnnxMiniCPMV`, `TransformersRunner` on the torch model), so every variant runs the
same code path `mcq validate` times: one 448 × 448 image (one slice, 64 vision tokens) in a chat prompt;
`vision_ms` is the vision tower + resampler; `prefill_tok_s` the prompt's tokens over one LLM forward with the
vision features given (embeddings included); `decode_tok_s` --decode-tokens single-token steps with the KV cache
after that prefill. Each is the median of --runs timed runs after one warm-up, with min and max. `load_s` and
`peak_rss_mib` (the child's kernel high-water mark, ru_maxrss from wait4) are of that child.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from measure import emit, log, release

REPO = Path(__file__).resolve().parents[1]


def run_child(job: dict) -> dict:
    """Run `job` in a fresh interpreter; returns its JSON result with its peak RSS (wait4, exact)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(job, handle)
    result_file = handle.name + ".result"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", handle.name, result_file], cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    os.unlink(handle.name)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {job['kind']} failed with status {status}")
    result = json.loads(Path(result_file).read_text())
    os.unlink(result_file)
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    result["child_s"] = round(seconds, 2)
    return result


# -- children ----------------------------------------------------------------------------------------------------

def child_build(job: dict) -> dict:
    from mcq.models.tiny import TinySpec, make_tiny

    spec = TinySpec(version="4.5", real_widths=True, llm_layers=job["llm_layers"], vision_layers=job["vision_layers"])
    make_tiny(job["out"], spec, force=True)
    config = json.loads((Path(job["out"]) / "config.json").read_text())
    return {"config": {key: config[key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "num_key_value_heads", "vocab_size")}
            | {"vision": {k: config["vision_config"][k] for k in ("hidden_size", "intermediate_size",
                                                                  "num_hidden_layers")}}}


def child_export(job: dict) -> dict:
    from mcq.export.onnx import export_onnx

    started = time.perf_counter()
    # A block size or accuracy level of a float export is refused: a float job passes neither.
    quantized = job["precision"] in ("int4", "int8")
    options = {"block_size": job["block_size"], "accuracy_level": job["accuracy_level"]} if quantized else {}
    result = export_onnx(job["model"], job["out"], precision=job["precision"], force=True, **options)
    seconds = time.perf_counter() - started
    onnx_files = {name: size for name, size in result.files.items() if name.startswith("onnx/")}
    return {"export_s": round(seconds, 2), "files": onnx_files, "onnx_bytes": sum(onnx_files.values()),
            "linears": result.linears, "fallbacks": result.fallbacks}


def child_speed(job: dict) -> dict:
    import torch
    from PIL import Image

    from mcq.models.loading import load_processor, model_spec
    from mcq.models.minicpmv.chat import build_chat_inputs
    from mcq.validate.probes import measure
    from mcq.validate.runners import detect_format

    # The ONNX runner gives onnxruntime as many intra-op threads as torch has, so both run on --threads.
    torch.set_num_threads(job["threads"])
    format_name, runner_class = detect_format(job["path"])
    started = time.perf_counter()
    runner = runner_class(job["path"], torch.device("cpu"), "float32")
    load_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    picture = Image.fromarray((torch.rand(448, 448, 3, generator=generator) * 255).to(torch.uint8).numpy())
    processor = load_processor(job["model"])
    _, config, spec = model_spec(job["model"])   # what the chat prompt builder reads from a model
    owner = SimpleNamespace(config=config, spec=spec)
    msgs = [{"role": "user", "content": [picture, "Describe this image in detail, including every object you "
                                                  "can see, their colours and where they are."]}]
    data, _ = build_chat_inputs(owner, processor, image=None, msgs=msgs, system_prompt="", max_inp_length=8192,
                                max_slice_nums=1, use_image_id=None, temporal_ids=None, enable_thinking=False)
    data.pop("image_sizes", None)
    vision = runner.vision(data)
    settings = {"warmup": 1, "runs": job["runs"]}
    tokens = int(data["input_ids"].shape[1])
    timed_vision = measure(lambda: runner.time_vision(data), **settings)
    prefill = measure(lambda: runner.time_prefill(data, vision), **settings)
    steps = job["decode_tokens"]
    decode = measure(lambda: runner.time_decode(data, steps, vision), **settings)
    return {
        "format": format_name, "runtime": runner_class.runtime(format_name), "load_s": round(load_s, 2),
        "prompt_tokens": tokens, "decode_tokens": steps,
        "vision_ms": {k: round(v * 1000, 1) if k != "runs" else v for k, v in timed_vision.items()},
        "prefill_tok_s": {"median": round(tokens / prefill["median"], 2), "min": round(tokens / prefill["max"], 2),
                          "max": round(tokens / prefill["min"], 2)},
        "decode_tok_s": {"median": round(steps / decode["median"], 2), "min": round(steps / decode["max"], 2),
                         "max": round(steps / decode["min"], 2)},
    }


CHILDREN = {"build": child_build, "export": child_export, "speed": child_speed}


# -- driver --------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(Path(args.child[0]).read_text())
        Path(args.child[1]).write_text(json.dumps(CHILDREN[job["kind"]](job)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    try:
        model = str(work / "model")
        log(f"building the real-width 4.5 checkpoint ({args.llm_layers} LLM / {args.vision_layers} vision layers)")
        built = run_child({"kind": "build", "out": model, "llm_layers": args.llm_layers,
                           "vision_layers": args.vision_layers})
        variants = {
            "onnx-fp32": {"precision": "fp32"},
            "onnx-int4": {"precision": "int4", "accuracy_level": 4},
            "onnx-int4-acc0": {"precision": "int4", "accuracy_level": 0},
        }
        results = {}
        for name, options in variants.items():
            out = str(work / name)
            log(f"exporting {name}")
            exported = run_child({"kind": "export", "model": model, "out": out, "block_size": args.block_size,
                                  **options})
            exported["export_peak_rss_mib"] = exported.pop("peak_rss_mib")
            log(f"timing {name}")
            speed = run_child({"kind": "speed", "model": model, "path": out, "threads": args.threads,
                               "runs": args.runs, "decode_tokens": args.decode_tokens})
            results[name] = {**options, **exported, **speed}
        log("timing torch")
        results["torch"] = run_child({"kind": "speed", "model": model, "path": model, "threads": args.threads,
                                      "runs": args.runs, "decode_tokens": args.decode_tokens})
        report = {
            "benchmark": "bench_onnx",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "settings": {"llm_layers": args.llm_layers, "vision_layers": args.vision_layers, "threads": args.threads,
                         "runs": args.runs, "decode_tokens": args.decode_tokens, "block_size": args.block_size},
            "model": built["config"],
            "variants": results,
            "side_by_side": {name: {"export_s": r.get("export_s"), "onnx_mib": round(r["onnx_bytes"] / 2**20, 1)
                                    if "onnx_bytes" in r else None, "vision_ms": r["vision_ms"]["median"],
                                    "prefill_tok_s": r["prefill_tok_s"]["median"],
                                    "decode_tok_s": r["decode_tok_s"]["median"], "peak_rss_mib": r["peak_rss_mib"]}
                             for name, r in results.items()},
        }
        emit(report, args.out)
    finally:
        release(work, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
