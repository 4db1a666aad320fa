"""`mcq export --format coreml` of MiniCPM-V 4.6: packages traced from the family's torch programs
(`mcq.export.coreml.traced`), run by mcq's MIL interpreter (fp16 after every op, as the device computes) against
transformers' own model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from mcq.cli import main
from mcq.export.coreml import export_coreml
from mcq.models.loading import resolve_model_path
from mcq.validate.coreml.runtime import CoremlProgramModel, open_coreml
from mcq.validate.runners.base import config_identity
from mcq.validate.runners.coreml_runner import CoremlRunner

REFERENCE = "tiny:4.6"


@pytest.fixture(scope="module")
def fp16(tmp_path_factory) -> Path:
    return Path(export_coreml(REFERENCE, tmp_path_factory.mktemp("coreml46") / "fp16", vision="fp16", llm="fp16",
                              progress=False).out)


def _kl(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ logits) per position."""
    return torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1)


def test_fp16_packages_match_transformers_on_text_and_image_samples(fp16, served_46, samples_46):
    """The fp16 packages, one position per decoder call, against transformers' float32 logits: KL < 1e-5 on a text
    sample and on a sliced image's (whose vision package runs once per image size: flexible shapes), and the image
    tokens close to transformers' vision path."""
    model = open_coreml(fp16)
    assert isinstance(model, CoremlProgramModel) and model.llm_info["max_tokens_per_call"] == 1
    for data in samples_46:
        with torch.no_grad():
            expected = served_46.logits(served_46.inputs(data))
        logits = torch.from_numpy(model.forward(model.sample_embeddings(data, None)))
        assert _kl(logits, expected).mean().item() < 1e-5
        if "pixel_values" in data:
            blocks = model.sample_vision(data)
            with torch.no_grad():
                expected = served_46.vision(served_46.inputs(data)).numpy()
            assert blocks.shape == expected.shape
            assert np.abs(blocks - expected).max() < 1e-2 * np.abs(expected).max()



def test_fp16_packages_match_transformers_on_a_video_sample(fp16, served_46, video_46):
    """A video's frames through the vision package as images, their tokens at the video tokens: transformers'
    blocks and logits (KL < 1e-5), so the Core ML runner scores video samples too."""
    model = open_coreml(fp16)
    with torch.no_grad():
        inputs = served_46.inputs(video_46)
        expected_blocks, expected = served_46.vision(inputs).numpy(), served_46.logits(inputs)
    blocks = model.sample_vision(video_46)
    assert blocks.shape == expected_blocks.shape and len(blocks) == len(video_46["target_sizes_videos"])
    assert np.abs(blocks - expected_blocks).max() < 1e-2 * np.abs(expected_blocks).max()
    logits = torch.from_numpy(model.forward(model.sample_embeddings(video_46, None)))
    assert _kl(logits, expected).mean().item() < 1e-5
    assert CoremlRunner.unserved(video_46) is None

def test_decoder_state_carries_every_layer_kind(fp16, samples_46):
    """Decoding the last position on the state the prefill left gives the logits of the whole sequence; emptying
    the linear-attention states (conv, recurrent) or the KV cache first moves them: each state is read."""
    model = open_coreml(fp16)
    embeds = model.sample_embeddings(samples_46[0], None)
    whole = model.forward(embeds)[-1]
    model.forward(embeds[:-1])
    stepped = model.decode(embeds[-1:], len(embeds) - 1)[-1]
    assert np.abs(stepped - whole).max() < 1e-3
    states = {name for chunk in model.llm_info["decoder"] for name in chunk["states"]}
    assert states == {"key_cache", "value_cache", "conv_state", "recurrent_state"}
    for emptied in ("conv_state", "recurrent_state", "key_cache"):
        model.forward(embeds[:-1])
        for package in model.decoder_packages:
            package.interpreter.state[emptied] = np.zeros_like(package.interpreter.state[emptied])
        moved = model.decode(embeds[-1:], len(embeds) - 1)[-1]
        assert np.abs(moved - whole).max() > 1e-2, emptied


def test_int4_from_rtn_carries_its_levels_and_runs_in_the_validator(tmp_path, served_46, samples_46):
    """`--from` an RTN output: the LLM's Linears take its int4 levels (only the unquantized embedding table is
    requantized); `mcq validate`'s Core ML runner recognizes the export, sizes it per component and scores it."""
    rtn = tmp_path / "rtn"
    assert main(["quantize", "--model", REFERENCE, "--method", "rtn", "--out", str(rtn)]) == 0
    result = export_coreml(REFERENCE, tmp_path / "int4", from_dir=rtn, progress=False)
    assert list(result.llm_fallbacks) == ["model.language_model.embed_tokens"]
    sidecar = json.loads((Path(result.out) / "minicpmv-coreml.json").read_text())
    assert sidecar["family"] == "minicpmv4_6" and sidecar["resampler"] is None
    assert CoremlRunner.detect(result.out) == "coreml-int4-block32"
    # The same model as the reference, so `mcq validate` scores it against it.
    reference = AutoConfig.from_pretrained(resolve_model_path(REFERENCE))
    assert CoremlRunner.describe(result.out) == config_identity(reference)
    sizes = CoremlRunner.weight_bytes(result.out)
    assert set(sizes) == {"vision", "vit_merger", "merger", "llm"} and all(sizes.values())
    runner = CoremlRunner(result.out, torch.device("cpu"), "float32")
    text = samples_46[0]
    with torch.no_grad():
        expected = served_46.logits(served_46.inputs(text))
    kl = _kl(runner.logits(text), expected).mean().item()
    assert 1e-5 < kl < 0.05

def test_fp16_packages_in_downsample_mode_4x_match_transformers(tiny46_4x, served_4x, tmp_path):
    """The 4x vision package (no vit_merger, the merger over the full grid) against transformers: blocks close,
    logits KL < 1e-5."""
    served, sample = served_4x
    model = open_coreml(export_coreml(str(tiny46_4x), tmp_path / "fp16", vision="fp16", llm="fp16",
                                      progress=False).out)
    with torch.no_grad():
        inputs = served.inputs(sample)
        expected_blocks, expected = served.vision(inputs).numpy(), served.logits(inputs)
    blocks = model.sample_vision(sample)
    assert blocks.shape == expected_blocks.shape
    assert np.abs(blocks - expected_blocks).max() < 1e-2 * np.abs(expected_blocks).max()
    logits = torch.from_numpy(model.forward(model.sample_embeddings(sample, None)))
    assert _kl(logits, expected).mean().item() < 1e-5
