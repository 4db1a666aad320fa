"""GGUF export: the files load in llama.cpp (llama-cpp-python) and compute what the torch model computes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcq.cli import main
from mcq.errors import McqError
from mcq.export.gguf import export_gguf
from mcq.export.gguf.writer import stored_types
from mcq.models.loading import load_processor, model_spec
from mcq.validate.evalset import encode_items, eval_samples, open_encoder
from mcq.validate.runners.gguf_runner import GgufRunner
from mcq.validate.runners.transformers_runner import TransformersRunner



def _items(model: str, count: int):
    items = encode_items(open_encoder(model), eval_samples(None, None, 0), 2)
    served = [item for item in items if GgufRunner.unserved(item.scored) is None]
    # One sample of each kind first (images of several slice shapes, multi-image, text only), then the rest.
    firsts = list({item.sample.kind: item for item in reversed(served)}.values())[::-1]
    return (firsts + [item for item in served if item not in firsts])[:count]


def _error_lines(stderr: str) -> list[str]:
    """mcq's own lines on stderr (a first-use tiny build may draw a progress bar before them)."""
    return [line for line in stderr.splitlines() if line.startswith("mcq:")]


def _kl(reference: torch.Tensor, variant: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.kl_div(variant.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1)


def _answer_logits(runner, items) -> list[torch.Tensor]:
    """Teacher-forced logits at the positions that predict answer tokens, each runner with its own vision path."""
    return [runner.logits(item.scored)[item.scored["answer_mask"][0, 1:].nonzero().flatten()] for item in items]


def _mean_kl(reference: TransformersRunner | list[torch.Tensor], variant: GgufRunner, items) -> float:
    expected = reference if isinstance(reference, list) else _answer_logits(reference, items)
    return torch.cat([_kl(r, v) for r, v in zip(expected, _answer_logits(variant, items))]).mean().item()


def _export_kl(reference: TransformersRunner | list[torch.Tensor], export_dir, items) -> float:
    """Mean answer-token KL of a GGUF export (run in llama.cpp) against the reference."""
    variant = GgufRunner(export_dir, torch.device("cpu"), "auto")
    try:
        return _mean_kl(reference, variant, items)
    finally:
        variant.close()


def _square_image_sample(model: str):
    """A 448 x 448 image asked about with no slicing: one slice, pixels libmtmd takes unchanged."""
    generator = np.random.default_rng(0)
    image = Image.fromarray(generator.integers(0, 255, (448, 448, 3), dtype=np.uint8))
    processor = load_processor(model)
    return processor("<|im_start|>user\n(<image>./</image>)\nWhat is in the picture?<|im_end|>\n"
                     "<|im_start|>assistant\n", [[image]], max_slice_nums=1)


@pytest.fixture(scope="module", params=["4.5", "2.6", "4.0"])
def f16_export(request, tmp_path_factory):
    model = f"tiny:{request.param}"
    out = tmp_path_factory.mktemp("gguf") / request.param
    result = export_gguf(model, out, quant="F16", progress=False)
    return model, out, result


def test_f16_export_agrees_with_torch(f16_export):
    model, out, result = f16_export
    assert result.llm.ggml_type == "F16" and not result.llm.fallbacks
    # The position table clip.cpp requires but recomputes: F16, not the legacy converter's F32 (a 4.5 mmproj
    # would carry 80 MB of it); the cosine below shows llama.cpp still loads and runs the file.
    assert stored_types(Path(result.mmproj.path))["resampler.pos_embed_k"] == "F16"
    reference = TransformersRunner(model, torch.device("cpu"), "float32")
    variant = GgufRunner(out, torch.device("cpu"), "auto")
    try:
        items = _items(model, 8)
        assert {item.sample.kind for item in items} >= {"text", "document"}
        assert _mean_kl(reference, variant, items) < 1e-4
        square = _square_image_sample(model)
        cosine = torch.nn.functional.cosine_similarity(variant.vision(square).flatten(),
                                                       reference.vision(square).flatten(), dim=0)
        assert cosine > 0.999
        # Greedy multimodal answers, token for token, each runtime with its own vision path.
        for data in [square] + [item.prompt for item in items if item.prompt is not None and item.has_vision][:2]:
            _same_answer_up_to_near_ties(reference, variant, data, 12)
    finally:
        variant.close()


def _same_answer_up_to_near_ties(reference, variant, data, tokens: int) -> None:
    """Greedy answers equal, or parting where the reference's two candidates are a near tie: F16 weights on
    llama.cpp's CPU kernels (their own accumulation order per instruction set) against float32 torch move logits by
    about 1e-3, which can swap a tiny random model's nearly equal top two. A real fault moves them far more."""
    ours, theirs = variant.generate(data, tokens), reference.generate(data, tokens)
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if step is None:
        assert ours == theirs
        return
    prefix = torch.tensor([theirs[:step]], dtype=data["input_ids"].dtype)
    extended = {**data, "input_ids": torch.cat([data["input_ids"], prefix], 1),
                "attention_mask": torch.cat([data["attention_mask"], torch.ones_like(prefix)], 1)}
    logits = reference.logits(extended)[-1]
    gap = (logits[theirs[step]] - logits[ours[step]]).item()
    print(f"answers part at token {step}: reference logit gap {gap:.2e}")
    assert 0 <= gap < 1e-2, (step, gap)


def test_llama_cpp_tokenizes_like_the_checkpoint(f16_export):
    import llama_cpp

    model, out, _ = f16_export
    tokenizer = load_processor(model).tokenizer
    llm = llama_cpp.Llama(str(next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-"))),
                          vocab_only=True, verbose=False)
    try:
        # Chat-formatted text, as every prompt is: 4.0's SentencePiece-style vocabulary puts "▁" before a bare text
        # at the very start (HF) where llama.cpp cannot, with the prefix off that chat text needs.
        for text in ["<|im_start|>user\n<image></image> The harbour was quiet.<|im_end|>\n",
                     "<|im_start|>user\n今天早上下了一场小雨 def scale(x): return 2 ** 4 - 1<|im_end|>",
                     "<|im_start|>assistant\n  leading spaces, 42 and 3.14159!\n\n<|im_end|>"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tokenizer(text, add_special_tokens=False)["input_ids"], text
    finally:
        llm.close()


def test_llama_cpp_python_chat_handler_answers_about_an_image(f16_export):
    """What users run: llama-cpp-python's MiniCPM-V chat handler on both files, llama.cpp's own preprocessing."""
    import base64
    import io

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MiniCPMv26ChatHandler

    _, out, result = f16_export
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 700, 3), dtype=np.uint8))
    png = io.BytesIO()
    image.save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    handler = MiniCPMv26ChatHandler(clip_model_path=result.mmproj.path, verbose=False)
    llm = Llama(result.llm.path, chat_handler=handler, n_ctx=2048, verbose=False)
    try:
        answer = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "What is it?"}]}],
            max_tokens=4, temperature=0)
    finally:
        llm.close()
    # A 700 x 300 image is sliced (overview + 2 slices of 64 tokens each, plus markers and the question).
    assert answer["usage"]["prompt_tokens"] > 3 * 64 and answer["usage"]["completion_tokens"] >= 1


