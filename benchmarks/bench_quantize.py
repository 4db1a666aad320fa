"""Time per block and peak memory of `mcq quantize` (awq, gptq) at two depths, beside llm-compressor's `oneshot`.

    python benchmarks/bench_quantize.py [--layers 2 4] [--vision-layers 1] [--methods awq gptq] [--num-samples 8]
                                        [--device cpu|cuda] [--out results.json] [--keep] [--skip-llmcompressor]

JSON goes to stdout (and to --out), progress to stderr. Expect minutes per LLM block on a small CPU machine:
a real-width Qwen3 decoder layer is 193 M parameters, and GPTQ's column loop over a 4096 x 12288 `down_proj`
dominates.

What is built (in a temp dir, removed at the end unless --keep): for each value of --layers, `mcq make-tiny
--real-widths --llm-layers N --vision-layers M` (MiniCPM-V 4.5 with the true widths: LLM hidden 4096 /
intermediate 12288, vision 1152 / 4304; random bf16 weights, a small vocabulary) and, from it, the LLM alone as a
standalone `Qwen3ForCausalLM` checkpoint: config from `VersionSpec.llm_config(config)`, the `llm.*` tensors with
the prefix stripped, the tokenizer files copied.

What is measured, each run in its own child process:
- `mcq`: `mcq.quantize.api.quantize(--method)`, the code behind `mcq quantize`, on the whole MiniCPM-V checkpoint
  (vision layers, resampler, LLM layers) with the built-in recipe (awq-w4g128 / gptq-w4g128) and --num-samples
  built-in multimodal calibration samples. Per block: `seconds` from the block's start to the next block's start
  (materialize + calibrate/quantize + propagate + pack/write), with the input capture that precedes a stage
  (`capture_s`, run before the first vision layer, the resampler and the first LLM layer) attributed to the block
  whose inputs it records; `quantize_s` (llm-compressor session), `emit_s` (packing + writer); and at the block's
  start the process's RSS split into anonymous and file-backed memory (/proc/self/status), its high-water mark
  so far (VmHWM) and the bytes the shard writer still holds unwritten (`writer_pending_mib`). Those per-block RSS
  readings are what tell *where* memory grows with depth.
- `llmcompressor`: `llmcompressor.oneshot` on the standalone Qwen3 checkpoint, loaded in float32 (mcq calibrates in
  float32 too), with modifiers built from the same built-in recipe's LLM rule and method arguments: gptq →
  `GPTQModifier` (W4 g128 symmetric, actorder, block size, dampening); awq → `AWQModifier` (duo_scaling, n_grid,
  llm-compressor's own Qwen3 mappings = the resampler family's smoothing_pairs) + `QuantizationModifier` (W4 g128
  asymmetric, the recipe's weight observer); targets Linear, ignore lm_head; scales in bf16 as mcq stores them;
  llm-compressor's default pipeline (independent: a sequential pipeline per calibrating modifier); the compressed
  model saved. The modifiers used are in each result's `recipe`.
  Calibration is text with exactly the same number of sequences and the same token count per sequence as mcq's
  LLM sees (image placeholders included), so both LLM sides process the same number of tokens; mcq additionally
  runs the vision tower and resampler. Per subgraph: the time between llm-compressor's SEQUENTIAL_EPOCH_END events.

How peak memory is measured: the parent starts each run with `subprocess.Popen` and reaps it with `os.wait4(pid)`,
whose rusage is that child's own (`ru_maxrss`, the kernel's exact high-water mark of resident memory, sampled
by nobody, so a short spike is not missed). `getrusage(RUSAGE_CHILDREN)` would report the largest of *all* reaped
children so far, so runs after a bigger one would read too high; psutil polling can miss peaks. The kernel
carries the parent's own high-water mark into a child's `ru_maxrss` at exec, so the parent never imports torch or
builds anything (checkpoint builds are child runs too); `driver_peak_rss_mib` shows that floor. A poller thread
additionally reads /proc/PID/status every 0.2 s for the anonymous / file-backed split of the peak (approximate).
RSS includes the file-backed pages of memory-mapped files (safetensors shards are read through mmap): they can be
reclaimed, but while mapped they are resident and counted, so a reader that keeps its shards mapped grows RSS with
every block it reads; the per-block `rss_file_mib` shows that term apart.
On --device cuda the children also report `torch.cuda.max_memory_allocated`.

How to read it: `summary[method]["mcq"]["peak_rss_ratio"]` is peak RSS at the largest --layers over the smallest;
mcq's goal is <= 1.15 (memory should depend on the largest block, not on depth), llm-compressor's grows with the
model it holds. `mcq_over_llmcompressor` compares peak RSS and LLM time (mcq's LLM blocks incl. their capture vs
llm-compressor's whole oneshot, save included) at each depth. Timings on a shared machine are noisy; memory is not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from measure import emit, log, mib, proc_status

REPO = Path(__file__).resolve().parents[1]
GOAL_RATIO = 1.15
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")


# ------------------------------------------------------------------------------------------------------------------
# parent: orchestration only (no torch import, so that no child inherits a large high-water mark)
# ------------------------------------------------------------------------------------------------------------------
def run_measured(label: str, child: str, spec: dict, workdir: Path, threads: int | None = None) -> dict:
    """Run `bench_quantize.py --child CHILD` as its own process; its result JSON plus wall time and peak RSS."""
    result_path = workdir / "results" / f"{label}.json"
    log_path = workdir / "logs" / f"{label}.log"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(result_path), "label": label}
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", child, "--spec", json.dumps(spec)]
    log(f"{label}: started (log {log_path})")
    peaks = {"RssAnon": 0, "RssFile": 0}
    with open(log_path, "w") as log_file:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True,
                                errors="replace")
        done = threading.Event()

        def tee() -> None:   # the child's progress lines to our stderr, everything it says to its log
            for line in proc.stderr:
                log_file.write(line)
                log_file.flush()
                if line.startswith("[bench"):
                    sys.stderr.write(line)

        def poll() -> None:
            while not done.wait(0.2):
                status = proc_status(proc.pid)
                for key in peaks:
                    peaks[key] = max(peaks[key], status.get(key, 0))

        workers = [threading.Thread(target=poll, daemon=True), threading.Thread(target=tee, daemon=True)]
        for worker in workers:
            worker.start()
        _, wait_status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        for worker in workers:
            worker.join()
        proc.returncode = os.waitstatus_to_exitcode(wait_status)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{label} failed with exit code {proc.returncode}; end of {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result.update({
        "wall_seconds": round(seconds, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),          # Linux: KiB
        "polled_peak_rss_anon_mib": mib(peaks["RssAnon"]),
        "polled_peak_rss_file_mib": mib(peaks["RssFile"]),
        "user_cpu_seconds": round(usage.ru_utime, 1),
        "system_cpu_seconds": round(usage.ru_stime, 1),
    })
    log(f"{label}: {result['wall_seconds']} s, peak RSS {result['peak_rss_mib']} MiB")
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(runs: dict, layers: list[int]) -> dict:
    low, high = str(min(layers)), str(max(layers))
    summary = {}
    for method, by_depth in runs.items():
        entry: dict = {"layers": [int(low), int(high)], "goal_peak_rss_ratio": GOAL_RATIO}
        for tool in ("mcq", "llmcompressor"):
            if all(tool in by_depth.get(d, {}) for d in (low, high)):
                peak = {d: by_depth[d][tool]["peak_rss_mib"] for d in (low, high)}
                entry[tool] = {"peak_rss_mib": peak, "peak_rss_ratio": _ratio(peak[high], peak[low]),
                               "wall_seconds": {d: by_depth[d][tool]["wall_seconds"] for d in (low, high)}}
        if "mcq" in entry:
            entry["mcq"]["meets_goal"] = entry["mcq"]["peak_rss_ratio"] <= GOAL_RATIO
            entry["mcq"]["llm_seconds_per_layer"] = {d: by_depth[d]["mcq"]["llm_seconds_per_layer"]
                                                     for d in (low, high)}
        if "llmcompressor" in entry:
            entry["llmcompressor"]["seconds_per_layer"] = {d: by_depth[d]["llmcompressor"]["seconds_per_layer"]
                                                           for d in (low, high)}
        comparison = {}
        for depth, tools in by_depth.items():
            if "mcq" in tools and "llmcompressor" in tools:
                mcq, llmc = tools["mcq"], tools["llmcompressor"]
                comparison[depth] = {
                    "peak_rss": _ratio(mcq["peak_rss_mib"], llmc["peak_rss_mib"]),
                    "llm_seconds": _ratio(mcq["llm_seconds"], llmc["quantize_seconds"]),
                    "wall_seconds": _ratio(mcq["wall_seconds"], llmc["wall_seconds"]),
                }
        if comparison:
            entry["mcq_over_llmcompressor"] = comparison
        summary[method] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="LLM depths to compare (default 2 4)")
    parser.add_argument("--vision-layers", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=["awq", "gptq"], default=["awq", "gptq"])
    parser.add_argument("--num-samples", type=int, default=8, help="calibration samples (default 8)")
    parser.add_argument("--max-slice-nums", type=int, help="image slices per sample (default: the recipe's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads in every run (default: torch's); on a "
                                                    "shared machine 1 keeps runs from collapsing under contention")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (checkpoints, outputs, logs)")
    parser.add_argument("--workdir", type=Path, help="build here instead of a new temp dir (implies --keep)")
    parser.add_argument("--skip-llmcompressor", action="store_true", help="measure mcq only")
    parser.add_argument("--tiny-widths", action="store_true", help="tiny widths instead of the real ones "
                                                                   "(a quick smoke test of this script)")
    parser.add_argument("--child", choices=["build", "mcq", "llmcompressor"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        CHILDREN[args.child](json.loads(args.spec))
        return 0
    if len(set(args.layers)) < 2:
        parser.error("--layers needs at least two different depths")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mcq-bench-"))
    keep = args.keep or args.workdir is not None
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"working in {workdir}")
    runs: dict[str, dict[str, dict]] = {m: {} for m in args.methods}
    calibration: dict[str, dict] = {}
    try:
        for depth in sorted(set(args.layers)):
            checkpoint, llm_dir = workdir / f"minicpmv-l{depth}", workdir / f"qwen3-l{depth}"
            built = run_measured(f"build-l{depth}", "build", {
                "out": str(checkpoint), "llm_out": str(llm_dir), "llm_layers": depth,
                "vision_layers": args.vision_layers, "real_widths": not args.tiny_widths, "seed": args.seed,
                "methods": args.methods, "num_samples": args.num_samples, "max_slice_nums": args.max_slice_nums,
                "tokens_dir": str(workdir / "tokens")}, workdir, args.threads)
            calibration[str(depth)] = built["calibration"]
            for method in args.methods:
                out = workdir / f"out-{method}-l{depth}"
                result = run_measured(f"mcq-{method}-l{depth}", "mcq", {
                    "model": str(checkpoint), "out": str(out), "method": method, "num_samples": args.num_samples,
                    "max_slice_nums": args.max_slice_nums, "device": args.device, "seed": args.seed},
                    workdir, args.threads)
                runs[method].setdefault(str(depth), {})["mcq"] = result
                if not keep:
                    shutil.rmtree(out, ignore_errors=True)
                if args.skip_llmcompressor:
                    continue
                out = workdir / f"out-llmc-{method}-l{depth}"
                result = run_measured(f"llmcompressor-{method}-l{depth}", "llmcompressor", {
                    "model": str(llm_dir), "minicpmv": str(checkpoint), "out": str(out), "method": method,
                    "device": args.device,
                    "tokens": built["tokens"][method]}, workdir, args.threads)
                runs[method][str(depth)]["llmcompressor"] = result
                if not keep:
                    shutil.rmtree(out, ignore_errors=True)
            if not keep:
                shutil.rmtree(checkpoint, ignore_errors=True)
                shutil.rmtree(llm_dir, ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")

    report = {
        "settings": {
            "layers": sorted(set(args.layers)), "vision_layers": args.vision_layers, "methods": args.methods,
            "num_samples": args.num_samples, "max_slice_nums": args.max_slice_nums, "device": args.device,
            "seed": args.seed, "threads": args.threads or "torch default",
            "widths": "tiny" if args.tiny_widths else "real (4.5: LLM 4096/12288, vision 1152/4304)",
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "versions": calibration and next(iter(calibration.values())).get("versions"),
            "peak_rss": "os.wait4 ru_maxrss of each run's own child process (exact kernel high-water mark)",
            "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        "calibration": {d: {k: v for k, v in c.items() if k != "versions"} for d, c in calibration.items()},
        "runs": runs,
        "summary": summarize(runs, args.layers),
    }
    emit(report, args.out)
    return 0


# ------------------------------------------------------------------------------------------------------------------
# children (each one process; they write their result JSON to spec["result"])
# ------------------------------------------------------------------------------------------------------------------
def _write_result(spec: dict, result: dict) -> None:
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


def _device_facts(device: str) -> dict:
    import torch

    facts = {"torch_threads": torch.get_num_threads()}
    if device == "cuda":
        facts["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return facts


def child_build(spec: dict) -> None:
    """The MiniCPM-V checkpoint, its LLM as a standalone Qwen3 checkpoint, and the calibration token budget."""
    import torch
    import transformers
    from safetensors.torch import save_file

    import llmcompressor
    import mcq
    from mcq.models.loading import model_spec
    from mcq.models.tiny import TinySpec, make_tiny
    from mcq.models.weights import CheckpointReader

    out, llm_out = Path(spec["out"]), Path(spec["llm_out"])
    make_tiny(out, TinySpec(version="4.5", seed=spec["seed"], real_widths=spec["real_widths"],
                            llm_layers=spec["llm_layers"], vision_layers=spec["vision_layers"]), force=True)
    path, config, version = model_spec(out)
    llm_config = version.llm_config(config)
    llm_config.architectures = [version.llm_model_class.__name__]
    llm_config.dtype = torch.bfloat16
    llm_out.mkdir(parents=True, exist_ok=True)
    llm_config.save_pretrained(llm_out)
    reader = CheckpointReader(path)
    tensors = {name[len("llm."):]: reader.read_stored(name) for name in reader.stored_names if name.startswith("llm.")}
    save_file(tensors, llm_out / "model.safetensors", metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (path / name).exists():
            shutil.copy2(path / name, llm_out / name)

    # The LLM token count mcq's calibration produces for each method's recipe, and text of the same shape.
    from mcq.calibration import calibration_samples, load_samples
    from mcq.models.minicpmv.tokenization import load_tokenizer

    tokenizer = load_tokenizer(path, version.version)
    texts = [text for sample in load_samples(None, split="calibration", seed=spec["seed"]) for text in sample.texts]
    stream = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
    calibration, tokens = {}, {}
    for method in spec["methods"]:
        encoded, described = calibration_samples(path, None, spec["num_samples"], spec["max_slice_nums"],
                                                 spec["seed"])
        lengths = [int(sample["input_ids"].shape[1]) for sample in encoded]
        slices = sum(len(p) for sample in encoded for p in sample.get("pixel_values") or [])
        sequences, position = [], 0
        for length in lengths:
            sequence = [stream[(position + i) % len(stream)] for i in range(length)]
            position += length
            sequences.append(sequence)
        token_file = Path(spec["tokens_dir"]) / f"l{spec['llm_layers']}-{method}.json"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(json.dumps(sequences))
        tokens[method] = str(token_file)
        calibration[method] = {"samples": len(lengths), "llm_tokens_per_sample": lengths,
                               "llm_tokens": sum(lengths), "image_slices": slices,
                               "kinds": described["kinds"], "images": described["images"],
                               "video_frames": described["video_frames"]}
    calibration["versions"] = {"mcq": mcq.__version__, "torch": torch.__version__,
                               "transformers": transformers.__version__, "llmcompressor": llmcompressor.__version__}
    _write_result(spec, {"calibration": calibration, "tokens": tokens})


def child_mcq(spec: dict) -> None:
    """`mcq quantize` (the library call behind it), instrumented per block without changing what it does."""
    from mcq.quantize import api, llmc, sequential
    from mcq.quantize.writers import compressed_tensors as writers

    label = spec["label"]
    blocks: list[dict] = []
    captures: list[float] = []     # seconds of input captures not yet attributed to a block
    writers_seen: list = []
    timers = {"quantize_s": {}, "emit_s": {}, "writer_finish_s": 0.0}

    def memory() -> dict:
        status = proc_status()
        pending = sum(w.shards.pending_bytes for w in writers_seen)
        return {"rss_anon_mib": mib(status.get("RssAnon")), "rss_file_mib": mib(status.get("RssFile")),
                "hwm_mib": mib(status.get("VmHWM")), "writer_pending_mib": round(pending / 2**20, 1)}

    def close_block(now: float) -> None:
        if blocks and "seconds" not in blocks[-1]:
            block = blocks[-1]
            block["seconds"] = round(now - block.pop("_start") - block.pop("_later_capture", 0.0)
                                     + block["capture_s"], 2)
            block["quantize_s"] = round(timers["quantize_s"].get(block["name"], 0.0), 2)
            block["emit_s"] = round(timers["emit_s"].get(block["name"], 0.0), 2)
            log(f"{label}: {block['name']} {block['seconds']} s (quantize {block['quantize_s']} s), "
                f"RSS at start {block['rss_anon_mib']} MiB anon + {block['rss_file_mib']} MiB file")

    original_run = sequential.SequentialDriver.run
    original_capture = sequential.SequentialDriver._capture
    original_quantize = llmc.LlmCompressorBlockQuantizer.quantize
    original_packed = llmc.LlmCompressorBlockQuantizer.packed_tensors
    original_writer_init = writers.CompressedTensorsWriter.__init__
    original_add_block = writers.CompressedTensorsWriter.add_block
    original_finish = writers.CompressedTensorsWriter.finish

    def run(self, handler, progress=None):
        def on_block(name: str) -> None:
            now = time.perf_counter()
            close_block(now)
            blocks.append({"name": name, "capture_s": round(sum(captures), 2), "_start": now, **memory()})
            captures.clear()
            if progress:
                progress(name)

        original_run(self, handler, on_block)
        close_block(time.perf_counter())

    def capture(self, *a, **k):
        started = time.perf_counter()
        recorded = original_capture(self, *a, **k)
        seconds = time.perf_counter() - started
        captures.append(seconds)
        if blocks and "seconds" not in blocks[-1]:   # ran after the previous block, for the next one
            blocks[-1]["_later_capture"] = blocks[-1].get("_later_capture", 0.0) + seconds
        return recorded

    def timed(store: str, original):
        def wrapper(self, name, *a, **k):
            started = time.perf_counter()
            try:
                return original(self, name, *a, **k)
            finally:
                timers[store][name] = timers[store].get(name, 0.0) + time.perf_counter() - started
        return wrapper

    def writer_init(self, *a, **k):
        original_writer_init(self, *a, **k)
        writers_seen.append(self)

    def finish(self, *a, **k):
        started = time.perf_counter()
        original_finish(self, *a, **k)
        timers["writer_finish_s"] = time.perf_counter() - started

    sequential.SequentialDriver.run = run
    sequential.SequentialDriver._capture = capture
    llmc.LlmCompressorBlockQuantizer.quantize = timed("quantize_s", original_quantize)
    llmc.LlmCompressorBlockQuantizer.packed_tensors = timed("emit_s", original_packed)
    writers.CompressedTensorsWriter.__init__ = writer_init
    writers.CompressedTensorsWriter.add_block = timed("emit_s", original_add_block)
    writers.CompressedTensorsWriter.finish = finish

    started = time.perf_counter()
    result = api.quantize(spec["model"], spec["out"], method=spec["method"], num_samples=spec["num_samples"],
                          max_slice_nums=spec["max_slice_nums"], device=spec["device"], seed=spec["seed"],
                          force=True, progress=False)
    seconds = time.perf_counter() - started
    llm = [b for b in blocks if b["name"].startswith("llm.")]
    block_total = sum(b["seconds"] for b in blocks)
    _write_result(spec, {
        "quantize_seconds": round(seconds, 1),
        "setup_seconds": round(seconds - block_total - timers["writer_finish_s"], 1),
        "writer_finish_seconds": round(timers["writer_finish_s"], 1),
        "llm_seconds": round(sum(b["seconds"] for b in llm), 1),
        "llm_seconds_per_layer": round(sum(b["seconds"] for b in llm) / max(len(llm), 1), 1),
        "blocks": blocks,
        "end_memory": memory(),
        "bytes_after": result.bytes_after,
        **_device_facts(spec["device"]),
    })


def _llmcompressor_recipe(minicpmv: Path, method: str) -> tuple[list, dict]:
    """llm-compressor modifiers equivalent to what mcq's built-in recipe does to the LLM decoder layers: the same
    weight scheme (from mcq's plan, scales in the checkpoint dtype as mcq stores them) and method arguments."""
    import torch
    from compressed_tensors.quantization import QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    from mcq.models.family import linear_layers
    from mcq.models.loading import meta_skeleton, model_spec
    from mcq.quantize.api import resolve_recipe
    from mcq.quantize.llmc import quantization_args
    from mcq.quantize.recipe import plan_quantization

    recipe = resolve_recipe(method, None)
    _, config, _ = model_spec(minicpmv)
    plan = plan_quantization(recipe, linear_layers(meta_skeleton(config)))
    rules = {rule.index: rule for rule in recipe.rules}
    llm = {(layer.scheme, rules[layer.rule].method or recipe.method) for layer in plan.quantized()
           if layer.name.startswith("llm.model.layers.")}
    if len(llm) != 1:
        raise RuntimeError(f"{recipe.name}: the LLM layers do not share one scheme and method: {llm}")
    (scheme, engine), = llm
    args = recipe.method_args
    observer = args.get("weight_observer", "minmax") if engine != "gptq" else "minmax"
    weights = quantization_args(scheme, observer=observer, actorder=args.get("actorder", "static")
                                if engine == "gptq" else None, scale_dtype=torch.bfloat16)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    described = {"recipe": recipe.name, "engine": engine, "weights": weights.model_dump(mode="json"),
                 "method_args": dict(args)}
    if engine == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=["lm_head"], block_size=args.get("block_size", 128),
                             dampening_frac=args.get("dampening_frac", 0.01))], described
    return [AWQModifier(duo_scaling=args.get("duo_scaling", True), n_grid=args.get("n_grid", 20)),
            QuantizationModifier(config_groups=groups, ignore=["lm_head"])], described


