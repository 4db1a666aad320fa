"""`mcq export --format onnx` of MiniCPM-V 4.6: graphs traced from the family's torch programs
(`mcq.models.minicpmv4_6.programs`), run on onnxruntime (`OnnxProgramModel`) against transformers' own model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForImageTextToText

from mcq.export.onnx import export_onnx
from mcq.export.onnx.program_runtime import OnnxProgramModel
from mcq.models.minicpmv4_6.serving import ServedMiniCPMV4_6

REFERENCE = "tiny:4.6"
# Steps decoded one token at a time through the state outputs, after a prefill of the rest of the sample.
DECODE_STEPS = 4


# An export traces its three programs once per process (then reused by the model's structure): one export per
# precision for the whole module.
@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> Path:
    return export_onnx(REFERENCE, tmp_path_factory.mktemp("onnx46") / "fp32").out


@pytest.fixture(scope="module")
def int4(tmp_path_factory) -> Path:
    return export_onnx(REFERENCE, tmp_path_factory.mktemp("onnx46") / "int4", precision="int4").out


@pytest.fixture(scope="module")
def served(served_46) -> ServedMiniCPMV4_6:
    return served_46


@pytest.fixture(scope="module")
def samples(samples_46) -> list[dict]:
    return samples_46


@pytest.fixture(scope="module")
def reference(served, samples) -> list[torch.Tensor]:
    """transformers' logits of each sample (its chunked delta-rule fallback takes seconds a sample: computed once)."""
    return [_reference_logits(served, data) for data in samples]


