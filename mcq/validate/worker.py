"""One validation run in a fresh process: `python -m mcq.validate.worker JOB.json RESULT.json`.

A fresh process per variant makes the memory readings the variant's own (nothing loaded before it, nothing
shared with the reference) and keeps a variant that crashes its runtime from taking the others down. The job
says which role the process plays:

- `reference`: load the reference, measure it like any variant, and write what variants are scored against
  (answer-token logits, vision outputs, greedy answers) to `reference.safetensors`;
- `variant`: load a variant, measure it, score it against those, and keep its vision outputs for the next role;
- `vision_path`: load the reference once more and score, for each variant, the reference's LLM fed with that
  variant's vision outputs (the KL the vision path alone causes).

Order inside a variant run: encode the eval set, load (peak RSS of loading), generate and time (peak RSS of
generating), then the teacher-forced passes, whose memory is not reported.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mcq.errors import McqError

from .accuracy import slice_cosines, token_kl
from .evalset import EvalItem, encode_items, eval_samples, open_encoder
from .probes import measure, peak_device_memory, peak_rss, reset_peak_device_memory, reset_peak_rss
from .runners import RUNTIMES, runner_class
from .runners.base import Runner

REFERENCE_FILE = "reference.safetensors"


def _continued(data: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    """An encoded prompt followed by `tokens` (the image placeholders stay where they are)."""
    extra = torch.tensor([tokens], dtype=data["input_ids"].dtype)
    out = dict(data)
    out["input_ids"] = torch.cat([data["input_ids"], extra], dim=1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    out.pop("answer_mask", None)
    return out


def _answer_positions(item: EvalItem) -> torch.Tensor:
    """Positions t whose logits predict an answer token (t + 1 is in the answer)."""
    return item.scored["answer_mask"][0, 1:].nonzero().flatten()


def _prompt(item: EvalItem) -> dict[str, Any]:
    return item.prompt if item.prompt is not None else item.scored


def _continuation_nll(runner: Runner, item: EvalItem, tokens: list[int],
                      vision: torch.Tensor | None) -> torch.Tensor:
    """Negative log-likelihood of each of `tokens` after the item's prompt."""
    prompt = _prompt(item)
    logits = runner.logits(_continued(prompt, tokens), vision=vision)
    start = prompt["input_ids"].shape[1]
    log_probs = torch.log_softmax(logits[start - 1: start - 1 + len(tokens)], dim=-1)
    return -log_probs.gather(1, torch.tensor(tokens)[:, None]).flatten()


def _latency(runner: Runner, items: list[EvalItem], job: dict[str, Any]) -> dict[str, dict]:
    """Warm-up then timed runs, on the first eval sample with an image (the first sample when none has one)."""
    settings = job["latency"]
    item = next((i for i in items if i.has_vision), items[0])
    prompt = _prompt(item)
    spread: dict[str, dict] = {}
    # Encoded once and handed to prefill and decode, so that those two time the LLM alone.
    vision = runner.vision(prompt) if item.has_vision else None
    if item.has_vision:
        timed = measure(lambda: runner.time_vision(prompt), warmup=settings["warmup"], runs=settings["runs"])
        images = max(len(item.sample.images), 1)
        spread["vision_ms"] = {k: (v * 1000 / images if k != "runs" else v) for k, v in timed.items()}
    prefill = measure(lambda: runner.time_prefill(prompt, vision), warmup=settings["warmup"], runs=settings["runs"])
    tokens = prompt["input_ids"].shape[1]
    # Throughputs: the median run's rate; the fastest run gives the max rate and the slowest the min.
    spread["prefill_tok_s"] = {"median": tokens / prefill["median"], "min": tokens / prefill["max"],
                               "max": tokens / prefill["min"], "runs": prefill["runs"]}
    steps = settings["decode_tokens"]
    decode = measure(lambda: runner.time_decode(prompt, steps, vision), warmup=settings["warmup"],
                     runs=settings["runs"])
    spread["decode_tok_s"] = {"median": steps / decode["median"], "min": steps / decode["max"],
                              "max": steps / decode["min"], "runs": decode["runs"]}
    return spread


def _runner_class(job: dict[str, Any]) -> type[Runner]:
    return RUNTIMES[job["runner"]] if job.get("runner") else runner_class(job["format"])


def _open(job: dict[str, Any]) -> Runner:
    cls = _runner_class(job)
    options = {"max_slice_nums": job["eval"]["max_slice_nums"]} if cls.preprocesses_images else {}
    return cls(job["path"], torch.device(job["device"]), job["dtype"], **options, **job.get("load", {}))


