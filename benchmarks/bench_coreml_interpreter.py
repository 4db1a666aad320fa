"""Memory of `mcq validate`'s Core ML worker off macOS (mcq's MIL interpreter), package call by package call.

    python benchmarks/bench_coreml_interpreter.py MODEL EXPORT_DIR [--out results.json]

JSON goes to stdout (and to --out). MODEL is the checkpoint the Core ML export was made from (its processor
encodes the sample), EXPORT_DIR the `mcq export --format coreml` output. In this process: the validation runner
of the export is loaded, then the teacher-forced logits of one held-out text sample are computed twice (the
second pass shows what the first left behind). For every package call: RssAnon before it, its peak during the call
(sampled every 5 ms from a thread) and after it. Whatever `mcq` is importable is measured: put a checkout first on
PYTHONPATH to measure another version.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from measure import emit, mib, proc_status


class Sampler:
    """The process's RssAnon high-water mark since the last `reset`, sampled every 5 ms."""

    def __init__(self):
        self.peak = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, proc_status().get("RssAnon", 0))
            time.sleep(0.005)

    def reset(self) -> int:
        self.peak = now = proc_status().get("RssAnon", 0)
        return now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the checkpoint the export was made from")
    parser.add_argument("export", type=Path, help="an `mcq export --format coreml` output directory")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    import mcq
    from mcq.validate.coreml import interpreter
    from mcq.validate.evalset import encode_items, eval_samples, open_encoder
    from mcq.validate.runners.coreml_runner import CoremlRunner

    sampler, calls = Sampler(), []
    predict = interpreter.Interpreter.predict

    def measured(self, inputs):
        before = sampler.reset()
        outputs = predict(self, inputs)
        calls.append({"package": self.program.path.name, "anon_before_mib": mib(before),
                      "anon_peak_mib": mib(max(sampler.peak, before)),
                      "anon_after_mib": mib(proc_status().get("RssAnon"))})
        return outputs

    interpreter.Interpreter.predict = measured
    (item,) = encode_items(open_encoder(args.model), [s for s in eval_samples(None, None, 0) if s.kind == "text"][:1],
                           2)
    start = proc_status().get("RssAnon")
    runner = CoremlRunner(args.export, torch.device("cpu"), "float32")
    loaded = proc_status().get("RssAnon")
    passes = []
    for _ in range(2):
        first = len(calls)
        runner.logits(item.scored)
        passes.append(calls[first:])
    emit({"benchmark": "bench_coreml_interpreter", "date": time.strftime("%Y-%m-%d"), "mcq": str(Path(mcq.__file__).parent),
          "machine": {"cpus": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2)},
          "export": str(args.export), "sample_tokens": int(item.scored["input_ids"].shape[1]),
          "anon_start_mib": mib(start), "anon_loaded_mib": mib(loaded),
          "anon_peak_mib": max(call["anon_peak_mib"] for call in calls), "passes": passes}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
