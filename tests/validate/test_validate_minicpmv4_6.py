"""`mcq validate` of MiniCPM-V 4.6 in transformers: the family's encoder and served model (`mcq/models/minicpmv4_6`)
behind the same runner, worker and metrics as the resampler family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

from mcq.models.minicpmv4_6.calibration import forward, per_size_runs
from mcq.validate.accuracy import token_kl
from mcq.validate.evalset import encode_items, eval_samples, open_encoder
from mcq.validate.runners.transformers_runner import TransformersRunner

REFERENCE = "tiny:4.6-outliers"
EVAL_SAMPLES = 8        # the held-out subset with a document, a scene, several images, a table, a chart, a video, text
CALIBRATION_SAMPLES = 4


@pytest.fixture(scope="module")
def items():
    return encode_items(open_encoder(REFERENCE), eval_samples(None, EVAL_SAMPLES, 0), 2)


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, Path]:
    from mcq.quantize.api import quantize

    root = tmp_path_factory.mktemp("validate46")
    for method in ("rtn", "gptq", "awq"):
        samples = {} if method == "rtn" else {"num_samples": CALIBRATION_SAMPLES}
        quantize(REFERENCE, root / method, method=method, target="vllm-gpu", progress=False, **samples)
    return {method: root / method for method in ("rtn", "gptq", "awq")}


def test_eval_set_encodes_the_answer_tokens_video_included(items):
    tokenizer = open_encoder(REFERENCE).tokenizer
    video = next(item for item in items if item.sample.kind == "video")
    assert video.has_vision and "pixel_values" not in video.scored
    assert len(video.scored["target_sizes_videos"]) >= len(video.sample.images)   # every frame, sliced or not
    for item in items:
        answer = item.sample.messages[-1]["content"]
        marked = item.scored["input_ids"][0][item.scored["answer_mask"][0]]
        assert tokenizer.decode(marked) == f"{answer}<|im_end|>\n"
        # The prompt is the scored conversation up to the answer, ending with the assistant's opening.
        prompt = item.prompt["input_ids"][0]
        assert torch.equal(item.scored["input_ids"][0][: len(prompt)], prompt)
        assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_runner_computes_what_transformers_forward_computes(items, variants):
    """The runner's logits are the model's own forward (the tower called per run of equal-size images) on a sliced
    image, on several images and on a video, for the reference and a dequantized GPTQ variant; a sample's vision
    output fed back gives the same logits (the vision-path score's input); the greedy answer is the argmax of the
    model's own teacher-forced logits."""
    chosen = [next(i for i in items if len(i.scored.get("target_sizes", ())) > 1
                   and len(set(map(tuple, i.scored["target_sizes"].tolist()))) > 1),
              next(i for i in items if i.sample.kind == "multi_image"),
              next(i for i in items if i.sample.kind == "video")]
    from mcq.models.loading import resolve_model_path

    for path, load in ((resolve_model_path(REFERENCE), {}),
                       (variants["gptq"], {"quantization_config": CompressedTensorsConfig(dequantize=True)})):
        runner = TransformersRunner(path, torch.device("cpu"), "float32")
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, **load).eval()
        for item in chosen:
            with torch.no_grad(), per_size_runs(model):
                expected = forward(model, item.scored).logits[0]
            got = runner.logits(item.scored)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            vision = runner.vision(item.scored)
            # One block per image (overview or slice) or video frame (overview or slice).
            assert vision.shape[0] == sum(len(item.scored.get(key, ())) for key in ("target_sizes",
                                                                                     "target_sizes_videos"))
            assert torch.equal(runner.logits(item.scored, vision=vision), got)
    answer = runner.generate(chosen[0].prompt, 6)
    from mcq.validate.worker import _continued

    start = chosen[0].prompt["input_ids"].shape[1]
    teacher_forced = runner.logits(_continued(chosen[0].prompt, answer))[start - 1: start - 1 + len(answer)]
    assert teacher_forced.argmax(-1).tolist() == answer


def test_mapped_weights_compute_what_loaded_weights_compute(items):
    """The validator's low-memory path (`mcq.models.mapped`) on 4.6: its tied lm_head is read from the embedding
    table it is stored as."""
    item = next(i for i in items if i.has_vision)
    resident = TransformersRunner(REFERENCE, torch.device("cpu"), "float32").logits(item.scored)
    mapped = TransformersRunner(REFERENCE, torch.device("cpu"), "float32", weights="mapped").logits(item.scored)
    torch.testing.assert_close(mapped, resident, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def validated(variants):
    from mcq.validate.api import validate

    results = validate(REFERENCE, [str(variants[m]) for m in ("rtn", "gptq", "awq")], num_samples=EVAL_SAMPLES,
                       latency_runs=1, max_new_tokens=8, decode_tokens=4, progress=False)
    return {row["name"]: row for row in results["variants"]}, results


@pytest.mark.slow
def test_validate_scores_46_variants_in_transformers(validated, items):
    rows, results = validated
    reference = rows[REFERENCE]
    assert reference["status"] == "ok", reference["error"]
    assert reference["metrics"]["kl_mean"] == 0.0 and reference["metrics"]["gen_exact_match"] == 1.0
    assert reference["metrics"]["vision_cosine"] == pytest.approx(1.0)
    assert results["eval"]["answer_tokens"] == sum(int(i.scored["answer_mask"].sum()) for i in items)
    kl = {}
    for method in ("rtn", "gptq", "awq"):
        row = rows[method]
        assert row["status"] == "ok", row["error"]
        assert row["runtime"].startswith("transformers ") and "dequantized at load" in row["runtime"]
        assert row["skipped_samples"] == {}   # the video sample is scored too
        metrics = row["metrics"]
        kl[method] = metrics["kl_mean"]
        assert 0 < metrics["kl_mean"] < 0.05 and 0 < metrics["top1_agreement"] <= 1   # tiny random logits: flat
        assert 0.9 < metrics["vision_cosine"] < 1.0     # the vision tower and vit_merger are quantized
        assert 0 < row["kl_vision_path"] < metrics["kl_mean"]
        assert metrics["ppl"] > 0 and metrics["peak_rss_load"] > 0 and metrics["decode_tok_s"] > 0
        assert metrics["prefill_tok_s"] > 0 and metrics["vision_ms"] > 0
        components = row["components"]
        assert set(components) == {"vision", "vit_merger", "merger", "llm"}
        assert components["llm"]["bits_per_weight"] < 8 and components["merger"]["bits_per_weight"] == 16
    # Calibration on the outlier model: GPTQ and AWQ below RTN.
    assert max(kl["gptq"], kl["awq"]) < kl["rtn"], kl
    # The validator's KL is the KL of transformers' own forward against the reference's on the answer tokens.
    assert kl["rtn"] == pytest.approx(_direct_kl(rows["rtn"]["path"], items), rel=1e-3)


def _direct_kl(variant: str, items) -> float:
    from mcq.models.loading import resolve_model_path

    models = [AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, **load).eval()
              for path, load in ((resolve_model_path(REFERENCE), {}),
                                 (variant, {"quantization_config": CompressedTensorsConfig(dequantize=True)}))]
    kls = []
    for item in items:
        positions = item.scored["answer_mask"][0, 1:].nonzero().flatten()
        logits = []
        for model in models:
            with torch.no_grad(), per_size_runs(model):
                logits.append(forward(model, item.scored).logits[0][positions])
        kls.append(token_kl(*logits))
    return torch.cat(kls).mean().item()