def _measure_and_generate(job: dict[str, Any], items: list[EvalItem]) -> tuple[Runner, dict[str, Any]]:
    device = torch.device(job["device"])
    reset_peak_rss()
    reset_peak_device_memory(device)
    started = time.perf_counter()
    runner = _open(job)
    memory = {"load_s": time.perf_counter() - started, "peak_rss_load": peak_rss(),
              "peak_device_memory": peak_device_memory(device)}
    reset_peak_rss()
    spread = _latency(runner, items, job)
    # Each sample's vision output, computed once: the prompt and the scored conversation hold the same images,
    # and every later pass (generation, teacher forcing) is given it instead of encoding the images again.
    visions = [runner.vision(item.scored) if item.has_vision else None for item in items]
    generated = [runner.generate(_prompt(item), job["max_new_tokens"], vision=vision)
                 for item, vision in zip(items, visions)]
    memory["peak_rss_generate"] = peak_rss()
    device_peak = peak_device_memory(device)
    if device_peak is not None:
        memory["peak_device_memory"] = max(memory["peak_device_memory"], device_peak)
    return runner, {"memory": memory, "spread": spread, "generated": generated, "visions": visions}


def _check_same_tokens(reference_ids: torch.Tensor, item: EvalItem, index: int) -> None:
    """Variants are scored position by position on the reference's tokens; a worker in another environment (vLLM's
    has its own transformers) must have encoded the sample to the same ids."""
    ids = item.scored["input_ids"][0]
    if not torch.equal(reference_ids, ids):
        raise McqError(f"evaluation sample {index} ({item.sample.name}) encodes to other tokens in this runtime's "
                       f"environment than in the reference's ({len(ids)} vs {len(reference_ids)} tokens): its "
                       "tokenizer or mcq version differs")


def _score(runner: Runner, items: list[EvalItem], indices: list[int], reference: Path, generated: list[list[int]],
           visions: list[torch.Tensor | None], keep_vision: Path | None) -> dict[str, Any]:
    """Accuracy of the loaded runner against the reference's stored outputs; `indices` are the items' places in the
    evaluation set (the reference's keys)."""
    kls, agree, cosines, by_kind, nll, vision_out = [], [], [], {}, [], {}
    gen_agreement, gen_exact = [], []
    with safe_open(reference, "pt") as stored:
        for position, (index, item) in enumerate(zip(indices, items)):
            _check_same_tokens(stored.get_tensor(f"input_ids.{index}"), item, index)
            positions = _answer_positions(item)
            if len(positions):
                ref_logits = stored.get_tensor(f"logits.{index}")
                logits = runner.logits(item.scored, vision=visions[position])[positions]
                kl = token_kl(ref_logits, logits)
                kls.append(kl)
                by_kind.setdefault(item.sample.kind, []).append(kl)
                agree.append((ref_logits.argmax(-1) == logits.argmax(-1)).float())
            if item.has_vision:
                cosines.append(slice_cosines(stored.get_tensor(f"vision.{index}"), visions[position]))
                vision_out[f"vision.{index}"] = visions[position].contiguous()
            reference_answer = stored.get_tensor(f"generated.{index}").tolist()
            answer = generated[position]
            if reference_answer:
                nll.append(_continuation_nll(runner, item, reference_answer, visions[position]))
                common = next((i for i, (a, b) in enumerate(zip(reference_answer, answer)) if a != b),
                              min(len(reference_answer), len(answer)))
                gen_agreement.append(common / len(reference_answer))
            gen_exact.append(float(reference_answer == answer))
    if keep_vision is not None and vision_out:
        save_file(vision_out, str(keep_vision))
    kl = torch.cat(kls) if kls else None
    return {
        "kl_mean": kl.mean().item() if kl is not None else None,
        "kl_p99": torch.quantile(kl, 0.99).item() if kl is not None else None,
        "top1_agreement": torch.cat(agree).mean().item() if agree else None,
        "ppl": math.exp(torch.cat(nll).mean().item()) if nll else None,
        "vision_cosine": torch.cat(cosines).mean().item() if cosines else None,
        "gen_token_agreement": sum(gen_agreement) / len(gen_agreement) if gen_agreement else None,
        "gen_exact_match": sum(gen_exact) / len(gen_exact) if gen_exact else None,
        "kl_by_kind": {kind: torch.cat(values).mean().item() for kind, values in sorted(by_kind.items())},
    }