def _kl(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ logits) per position."""
    return torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1)


def _reference_logits(served: ServedMiniCPMV4_6, data: dict) -> torch.Tensor:
    with torch.no_grad():
        return served.logits(served.inputs(data))


def test_fp32_matches_transformers_on_text_and_image_samples(fp32, served, samples, reference):
    model = OnnxProgramModel(fp32)
    kls = []
    for data, logits in zip(samples, reference):
        kls.append(_kl(torch.from_numpy(model.forward(data)[0]), logits))
        if "pixel_values" in data:
            (blocks,) = model.vision_per_sample(data)
            with torch.no_grad():
                expected = served.vision(served.inputs(data))
            assert np.abs(blocks - expected.numpy()).max() < 1e-4
    assert torch.cat(kls).mean().item() < 1e-5


def _decode(model: OnnxProgramModel, data: dict, steps: int, broken: str | None = None) -> np.ndarray:
    """Logits of the sample's last `steps` tokens, each fed alone after a prefill of the others through the
    state outputs; `broken`: the prefix of state inputs reset to zeros before every step (a dropped state)."""
    embeds = model.merged_embeddings(data)
    prompt = embeds.shape[1] - steps
    logits, state = model.decoder(embeds[:, :prompt], np.ones((1, prompt)), np.arange(prompt)[None],
                                  model.empty_cache(1))
    rows = [logits[0, -1]]
    for position in range(prompt, prompt + steps - 1):
        if broken:
            state = {name: np.zeros_like(value) if name.startswith(broken) else value for name, value in state.items()}
        logits, state = model.decoder(embeds[:, position:position + 1], np.ones((1, position + 1)),
                                      np.array([[position]]), state)
        rows.append(logits[0, -1])
    return np.stack(rows)


def test_decoding_through_the_state_outputs_matches_the_full_forward(fp32, samples, reference):
    """The state contract: KV caches, conv and recurrent states carried from call to call give the logits of one
    forward over the whole sequence; dropping either linear-attention state between steps does not."""
    model = OnnxProgramModel(fp32)
    names = [state.name for state in model.state]
    assert {name.split(".")[0] for name in names} == {"past_key_values", "past_conv", "past_recurrent"}
    expected = reference[1][-DECODE_STEPS - 1:-1].numpy()
    assert np.abs(_decode(model, samples[1], DECODE_STEPS) - expected).max() < 1e-4
    for dropped in ("past_conv.", "past_recurrent."):
        assert np.abs(_decode(model, samples[1], DECODE_STEPS, broken=dropped) - expected).max() > 1e-2, dropped


def test_the_export_names_its_state_and_weights(fp32):
    root = fp32
    config = json.loads((root / "config.json").read_text())
    assert config["transformers.js_config"]["dtype"] == dict.fromkeys(
        ("vision_encoder", "embed_tokens", "decoder_model_merged"), "fp32")
    state = config["mcq_decoder_state"]
    assert state[0] == {"input": "past_conv.0", "output": "present_conv.0", "shape": [None, 1024, 3]}
    assert state[-1] == {"input": "past_key_values.3.value", "output": "present.3.value", "shape": [None, 2, None, 64]}
    decoder = onnx.load(str(root / "onnx" / "decoder_model_merged.onnx"))
    inputs = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
              for value in decoder.graph.input}
    assert inputs["past_key_values.3.key"] == ["batch_size", 2, "past_sequence_length", 64]
    assert inputs["past_conv.0"] == ["batch_size", 1024, 3] and inputs["past_recurrent.0"] == ["batch_size", 16, 32, 32]
    assert "Scan" in {node.op_type for node in decoder.graph.node}
    names = {tensor.name for tensor in decoder.graph.initializer}
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in names
    # Nothing of the tracing machine: the exporter's stack traces name the traced files' absolute paths, and its
    # intermediate shapes (torch.export's symbol expressions) raise onnxruntime's peak.
    for path in sorted((root / "onnx").glob("*.onnx")):
        graph = onnx.load(str(path), load_external_data=False).graph
        bodies = [attribute.g for node in graph.node for attribute in node.attribute if attribute.HasField("g")]
        assert not graph.metadata_props and not any(node.metadata_props for node in graph.node), path.name
        assert not any(g.value_info for g in [graph, *bodies]), path.name


@pytest.mark.slow
def test_int4_writes_matmulnbits_and_stays_close(int4, samples, reference):
    root = int4
    decoder = onnx.load(str(root / "onnx" / "decoder_model_merged_q4.onnx"))
    ops = [node.op_type for node in decoder.graph.node]
    # Every LLM Linear but the (tied) head, whose weight is the embedding table's.
    assert ops.count("MatMulNBits") == 31 and ops.count("MatMul") >= 1
    model = OnnxProgramModel(root)
    kl = torch.cat([_kl(torch.from_numpy(model.forward(data)[0]), logits)
                    for data, logits in zip(samples, reference)]).mean().item()
    assert 1e-5 < kl < 0.05


@pytest.mark.slow
def test_int4_from_an_mcq_quantize_output_computes_its_dequantized_model(tmp_path, samples):
    """--from writes the output's own levels: with float activations (accuracy_level 0) the export computes what
    transformers computes with those levels dequantized."""
    from transformers import CompressedTensorsConfig

    from mcq.quantize.api import quantize

    quantized = quantize(REFERENCE, tmp_path / "rtn", method="rtn", progress=False).out
    root = export_onnx(REFERENCE, tmp_path / "onnx", precision="int4", from_dir=quantized, accuracy_level=0).out
    result = json.loads((root / "mcq-manifest.json").read_text())
    sources = {plan["source"] for plan in result["extra"]["linears"]}
    assert sources == {"mcq", None}
    model = AutoModelForImageTextToText.from_pretrained(
        quantized, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    dequantized = ServedMiniCPMV4_6(model, quantized, "cpu")
    onnx_model = OnnxProgramModel(root)
    kl = torch.cat([_kl(torch.from_numpy(onnx_model.forward(data)[0]), _reference_logits(dequantized, data))
                    for data in samples])
    assert kl.mean().item() < 1e-5


def test_fp16_stores_the_large_weights_in_float16_and_computes_what_fp32_does(fp32, samples, tmp_path):
    """fp16 stores the large weights in float16 behind a Cast (the tiny checkpoint's bf16 weights fit float16, so the
    logits are fp32's up to float32 rounding); the traced graphs' weights are written from the checkpoint in the
    export's dtype after tracing."""
    from mcq.export.onnx.traced import FP16_MIN_ELEMENTS

    root = export_onnx(REFERENCE, tmp_path / "fp16", precision="fp16").out
    decoder = onnx.load(str(root / "onnx" / "decoder_model_merged_fp16.onnx"))
    kinds = {t.name: (t.data_type, int(np.prod(t.dims))) for t in decoder.graph.initializer}
    assert kinds["model.language_model.layers.0.linear_attn.in_proj_qkv.weight_fp16"][0] == onnx.TensorProto.FLOAT16
    assert not [name for name, (kind, size) in kinds.items()
                if kind == onnx.TensorProto.FLOAT and size >= FP16_MIN_ELEMENTS]
    assert {node.op_type for node in decoder.graph.node} >= {"Cast", "Scan"}
    for data in samples[:2]:
        expected = OnnxProgramModel(fp32).forward(data)[0]
        assert np.abs(OnnxProgramModel(root).forward(data)[0] - expected).max() < 1e-3


def test_the_decoder_is_traced_once_per_layer_kind_and_joined(monkeypatch):
    """The decoder graph is its prologue, one trace per kind of layer and its head, joined: tracing costs the same
    at any depth. Layer 2 (linear attention, a copy of layer 0's trace) reads its own weights and states. Every
    piece of the layout is traced by one torch.onnx.export."""
    from mcq.export.onnx import traced
    from mcq.export.weights_source import ExportWeights, MetaWeights
    from mcq.models.minicpmv4_6.programs import build_program

    calls = []
    trace = traced.trace_graphs
    monkeypatch.setattr(traced, "trace_graphs", lambda programs: calls.append(
        [type(program.module).__name__ for program in programs]) or trace(programs))
    weights = ExportWeights(REFERENCE, every_family=True)
    try:
        model, program_weights = traced.trace_layout(build_program, MetaWeights(weights))["decoder_model_merged"]
    finally:
        weights.close()
    # The vision graph's pieces (its vit_merger a layer of its own kind), the embedding, the decoder's.
    assert calls == [["VisionEmbeddings", "VisionHead", "_VisionLayer", "_WindowMerger", "EmbedTokens",
                      "DecoderPrologue", "DecoderHead", "DecoderLayerStep", "DecoderLayerStep"]]
    qkv = "model.language_model.layers.2.linear_attn.in_proj_qkv.weight"
    assert program_weights[qkv].source == qkv and program_weights[qkv].transposed
    reads = {name for node in model.graph.node for name in node.input}
    assert {qkv, "past_conv.2", "past_recurrent.2"} <= reads
    assert [value.name for value in model.graph.output][-4:] == ["present_conv.2", "present_recurrent.2",
                                                                  "present.3.key", "present.3.value"]


def test_a_program_weight_without_a_checkpoint_source_is_refused():
    """Programs are traced on the meta device and their weights written afterwards by the checkpoint tensor each
    parameter names: one built from the checkpoint that names none could not be written, so it is refused."""
    from mcq.errors import McqError
    from mcq.export.onnx.traced import trace_graphs
    from mcq.models.familyspec import TracedProgram

    class Program(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(4, 4, device="meta"), requires_grad=False)

        def forward(self, x):
            return x @ self.weight

    program = TracedProgram(Program(), (torch.zeros(2, 4),), ("x",), ("y",), ({0: torch.export.Dim.DYNAMIC},), {})
    with pytest.raises(McqError, match="Program tensor weight holds checkpoint data but names no source"):
        trace_graphs([program])


@pytest.mark.slow
def test_validate_scores_an_export_against_the_bf16_checkpoint(fp32):
    from mcq.validate.api import validate

    results = validate(REFERENCE, [str(fp32)], num_samples=3, latency_runs=1, max_new_tokens=4, decode_tokens=2,
                       progress=False)
    row = next(row for row in results["variants"] if row["path"] == str(fp32))
    assert row["status"] == "ok", row["error"]
    assert row["format"] == "onnx-fp32" and row["runtime"].startswith("onnxruntime ")
    metrics = row["metrics"]
    assert metrics["kl_mean"] < 1e-5 and metrics["vision_cosine"] > 0.9999 and metrics["gen_exact_match"] == 1.0


def test_fp32_matches_transformers_on_a_video_sample(fp32, served, video_46):
    """A video's frames go through the vision graph as images do and their tokens land at the video tokens: the
    blocks and the logits are transformers' (which runs `get_video_features`), so validation scores video too."""
    from mcq.validate.runners.onnx_runner import OnnxRunner

    model = OnnxProgramModel(fp32)
    with torch.no_grad():
        inputs = served.inputs(video_46)
        expected_blocks, expected = served.vision(inputs).numpy(), served.logits(inputs)
    (blocks,) = model.vision_per_sample(video_46)
    assert blocks.shape == expected_blocks.shape and len(blocks) == len(video_46["target_sizes_videos"])
    assert np.abs(blocks - expected_blocks).max() < 1e-4
    assert _kl(torch.from_numpy(model.forward(video_46)[0]), expected).mean().item() < 1e-5
    # Another model's blocks go in at the same slots: the reference's give the reference's logits.
    logits = model.forward(video_46, [expected_blocks])[0]
    assert _kl(torch.from_numpy(logits), expected).mean().item() < 1e-5
    assert OnnxRunner.unserved(video_46) is None

def test_fp32_in_downsample_mode_4x_matches_transformers(tiny46_4x, served_4x, tmp_path):
    """A checkpoint in `downsample_mode` 4x: the vision graph skips the vit_merger and merges the full grid (4x the
    tokens of 16x), as transformers' `get_image_features` does; blocks and logits are transformers'."""
    served, sample = served_4x
    out = export_onnx(str(tiny46_4x), tmp_path / "fp32").out
    model = OnnxProgramModel(out)
    with torch.no_grad():
        inputs = served.inputs(sample)
        expected_blocks, expected = served.vision(inputs).numpy(), served.logits(inputs)
    (blocks,) = model.vision_per_sample(sample)
    assert blocks.shape == expected_blocks.shape
    assert blocks.shape[1] == int(sample["target_sizes"].prod(-1).max()) // 4
    assert np.abs(blocks - expected_blocks).max() < 1e-4
    assert _kl(torch.from_numpy(model.forward(sample)[0]), expected).mean().item() < 1e-5
    vision_inputs = {i.name for i in onnx.load(Path(out) / "onnx" / "vision_encoder.onnx",
                                               load_external_data=False).graph.input}
    assert vision_inputs == {"pixel_values", "position_ids", "merger_order"}