# GGUF keys of the special token types llama.cpp's converter writes.
SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
                "pad": "tokenizer.ggml.padding_token_id", "mask": "tokenizer.ggml.mask_token_id"}


def _llama_cpp_special_ids(directory: Path) -> dict[str, int]:
    """The special token ids llama.cpp's converter writes (convert_hf_to_gguf.py → gguf-py's SpecialVocab),
    written out for checkpoints with a tokenizer_config.json: each `<type>_token` of tokenizer_config.json (a string,
    or a dict's "content") is looked up among tokenizer.json's added tokens; a type left unset that way (a null
    bos_token, as Qwen2's base tokenizer has) takes config.json's `<type>_token_id`."""
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    config = json.loads((directory / "config.json").read_text())
    ids = {}
    for kind, key in SPECIAL_KEYS.items():
        entry = tokenizer_config.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        matches = [token["id"] for token in added if token["content"] == content]
        if matches:
            ids[key] = matches[0]
        elif isinstance(config.get(f"{kind}_token_id"), int):
            ids[key] = config[f"{kind}_token_id"]
    return ids


def test_special_token_ids_are_what_llama_cpp_writes(f16_export):
    import gguf

    model, out, _ = f16_export
    path, config, _ = model_spec(model)
    reader = gguf.GGUFReader(next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-")))
    written = {key: int(field.contents()) for key, field in reader.fields.items() if key in SPECIAL_KEYS.values()}
    assert written == _llama_cpp_special_ids(path)
    tokenizer = load_processor(model).tokenizer
    # The tokenizer's BOS, not config.json's (which names Qwen's <|endoftext|> on the Qwen-based releases).
    assert written["tokenizer.ggml.bos_token_id"] == tokenizer.convert_tokens_to_ids(tokenizer.bos_token)
    if config.version != 4.0:
        assert tokenizer.bos_token == "<|im_start|>" and config.bos_token_id != written["tokenizer.ggml.bos_token_id"]


@pytest.mark.parametrize("release", ["minicpm-v-4_5", "minicpm-v-2_6"])
def test_official_tokenizer_configs_give_llama_cpp_special_ids(reference_dir, tmp_path, release):
    """On the published tokenizer configs: BOS is <|im_start|>, and with a null bos_token config.json's id."""
    from mcq.export.gguf.vocab import special_token_ids

    official = reference_dir.parent / release
    tokenizer_config = json.loads((official / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    # tokenizer.json lists the added tokens that tokenizer_config.json's added_tokens_decoder holds.
    added = [{"id": int(token_id), **token} for token_id, token in tokenizer_config["added_tokens_decoder"].items()]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}), encoding="utf-8")
    # Both releases' config.json name Qwen's <|endoftext|> (151643) as BOS (2.6's LLM fields are its config's).
    config = json.loads((official / ("config.json" if release == "minicpm-v-4_5" else "llm_config.json")).read_text())
    assert config["bos_token_id"] == 151643
    (tmp_path / "config.json").write_text(json.dumps(config))
    vocab_size = config["vocab_size"]
    ids = special_token_ids(tmp_path, vocab_size)
    assert ids == _llama_cpp_special_ids(tmp_path)
    assert ids == {"tokenizer.ggml.bos_token_id": 151644, "tokenizer.ggml.eos_token_id": 151645,
                   "tokenizer.ggml.unknown_token_id": 128244, "tokenizer.ggml.padding_token_id": 151643}
    tokenizer_config["bos_token"] = None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    assert special_token_ids(tmp_path, vocab_size)["tokenizer.ggml.bos_token_id"] == 151643
    assert _llama_cpp_special_ids(tmp_path)["tokenizer.ggml.bos_token_id"] == 151643