def child_llmcompressor(spec: dict) -> None:
    """llm-compressor's own `oneshot` on the standalone LLM, the same token budget as text."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from llmcompressor import oneshot
    from llmcompressor.core import LifecycleCallbacks
    from mcq.models.minicpmv.tokenization import load_tokenizer
    from mcq.quantize.llmc import _cpu_compat

    _cpu_compat(spec["device"])   # llm-compressor 0.14 AWQ pins cached activations, which fails on CPU
    label = spec["label"]
    sequences = json.loads(Path(spec["tokens"]).read_text())
    batches = [{"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
               for s in sequences]
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = load_tokenizer(Path(spec["model"]), "4.5")

    marks: list[dict] = []
    original_epoch_end = LifecycleCallbacks.sequential_epoch_end.__func__

    def epoch_end(cls, *a, **k):
        result = original_epoch_end(cls, *a, **k)
        now = time.perf_counter()
        status = proc_status()
        marks.append({"at": now, "rss_anon_mib": mib(status.get("RssAnon")), "hwm_mib": mib(status.get("VmHWM"))})
        log(f"{label}: subgraph {len(marks)} done, RSS {marks[-1]['rss_anon_mib']} MiB anon")
        return result

    LifecycleCallbacks.sequential_epoch_end = classmethod(epoch_end)
    started = time.perf_counter()
    modifiers, described = _llmcompressor_recipe(Path(spec["minicpmv"]), spec["method"])
    oneshot(model=model, processor=tokenizer, dataset=loader, recipe=modifiers,
            num_calibration_samples=len(batches), output_dir=spec["out"], save_compressed=True)
    seconds = time.perf_counter() - started
    subgraphs, previous = [], started
    for mark in marks:
        at = mark.pop("at")
        subgraphs.append({"seconds": round(at - previous, 2), **mark})
        previous = at
    layers = model.config.num_hidden_layers
    _write_result(spec, {
        "quantize_seconds": round(seconds, 1),
        "seconds_per_layer": round(seconds / layers, 1),
        "subgraphs_until_epoch_end": subgraphs,
        "pipeline": "oneshot default (independent: a sequential pipeline per calibrating modifier)",
        "recipe": described,
        **_device_facts(spec["device"]),
    })


CHILDREN = {"build": child_build, "mcq": child_mcq, "llmcompressor": child_llmcompressor}

if __name__ == "__main__":
    sys.exit(main())
