"""ONNX export at fp32 / fp16 against the torch model: vision features, logits, generation (KV cache), video,
the file layout, determinism, external data, the runtime's chat API and CLI, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from mcq.cli import main
from mcq.errors import McqError
from mcq.export.onnx import OnnxMiniCPMV, export_onnx
from mcq.export.onnx import store as onnx_store
from mcq.models.loading import load_model, load_processor, resolve_model_path
from mcq.models.minicpmv.chat import render_conversation
from onnx_helpers import chat_inputs, digests, image, relative_error

GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 12}
GRAPH_INPUTS = {
    "vision_encoder": ["pixel_values", "patch_attention_mask", "position_ids", "resampler_pos_embed",
                       "resampler_packing_index", "resampler_key_padding_mask"],
    "embed_tokens": ["input_ids"],
}


@pytest.fixture(scope="module", params=["4.5", "2.6", "4.0"])
def exported(request, tmp_path_factory):
    """(torch float32 model, its processor, ONNX runtime) for a tiny model of each version."""
    name = f"tiny:{request.param}"
    out = tmp_path_factory.mktemp("onnx") / request.param
    export_onnx(name, out)
    return load_model(name, dtype="float32"), load_processor(name), OnnxMiniCPMV(out)


def test_fp32_vision_and_logits_match_torch(exported):
    model, processor, onnx_model = exported
    # Two images, one sliced into a grid: slices of different sizes share one padded vision batch.
    msgs = [{"role": "user", "content": [image(700, 500, 1), image(448, 448, 2), "Compare them."]}]
    inputs = chat_inputs(model, processor, msgs)
    with torch.no_grad():
        vision = model._vision_states_per_sample(inputs)[0]
        logits = model(inputs, use_cache=False).logits
    onnx_vision = onnx_model.vision_per_sample(inputs)[0]
    assert onnx_vision.shape == tuple(vision.shape) and len(vision) > 2
    assert relative_error(onnx_vision, vision) < 1e-4
    assert relative_error(onnx_model.forward(inputs), logits) < 1e-4


def test_generation_with_kv_cache_matches_torch(exported):
    model, processor, onnx_model = exported
    msgs = [{"role": "user", "content": [image(600, 450, 3), "What is in the image?"]}]
    inputs = chat_inputs(model, processor, msgs)
    tokens = onnx_model.generate(inputs, 12)[0]
    # Each token the cached decode loop chose is the argmax of the torch model's full forward over the prompt and
    # the tokens before it (prefill and every decode step agree with torch, position by position).
    continued = dict(inputs)
    continued["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([tokens[:-1]])], dim=1)
    continued["attention_mask"] = torch.ones_like(continued["input_ids"])
    with torch.no_grad():
        logits = model(continued, use_cache=False).logits[0]
    start = inputs["input_ids"].shape[1] - 1
    assert logits[start:].argmax(-1).tolist() == tokens
    assert onnx_model.chat(msgs=msgs, **GREEDY) == model.chat(msgs=msgs, processor=processor, **GREEDY)


def test_video_temporal_groups_match_torch(tmp_path):
    model, processor = load_model("tiny:4.5", dtype="float32"), load_processor("tiny:4.5")
    out = tmp_path / "onnx"
    export_onnx("tiny:4.5", out)
    onnx_model = OnnxMiniCPMV(out / "onnx")
    # Frames of unequal sizes inside a group: the packed key sequence has padding between frames.
    frames = [image(448, 448, s) for s in range(3)] + [image(560, 420, s) for s in range(3, 6)] + [image(448, 448, 9)]
    msgs = [{"role": "user", "content": frames + ["What happens?"]}]
    video = {"use_image_id": False, "max_slice_nums": 1, "temporal_ids": [[0, 1, 2], [3, 4, 5], [9]]}
    inputs = chat_inputs(model, processor, msgs, **video)
    with torch.no_grad():
        vision = model._vision_states_per_sample(inputs)[0]
        logits = model(inputs, use_cache=False).logits
    onnx_vision = onnx_model.vision_per_sample(inputs)[0]
    assert onnx_vision.shape == (3, 64, model.config.hidden_size)
    assert relative_error(onnx_vision, vision) < 1e-4
    assert relative_error(onnx_model.forward(inputs), logits) < 1e-4
    assert onnx_model.chat(msgs=msgs, **video, **GREEDY) == model.chat(msgs=msgs, processor=processor, **video,
                                                                      **GREEDY)
    # Chunked vision runs (whole groups of at most vision_batch_size slices) give the same blocks.
    onnx_model.vision_batch_size = 2
    assert relative_error(onnx_model.vision_per_sample(inputs)[0], onnx_vision) < 1e-5


def test_layout_configs_and_same_bytes(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    result = export_onnx("tiny:4.5", first)
    export_onnx("tiny:4.5", second)
    assert digests(first) == digests(second)
    files = set(digests(first))
    assert {"onnx/vision_encoder.onnx", "onnx/embed_tokens.onnx", "onnx/decoder_model_merged.onnx", "config.json",
            "preprocessor_config.json", "tokenizer_config.json", "generation_config.json", "README.md",
            "mcq-manifest.json"} <= files
    # Staging happens beside the output: nothing but the two outputs is left in their parent.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    config = json.loads((first / "config.json").read_text())
    assert config["transformers.js_config"] == {"dtype": dict.fromkeys(
        ("vision_encoder", "embed_tokens", "decoder_model_merged"), "fp32")}
    manifest = json.loads((first / "mcq-manifest.json").read_text())
    assert manifest["kind"] == "onnx" and manifest["outputs"]["onnx/embed_tokens.onnx"] == \
        digests(first)["onnx/embed_tokens.onnx"]
    decoder = onnx.load(str(first / "onnx/decoder_model_merged.onnx"))
    onnx.checker.check_model(decoder)
    layers = json.loads((resolve_model_path("tiny:4.5") / "config.json").read_text())["num_hidden_layers"]
    assert [i.name for i in decoder.graph.input] == ["inputs_embeds", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert [o.name for o in decoder.graph.output][0] == "logits"
    assert {o.name for o in decoder.graph.output} == {"logits"} | {
        f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")}
    for graph, names in GRAPH_INPUTS.items():
        model = onnx.load(str(first / f"onnx/{graph}.onnx"))
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == names
    # Nothing of the tracing machine: no stack traces (absolute paths), no intermediate shapes (torch.export's symbol
    # expressions, which raise onnxruntime's peak).
    for path in sorted((first / "onnx").glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        assert not model.graph.value_info and not model.graph.metadata_props, path.name
        assert not any(node.metadata_props for node in model.graph.node), path.name
    assert result.files["onnx/decoder_model_merged.onnx"] == (first / "onnx/decoder_model_merged.onnx").stat().st_size


def test_fp16_halves_the_weights_and_stays_close(tmp_path):
    fp32, fp16 = tmp_path / "fp32", tmp_path / "fp16"
    export_onnx("tiny:4.5", fp32)
    export_onnx("tiny:4.5", fp16, precision="fp16")
    size = (fp32 / "onnx/decoder_model_merged.onnx").stat().st_size
    half = (fp16 / "onnx/decoder_model_merged_fp16.onnx").stat().st_size
    assert 0.45 < half / size < 0.6
    a, b = OnnxMiniCPMV(fp32), OnnxMiniCPMV(fp16)
    inputs = chat_inputs(a, a.processor, [{"role": "user", "content": [image(448, 448, 4), "Describe."]}])
    expected = a.forward(inputs)
    assert 0 < relative_error(b.forward(inputs), expected) < 1e-2


def test_external_data_over_the_inline_limit(tmp_path, monkeypatch):
    inline = tmp_path / "inline"
    export_onnx("tiny:4.5", inline)
    monkeypatch.setattr(onnx_store, "INLINE_WEIGHTS_LIMIT", 0)
    external = tmp_path / "external"
    result = export_onnx("tiny:4.5", external)
    data = sorted(p.name for p in (external / "onnx").glob("*.onnx_data"))
    assert data == ["decoder_model_merged.onnx_data", "embed_tokens.onnx_data", "vision_encoder.onnx_data"]
    assert (external / "onnx/decoder_model_merged.onnx").stat().st_size < 100_000
    config = json.loads((external / "config.json").read_text())
    assert config["transformers.js_config"]["use_external_data_format"] == dict.fromkeys(
        ["vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"], 1)
    assert sorted(result.external_data) == ["decoder_model_merged.onnx", "embed_tokens.onnx", "vision_encoder.onnx"]
    a, b = OnnxMiniCPMV(inline), OnnxMiniCPMV(external)
    inputs = chat_inputs(a, a.processor, [{"role": "user", "content": [image(448, 448, 5), "Describe."]}])
    np.testing.assert_array_equal(a.forward(inputs), b.forward(inputs))


def test_graph_over_the_protobuf_limit_is_refused_without_output(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_store, "PROTOBUF_LIMIT", 10_000)
    out = tmp_path / "out"
    with pytest.raises(McqError, match="over protobuf's 2 GiB limit"):
        export_onnx("tiny:4.5", out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_chat_stream_sampling_and_beam_search(tmp_path):
    out = tmp_path / "onnx"
    export_onnx("tiny:4.5", out)
    onnx_model = OnnxMiniCPMV(out)
    msgs = [{"role": "user", "content": [image(448, 448, 6), "Describe."]}]
    answer = onnx_model.chat(msgs=msgs, **GREEDY)
    assert "".join(onnx_model.chat(msgs=msgs, stream=True, **GREEDY)) == answer
    assert onnx_model.chat(msgs=msgs, enable_thinking=True, **GREEDY).startswith("<think>\n")
    text_only = [{"role": "user", "content": "Hello there, who are you?"}]
    # The shorter conversation is left-padded in the batch: the mask and positions keep its answer unchanged.
    assert onnx_model.chat(msgs=[msgs, text_only], **GREEDY) == [answer, onnx_model.chat(msgs=text_only, **GREEDY)]
    sampled = [onnx_model.chat(msgs=msgs, sampling=True, max_new_tokens=12, seed=seed) for seed in (0, 0, 1)]
    assert sampled[0] == sampled[1] and sampled[0] != answer
    with pytest.raises(McqError, match="beam search"):
        onnx_model.chat(msgs=msgs, sampling=False, max_new_tokens=4)
    with pytest.raises(McqError, match="temperature > 0"):
        onnx_model.chat(msgs=msgs, sampling=True, max_new_tokens=4, temperature=0.0)


def test_cli_export_then_chat_on_onnxruntime(tmp_path, capsys):
    picture = tmp_path / "picture.png"
    image(520, 380, 7).save(picture)
    out = tmp_path / "export"
    assert main(["export", "--format", "onnx", "--model", "tiny:4.5", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["precision"] == "fp32" and summary["dtypes"]["decoder_model_merged"] == "fp32"
    question = ["What is it?", "--image", str(picture), "--json", "--max-new-tokens", "10"]
    assert main(["chat", "--model", str(out / "onnx"), *question]) == 0
    onnx_answer = json.loads(capsys.readouterr().out)["answer"]
    assert main(["chat", "--model", "tiny:4.5", "--dtype", "float32", *question]) == 0
    assert onnx_answer == json.loads(capsys.readouterr().out)["answer"]
    # The export's precision is its own: --dtype does not apply to it, and is refused rather than ignored.
    assert main(["chat", "--model", str(out / "onnx"), "--dtype", "float32", *question]) == 2
    assert "computes in the precision it was exported with" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "int3"}, "unsupported ONNX precision"),
    ({"precision": "int4", "block_size": 48}, "unsupported block size"),
    ({"precision": "int8", "algorithm": "k_quant"}, "writes int4 only"),
    ({"precision": "int4", "algorithm": "magic"}, "unknown onnxruntime quantization algorithm"),
    ({"from_dir": "tiny:4.5"}, "not an `mcq quantize` output"),
    ({"from_dir": "tiny:4.5", "algorithm": "rtn", "precision": "int4"}, "do not apply"),
])
def test_bad_options_are_one_line_errors_before_any_output(kwargs, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(McqError, match=message) as caught:
        export_onnx("tiny:4.5", out, **kwargs)
    assert "\n" not in str(caught.value)
    assert not out.exists()


def test_missing_processor_config_and_existing_output(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("tiny:4.5"), model)
    (model / "preprocessor_config.json").unlink()
    out = tmp_path / "out"
    code = main(["export", "--format", "onnx", "--model", str(model), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("mcq: error: ") and "preprocessor_config.json" in err and "\n" not in err
    assert not out.exists()
    out.mkdir()
    assert main(["export", "--format", "onnx", "--model", "tiny:4.5", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_runtime_refuses_what_is_not_an_export(tmp_path):
    with pytest.raises(McqError, match="not an ONNX export"):
        OnnxMiniCPMV(resolve_model_path("tiny:4.5"))
    out = tmp_path / "export"
    export_onnx("tiny:4.5", out)
    (out / "onnx/decoder_model_merged.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(McqError, match="onnxruntime cannot load"):
        OnnxMiniCPMV(out)
    # Another model's transformers.js export has the same layout: named by its model_type, not by a missing field.
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_vl"}))
    with pytest.raises(McqError, match="model_type 'qwen2_vl', not an ONNX export of MiniCPM-V"):
        OnnxMiniCPMV(out)


def test_teacher_forced_text_sample(exported):
    """A conversation with an answer and no image (the validator's text samples) scores like torch."""
    model, processor, onnx_model = exported
    turns = [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": "Something, twice."}]
    text, _ = render_conversation(processor.tokenizer, model.spec, turns, add_generation_prompt=False)
    inputs = processor([text], [[]])
    with torch.no_grad():
        logits = model(inputs, use_cache=False).logits
    assert relative_error(onnx_model.forward(inputs), logits) < 1e-4