def test_q8_0_is_close_and_names_its_fallbacks(tmp_path):
    result = export_gguf("tiny:4.5", tmp_path / "q8", quant="Q8_0", mmproj_quant="Q8_0", progress=False)
    # The vision MLP's fc2 (464 inputs, like 4304) has rows no 32-block divides: F16, and the summary says so.
    assert set(result.mmproj.fallbacks) == {"v.blk.0.ffn_down.weight", "v.blk.1.ffn_down.weight"}
    assert all(why.startswith("F16") for why in result.mmproj.fallbacks.values())
    reference = TransformersRunner("tiny:4.5", torch.device("cpu"), "float32")
    assert _export_kl(reference, tmp_path / "q8", _items("tiny:4.5", 6)) < 2e-3


def test_multimodal_imatrix_lowers_q4_k_m_kl_on_the_outlier_model(tmp_path):
    model = "tiny:4.5-outliers"
    with_matrix = export_gguf(model, tmp_path / "imatrix", quant="Q4_K_M", progress=False)
    assert with_matrix.imatrix["source"] == "calibration"
    # Every quantizable weight of both files was seen by the calibration forward, vision included; the LM head is
    # not run by it.
    assert with_matrix.imatrix["entries"] == 32
    export_gguf(model, tmp_path / "plain", quant="Q4_K_M", imatrix="none", progress=False)
    # The matrix is kept beside the files and reused as is for another type.
    reused = export_gguf(model, tmp_path / "reused", quant="Q5_K_M", imatrix=str(tmp_path / "imatrix" /
                                                                                 "imatrix.safetensors"),
                         progress=False)
    assert reused.imatrix["entries"] == 32
    items = _items(model, 12)
    reference = _answer_logits(TransformersRunner(model, torch.device("cpu"), "float32"), items)
    kls = {name: _export_kl(reference, tmp_path / name, items) for name in ("imatrix", "plain")}
    assert kls["imatrix"] < kls["plain"], kls


