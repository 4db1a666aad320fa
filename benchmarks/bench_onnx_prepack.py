"""What onnxruntime holds to serve an `mcq export --format onnx` decoder: its weights mapped from the file, or
copied into anonymous memory by its kernels' prepacking, and what turning that off costs.

    python benchmarks/bench_onnx_prepack.py EXPORT_DIR [--threads 2] [--runs 3] [--out results.json]

JSON goes to stdout (and to --out), progress to stderr.

For each setting, in a child process of its own: the decoder graph's session is created, then one decoding step
(one new token, empty cache, fixed random input embeddings) is run --runs times. Settings: `default`
(onnxruntime's); `no-prepacking` (session config `session.disable_prepacking` = 1); `prepacked-file`: a first
session writes its optimized graph with the prepacked weights in its external data file
(`session.save_external_prepacked_constant_initializers` = 1; `save_*` in the results), and the measured session
loads that file. Reported: RssAnon / RssFile after the session is made and their peaks over the runs (sampled every
10 ms), the best step time, and the step's logits compared with the default setting's (max absolute difference).
onnxruntime maps page-aligned external initializers (mcq's exports align them) instead of reading them; the MLAS
sgemm of a float32 MatMul and MatMulNBits then pack their weights into a layout of their own (anonymous memory),
which is what its CPU serving holds per layer.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import TreePoller, emit, log, mib, proc_status, runtime_parser

SETTINGS = {"default": {}, "no-prepacking": {"session.disable_prepacking": "1"}, "prepacked-file": {}}
SAVE_PREPACKED = {"session.save_external_prepacked_constant_initializers": "1",
                  "session.optimized_model_external_initializers_min_size_in_bytes": "1024"}


def child(export: Path, setting: str, threads: int, runs: int, scratch: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    decoder = next((export / "onnx").glob("decoder_model_merged*.onnx"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if setting == "save":
        options.optimized_model_filepath = str(scratch / "prepacked.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "prepacked.onnx.data")
        for key, value in SAVE_PREPACKED.items():
            options.add_session_config_entry(key, value)
        started = time.perf_counter()
        with TreePoller(os.getpid()) as poller:
            ort.InferenceSession(str(decoder), options, providers=["CPUExecutionProvider"])
        return {"save_s": round(time.perf_counter() - started, 2), "save_peak_anon_mib": mib(poller.peak_anon),
                "save_peak_file_mib": mib(poller.peak_file),
                "saved_bytes": sum(f.stat().st_size for f in scratch.glob("prepacked.onnx*"))}
    if setting == "prepacked-file":
        decoder = scratch / "prepacked.onnx"
    for key, value in SETTINGS[setting].items():
        options.add_session_config_entry(key, value)
    started = time.perf_counter()
    session = ort.InferenceSession(str(decoder), options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - started
    after_load = proc_status()
    sizes = {"batch_size": 1, "sequence_length": 1, "total_sequence_length": 1}
    feeds = {}
    for value in session.get_inputs():
        shape = [dim if isinstance(dim, int) else sizes.get(dim, 0) for dim in value.shape]
        if value.name == "inputs_embeds":
            feeds[value.name] = (np.random.default_rng(0).standard_normal(shape) * 0.02).astype(np.float32)
        elif value.name == "attention_mask":
            feeds[value.name] = np.ones(shape, dtype=np.int64)
        elif value.name == "position_ids":
            feeds[value.name] = np.zeros(shape, dtype=np.int64)
        else:   # an empty cache
            feeds[value.name] = np.zeros(shape, dtype=np.float32)
    times = []
    with TreePoller(os.getpid()) as poller:
        for _ in range(runs):
            started = time.perf_counter()
            logits = session.run(["logits"], feeds)[0]
            times.append(time.perf_counter() - started)
    np.save(scratch / f"{setting}.npy", logits)
    return {"graph": decoder.name, "load_s": round(load_s, 2), "anon_after_load_mib": mib(after_load.get("RssAnon")),
            "file_after_load_mib": mib(after_load.get("RssFile")),
            "peak_anon_running_mib": mib(poller.peak_anon), "peak_file_running_mib": mib(poller.peak_file),
            "step_s_best": round(min(times), 3), "step_s": [round(t, 3) for t in times]}


def main() -> int:
    parser = runtime_parser(__doc__, "an `mcq export --format onnx` output directory")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        setting, scratch = args.child
        print(json.dumps(child(args.export, setting, args.threads, args.runs, Path(scratch))))
        return 0

    import numpy as np
    import onnxruntime as ort

    def run(setting: str, scratch: str) -> dict:
        log(f"{setting}: started")
        done = subprocess.run([sys.executable, __file__, str(args.export), "--threads", str(args.threads),
                               "--runs", str(args.runs), "--child", setting, scratch],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        log(f"{setting}: {result}")
        return result

    results = {}
    # The prepacked file goes beside the export (a temp dir there): it is about twice the decoder's data.
    with tempfile.TemporaryDirectory(dir=args.export) as scratch:
        for setting in SETTINGS:
            saved = run("save", scratch) if setting == "prepacked-file" else {}
            results[setting] = {**saved, **run(setting, scratch)}
        reference = np.load(Path(scratch) / "default.npy")
        for setting in SETTINGS:
            results[setting]["logits_max_abs_diff_to_default"] = float(
                np.abs(np.load(Path(scratch) / f"{setting}.npy") - reference).max())
    emit({"benchmark": "bench_onnx_prepack", "date": time.strftime("%Y-%m-%d"),
          "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
          "onnxruntime": ort.__version__, "export": str(args.export), "threads": args.threads, "runs": args.runs,
          "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
