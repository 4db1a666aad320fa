"""What llama.cpp holds to serve an `mcq export --format gguf` LLM, with and without its CPU repacking of the
weights, and what each costs in speed and gives in logits.

    python benchmarks/bench_gguf_repack.py EXPORT_DIR [--prompt-tokens 256] [--new-tokens 16] [--runs 3]
        [--out results.json]

JSON goes to stdout (and to --out), progress to stderr.

llama.cpp's CPU backend copies weights of some types (Q4_0, Q4_K, IQ4_NL, Q8_0 on x86 with AVX2) into an
interleaved layout for its GEMM kernels, in "extra buffer types" (`llama_model_params.use_extra_bufts`, on by
default): those tensors then live in anonymous memory instead of the mapped file. For each setting, in a child
process of its own, mcq's GGUF runner (`mcq.validate.runners.gguf_runner`, the one `mcq validate` uses) loads the
export with that flag and runs a text-only prompt of --prompt-tokens fixed random token ids: its logits at every
position (kept for the comparison), the best prefill time over --runs, and the best time to decode --new-tokens
greedy tokens after it. Reported: RssAnon / RssFile after loading and their peaks while running (sampled every
10 ms), the times, and each setting's logits against the default's (max absolute difference, mean KL of the
softmaxes, top-1 agreement).
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

SETTINGS = {"repacked": True, "mapped": False}   # the runner's `repack`: llama.cpp's use_extra_bufts


def child(export: Path, setting: str, prompt_tokens: int, new_tokens: int, runs: int, scratch: Path) -> dict:
    import numpy as np
    import torch

    from mcq.validate.runners.gguf_runner import GgufRunner

    started = time.perf_counter()
    runner = GgufRunner(export, torch.device("cpu"), "float32", repack=SETTINGS[setting])
    load_s = time.perf_counter() - started
    after_load = proc_status()
    ids = np.random.default_rng(0).integers(1000, runner.n_vocab - 1000, prompt_tokens)
    data = {"input_ids": torch.from_numpy(ids)[None]}
    with TreePoller(os.getpid()) as poller:
        logits = runner.logits(data).numpy()
        prefill = [runner.time_prefill(data, None) for _ in range(runs)]
        decode = [runner.time_decode(data, new_tokens, None) for _ in range(runs)]
    np.save(scratch / f"{setting}.npy", logits)
    return {"use_extra_bufts": SETTINGS[setting], "load_s": round(load_s, 2),
            "anon_after_load_mib": mib(after_load.get("RssAnon")), "file_after_load_mib": mib(after_load.get("RssFile")),
            "peak_anon_running_mib": mib(poller.peak_anon), "peak_file_running_mib": mib(poller.peak_file),
            "prefill_s_best": round(min(prefill), 3), "prefill_tokens_per_s": round(prompt_tokens / min(prefill), 1),
            "decode_s_best": round(min(decode), 3), "decode_tokens_per_s": round(new_tokens / min(decode), 2),
            "prefill_s": [round(t, 3) for t in prefill], "decode_s": [round(t, 3) for t in decode]}


def compared(logits, reference) -> dict:
    import torch

    ours, theirs = torch.from_numpy(logits).double(), torch.from_numpy(reference).double()
    kl = (theirs.softmax(-1) * (theirs.log_softmax(-1) - ours.log_softmax(-1))).sum(-1)
    return {"logits_max_abs_diff": float((ours - theirs).abs().max()), "mean_kl": float(kl.mean()),
            "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).double().mean())}


def main() -> int:
    parser = runtime_parser(__doc__, "an `mcq export --format gguf` output directory")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.child:
        setting, scratch = args.child
        print(json.dumps(child(args.export, setting, args.prompt_tokens, args.new_tokens, args.runs, Path(scratch))))
        return 0

    import llama_cpp
    import numpy as np

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for setting in SETTINGS:
            log(f"{setting}: started")
            done = subprocess.run([sys.executable, __file__, str(args.export), "--prompt-tokens",
                                   str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--runs",
                                   str(args.runs), "--child", setting, scratch],
                                  capture_output=True, text=True, check=True)
            results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
            log(f"{setting}: {results[setting]}")
        reference = np.load(Path(scratch) / "repacked.npy")
        for setting in SETTINGS:
            results[setting].update(compared(np.load(Path(scratch) / f"{setting}.npy"), reference))
    emit({"benchmark": "bench_gguf_repack", "date": time.strftime("%Y-%m-%d"),
          "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                      "load_1min": round(os.getloadavg()[0], 2)},
          "llama_cpp_python": llama_cpp.__version__, "export": str(args.export),
          "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
          "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
