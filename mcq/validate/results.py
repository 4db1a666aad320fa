"""The validation results format: what `mcq validate --json` writes and `mcq report` reads.

One JSON object per validation run::

    {
      "format": "mcq-validate/1",
      "reference": {"name", "path", "format"},
      "eval": {"source", "samples", "kinds": {kind: count}, "answer_tokens", "images", "video_frames"},
      "settings": {"device", "dtype", "max_new_tokens", "latency_runs", "warmup_runs", "decode_tokens",
                   "max_slice_nums", "seed", "fail_if": [expression]},
      "versions": {package: version},
      "seconds": wall time of the run,
      "variants": [                      # the reference first, as a variant of itself (KL 0 by construction)
        {"name", "path", "format", "runtime", "status": "ok" | "failed", "error": str | None,
         "recipe": str | None,           # from the variant's mcq-manifest.json, when it has one
         "metrics": {key: number | None for key in METRICS},
         "spread": {latency key: {"median", "min", "max", "runs"}},
         "components": {"llm" | "vision" | "resampler" | "other": {"bytes", "params", "bits_per_weight"}},
         "kl_by_kind": {kind: mean KL},
         "kl_vision_path": number | None,  # KL with only the vision path (vision tower + resampler) of the variant
         "thresholds": [{"expression", "value", "passed"}]}   # `--fail-if` expressions: passed is False when
                                                              # the comparison holds, None when the metric is None
      ]
    }

Metrics are None where they do not apply (no images in the eval set → no vision metrics; a failed variant → all).
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT = "mcq-validate/1"


@dataclass(frozen=True)
class Metric:
    label: str
    unit: str          # "" for ratios and counts
    better: str        # "lower" or "higher"
    group: str         # accuracy, memory or latency
    description: str


METRICS: dict[str, Metric] = {
    "kl_mean": Metric("mean KL", "nats", "lower", "accuracy",
                      "mean next-token KL(reference ‖ variant) over the eval set's answer tokens"),
    "kl_p99": Metric("p99 KL", "nats", "lower", "accuracy", "99th percentile of the per-token KL"),
    "top1_agreement": Metric("top-1 agreement", "", "higher", "accuracy",
                             "fraction of answer tokens where the variant's most likely token is the reference's"),
    "ppl": Metric("perplexity", "", "lower", "accuracy",
                  "perplexity of the reference's own greedy answers under the variant"),
    "ppl_delta": Metric("Δ perplexity", "", "lower", "accuracy",
                        "ppl minus the reference's perplexity of the same answers"),
    "vision_cosine": Metric("vision cosine", "", "higher", "accuracy",
                            "cosine similarity of the resampler outputs to the reference's, mean over image slices"),
    "gen_token_agreement": Metric("gen. token agreement", "", "higher", "accuracy",
                                  "greedy generation: mean fraction of the reference's tokens reproduced before "
                                  "the first divergence"),
    "gen_exact_match": Metric("gen. exact match", "", "higher", "accuracy",
                              "greedy generation: fraction of samples whose answer equals the reference's"),
    "bytes": Metric("size", "bytes", "lower", "memory", "bytes of the variant's weight files on disk"),
    "bits_per_weight": Metric("bits/weight", "", "lower", "memory",
                              "8 × weight bytes / parameters of the reference model"),
    "peak_rss_load": Metric("peak RSS (load)", "bytes", "lower", "memory",
                            "peak resident memory of a fresh process while loading the variant"),
    "peak_rss_generate": Metric("peak RSS (generate)", "bytes", "lower", "memory",
                                "peak resident memory while encoding an image and generating, after loading"),
    "peak_device_memory": Metric("peak device memory", "bytes", "lower", "memory",
                                 "peak accelerator memory allocated (CUDA runs only)"),
    "load_s": Metric("load time", "s", "lower", "latency",
                     "seconds from a fresh process to the variant loaded and ready in its runtime (the engine's "
                     "start and warm-up included)"),
    "vision_ms": Metric("vision encode", "ms", "lower", "latency",
                        "vision tower + resampler time per image (all its slices), median of the runs"),
    "prefill_tok_s": Metric("prefill", "tok/s", "higher", "latency",
                            "prompt tokens (image placeholders included) per second of the prefill forward"),
    "decode_tok_s": Metric("decode", "tok/s", "higher", "latency", "generated tokens per second after prefill"),
}

LATENCY_KEYS = tuple(k for k, m in METRICS.items() if m.group == "latency")
COMPONENTS = ("llm", "vision", "resampler", "other")