def test_from_an_awq_output_exports_its_calibrated_weights(outlier_variants, tmp_path):
    awq = outlier_variants["awq"]
    result = export_gguf("tiny:4.5-outliers", tmp_path / "awq", quant="F16", from_dir=awq, progress=False)
    assert result.weights_from == str(awq) and result.imatrix is None
    quantized = TransformersRunner(str(awq), torch.device("cpu"), "float32")
    # The GGUF computes what the AWQ checkpoint computes (its dequantized int4 weights, smoothed norms).
    assert _export_kl(quantized, tmp_path / "awq", _items("tiny:4.5-outliers", 6)) < 1e-4


def test_same_inputs_give_the_same_bytes(tmp_path):
    def digests(path):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}

    export_gguf("tiny:4.0", tmp_path / "a", quant="Q8_0", progress=False)
    export_gguf("tiny:4.0", tmp_path / "b", quant="Q8_0", progress=False)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def test_cli_json_and_model_card(tmp_path, capsys):
    assert main(["export", "--format", "gguf", "--model", "tiny:2.6", "--out", str(tmp_path / "o"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == "2.6" and summary["mmproj"]["ggml_type"] == "F16"
    card = (tmp_path / "o" / "README.md").read_text()
    assert "llama-mtmd-cli" in card and "mmproj-" in card
    assert "library_name" not in card   # transformers does not load GGUF files
    manifest = json.loads((tmp_path / "o" / "mcq-manifest.json").read_text())
    assert manifest["kind"] == "gguf" and len([n for n in manifest["outputs"] if n.endswith(".gguf")]) == 2


@pytest.mark.parametrize("args, message", [
    (["--quant", "Q4_K_Q"], "not a type llama.cpp can apply"),
    (["--mmproj-quant", "int4"], "not a type llama.cpp can apply"),
    (["--quant", "Q8_0", "--imatrix", "some.file"], "no type asked for uses one"),
    (["--quant", "Q4_K_M", "--imatrix", "missing.safetensors"], "does not exist"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(["export", "--format", "gguf", "--model", "tiny:4.5", "--out", str(tmp_path / "o"), *args])
    errors = _error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "o").exists()


def test_missing_tokenizer_json_is_refused_before_writing(tmp_path, capsys):
    import shutil

    from mcq.models.tiny import resolve_tiny

    source = tmp_path / "model"
    shutil.copytree(resolve_tiny("tiny:4.5"), source)
    (source / "tokenizer.json").unlink()
    code = main(["export", "--format", "gguf", "--model", str(source), "--out", str(tmp_path / "o")])
    assert code == 2 and "tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_failed_export_leaves_no_partial_gguf(tmp_path, monkeypatch):
    from mcq.export.gguf import api

    real = api._tensor_values
    calls = {"n": 0}

    def failing(weights, tensor):
        calls["n"] += 1
        if calls["n"] == 40:   # in the middle of the mmproj file
            raise McqError("disk full (simulated)")
        return real(weights, tensor)

    monkeypatch.setattr(api, "_tensor_values", failing)
    with pytest.raises(McqError, match="simulated"):
        export_gguf("tiny:4.5", tmp_path / "o", quant="F16", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("reference,reason", [("tiny:4.5", "3D resampler"), ("tiny:4.6", None)])
def test_runner_refuses_grouped_video_samples(reference, reason):
    """The resampler family's video (frames grouped by temporal id) is not served; 4.6's (frames as image blocks at
    video tokens, `video_bound`) is."""
    samples = eval_samples(None, None, 0)
    video = next(sample for sample in samples if sample.is_video)
    items = encode_items(open_encoder(reference), [video, next(s for s in samples if s.kind == "scene")], 2)
    served = GgufRunner.unserved(items[0].scored)
    assert (served is None if reason is None else reason in served) and GgufRunner.unserved(items[1].scored) is None


def test_runner_refuses_blocks_without_their_bounds():
    """A 4.6 video sample whose frames' token bounds are missing is refused in one line, not paired short with the
    images' bounds (a frame's embeddings would land on another block's tokens)."""
    from mcq.models.family import gguf_layout_for

    samples = eval_samples(None, None, 0)
    video = next(sample for sample in samples if sample.is_video)
    data = encode_items(open_encoder("tiny:4.6"), [video], 2)[0].scored
    runner = object.__new__(GgufRunner)   # the pairing reads only the family's layout, not a loaded model
    runner.image_blocks = gguf_layout_for("minicpmv4_6").image_blocks
    assert len(runner._blocks(data)) == len(data["video_bound"][0])
    with pytest.raises(McqError, match=r"records 0 vision blocks' token bounds for \d+ blocks of pixels"):
        runner._blocks({key: value for key, value in data.items() if key != "video_bound"})


def test_memory_plan_serves_unrepacked_when_the_repacked_copy_does_not_fit(tmp_path):
    """On CPU the plan counts llama.cpp's repacked copy of the quantized matrices; where only the mapped file fits,
    the runner loads without repacking (as `llama-server --no-repack`) and serves the same model (other kernels:
    at real widths their rounding moves random weights' logits by a mean KL of ~1e-3, `bench_gguf_repack.py`)."""
    from mcq.validate.runners.gguf_runner import _repacked_bytes

    export_gguf("tiny:4.5", tmp_path / "q8", quant="Q8_0", progress=False)
    llm = next(p for p in (tmp_path / "q8").glob("*.gguf") if not p.name.startswith("mmproj-"))
    repacked = _repacked_bytes(llm)
    assert 0 < repacked < llm.stat().st_size
    roomy = GgufRunner.memory_plan(tmp_path / "q8", "cpu", "float32", None, 64)
    assert roomy.load == {} and "repacked" in roomy.how
    tight = GgufRunner.memory_plan(tmp_path / "q8", "cpu", "float32", roomy.bytes - 1, 64)
    assert tight.load == {"repack": False} and tight.bytes == roomy.bytes - repacked and "--no-repack" in tight.how
    # Too little for the mapped file too: the full plan, which the validator refuses with.
    assert GgufRunner.memory_plan(tmp_path / "q8", "cpu", "float32", tight.bytes - 1, 64).bytes == roomy.bytes
    assert GgufRunner.memory_plan(tmp_path / "q8", "cuda", "float32", tight.bytes, 64).load == {}
    items = _items("tiny:4.5", 3)
    runners = [GgufRunner(tmp_path / "q8", torch.device("cpu"), "auto", **load) for load in ({}, tight.load)]
    try:
        assert _mean_kl(_answer_logits(runners[0], items), runners[1], items) < 1e-4
    finally:
        for runner in runners:
            runner.close()


def test_official_4_5_layout_maps_every_stored_tensor(reference_dir):
    """On the official MiniCPM-V 4.5 config and weight shapes: every stored tensor becomes exactly one GGUF tensor
    of the shape llama.cpp expects (LLM 399 tensors, mmproj 455 with the computed position table)."""
    from mcq.models.minicpmv import checkpoint_names
    from mcq.models.minicpmv.configuration import MiniCPMVConfig
    from mcq.models.minicpmv.gguf import LAYOUT

    config = MiniCPMVConfig.from_pretrained(reference_dir)
    stored = json.loads((reference_dir / "parameter_shapes.json").read_text())["shapes"]
    params = {param: tuple(shape) for name, entry in stored.items()
              for param, shape in checkpoint_names.param_shapes(name, entry).items()}
    llm = LAYOUT.llm_tensors(config, list(params))
    mmproj = LAYOUT.mmproj_tensors(config, list(params))
    assert (len(llm), len(mmproj)) == (36 * 11 + 3, 27 * 16 + 3 + 2 + 18)
    sourced = {t.source: t.shape for t in llm + mmproj if t.source}
    assert sourced == params
    metadata = LAYOUT.mmproj_metadata(config, list(params), reference_dir)
    assert metadata["clip.vision.image_size"] == ("u32", 448) and metadata["clip.minicpmv_version"] == ("i32", 6)
    assert LAYOUT.llm_metadata(config)["qwen3.rope.freq_base"] == ("f32", 1000000.0)


def test_mcq_validate_scores_a_gguf_export_in_llama_cpp(tmp_path, capsys):
    export_gguf("tiny:4.5", tmp_path / "gguf", quant="F16", progress=False)
    code = main(["validate", "--reference", "tiny:4.5", "--variant", str(tmp_path / "gguf"), "--num-samples", "8",
                 "--latency-runs", "1", "--max-new-tokens", "8", "--json", str(tmp_path / "results.json")])
    printed = capsys.readouterr().out
    assert code == 0
    row = json.loads((tmp_path / "results.json").read_text())["variants"][1]
    assert row["format"] == "gguf" and row["runtime"].startswith("llama.cpp") and row["status"] == "ok"
    assert row["metrics"]["kl_mean"] < 1e-4 and row["metrics"]["vision_cosine"] > 0.999
    # The 8 held-out samples hold one video clip, which llama.cpp cannot group by temporal id.
    assert sum(row["skipped_samples"].values()) == 1 and "not scored on 1 sample(s): video" in printed


def test_out_may_not_replace_the_from_output(outlier_variants, capsys):
    """`--out` is checked against both sources: with --force it would otherwise replace the quantized output."""
    awq = outlier_variants["awq"]
    code = main(["export", "--format", "gguf", "--model", "tiny:4.5-outliers", "--from", str(awq), "--out", str(awq),
                 "--force"])
    assert code == 2 and len(_error_lines(capsys.readouterr().err)) == 1
    assert (awq / "config.json").is_file()


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_K_M"])
def test_row_blocks_give_the_bytes_of_whole_tensors(quant, tmp_path, monkeypatch):
    """Tensors read, cast and encoded a few rows at a time (the real vocabulary's tables would be 2.5 GB each in
    float32) give the files whole tensors give, the importance-matrix re-quantization included."""
    from mcq.export import rows

    export_gguf("tiny:4.0", tmp_path / "whole", quant=quant, mmproj_quant=quant, num_samples=2, progress=False)
    monkeypatch.setattr(rows, "ROW_BLOCK_BYTES", 1000)
    export_gguf("tiny:4.0", tmp_path / "rows", quant=quant, mmproj_quant=quant, num_samples=2, progress=False)
    whole, blocks = sorted((tmp_path / "whole").iterdir()), sorted((tmp_path / "rows").iterdir())
    assert [p.name for p in whole] == [p.name for p in blocks]
    for a, b in zip(whole, blocks):
        assert a.read_bytes() == b.read_bytes(), a.name