def _write_reference(runner: Runner, items: list[EvalItem], indices: list[int], generated: list[list[int]],
                     visions: list[torch.Tensor | None], out: Path) -> None:
    """The reference's outputs, keyed by each item's place in the evaluation set (`indices`)."""
    tensors = {}
    for position, (index, item) in enumerate(zip(indices, items)):
        tensors[f"input_ids.{index}"] = item.scored["input_ids"][0].contiguous()
        answer = _answer_positions(item)
        if len(answer):
            # Raw logits, not log-probabilities: renormalizing stored log-probs would put a rounding-size KL
            # (~1e-8) between the reference and itself.
            tensors[f"logits.{index}"] = runner.logits(item.scored, vision=visions[position])[answer].contiguous()
        if item.has_vision:
            tensors[f"vision.{index}"] = visions[position].contiguous()
        tensors[f"generated.{index}"] = torch.tensor(generated[position], dtype=torch.long)
    save_file(tensors, str(out))


def _vision_path(job: dict[str, Any], items: list[EvalItem]) -> dict[str, Any]:
    """KL of the reference LLM fed each variant's vision outputs, averaged over all answer tokens of the eval set,
    the same tokens as `kl_mean`. Samples without images are not run: their inputs are the reference's own, so
    their KL is exactly 0."""
    runner = _open(job)
    reference = Path(job["artifacts"]) / REFERENCE_FILE
    served = [_unserved(job, item) is None for item in items]
    total_tokens = sum(len(_answer_positions(item)) for item, ok in zip(items, served) if ok)
    results = {}
    with safe_open(reference, "pt") as stored:
        for name, file in job["vision_files"].items():
            kl_sum = 0.0
            with safe_open(file, "pt") as variant:
                for index, item in enumerate(items):
                    if not served[index] or not item.has_vision or f"vision.{index}" not in variant.keys():
                        continue   # text only (KL 0), or a sample the variant's runtime does not serve
                    positions = _answer_positions(item)
                    if not len(positions):
                        continue
                    logits = runner.logits(item.scored, vision=variant.get_tensor(f"vision.{index}"))[positions]
                    kl_sum += token_kl(stored.get_tensor(f"logits.{index}"), logits).sum().item()
            results[name] = kl_sum / total_tokens if total_tokens else None
    return {"kl_vision_path": results}


def _unserved(job: dict[str, Any], item: EvalItem) -> str | None:
    """Why this run's runtime, or the reference's, does not serve the item (None when both do)."""
    reason = _runner_class(job).unserved(item.scored)
    if reason is None and job.get("reference_runner"):
        reason = RUNTIMES[job["reference_runner"]].unserved(item.scored)
        reason = None if reason is None else f"{reason}; not served by the reference's runtime"
    return reason


def run(job: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(job["seed"])
    samples = eval_samples(job["eval"]["source"], job["eval"]["num_samples"], job["seed"])
    items = encode_items(open_encoder(job["reference"]), samples, job["eval"]["max_slice_nums"])
    if job["role"] == "vision_path":
        return _vision_path(job, items)
    # A variant is scored on the samples its runtime and the reference's serve (GGUF and vLLM have no video path).
    unserved = {index: _unserved(job, item) for index, item in enumerate(items)}
    indices = [index for index, reason in unserved.items() if reason is None]
    skipped = Counter(reason for reason in unserved.values() if reason is not None)
    if not indices:
        raise McqError(f"{job['path']}: its runtime serves none of the evaluation samples ({', '.join(skipped)})")
    items = [items[index] for index in indices]
    runner, measured = _measure_and_generate(job, items)
    artifacts = Path(job["artifacts"])
    if job["role"] == "reference":
        _write_reference(runner, items, indices, measured["generated"], measured["visions"],
                         artifacts / REFERENCE_FILE)
    keep = artifacts / f"vision-{job['index']}.safetensors" if job["role"] == "variant" else None
    scores = _score(runner, items, indices, artifacts / REFERENCE_FILE, measured["generated"], measured["visions"],
                    keep)
    return {"memory": measured["memory"], "spread": measured["spread"], "scores": scores,
            "skipped_samples": dict(skipped), "how": runner.how,
            "vision_file": str(keep) if keep is not None and keep.exists() else None}


def main(argv: list[str]) -> int:
    job_file, result_file = map(Path, argv)
    try:
        result = run(json.loads(job_file.read_text()))
    except McqError as err:   # the variant cannot be run (e.g. its files are broken): the parent reports the line
        print(err, file=sys.stderr)
        return 1
    result_file.write_text(json.dumps(result, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
