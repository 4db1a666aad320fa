"""MiniCPM-V 4.6 (native in transformers): the tiny checkpoint in the official layout, read by transformers' own
classes; the family's facts (components, blocks) and `mcq inspect` on it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoTokenizer, MiniCPMV4_6ForConditionalGeneration

from checkpoint_files import stored_tensors  # tests/checkpoint_files.py
from minicpmv4_6_inputs import image_inputs, random_image  # tests/minicpmv4_6_inputs.py

from mcq.cli import main
from mcq.errors import McqError
from mcq.models.family import component_or_other
from mcq.models.loading import model_spec, open_checkpoint
from mcq.models.minicpmv4_6.facts import PROCESSOR_TOKENS
from mcq.models.minicpmv4_6.tiny import OUTLIER_NORMS, REAL_TEXT, REAL_VISION, REAL_VOCAB_SIZE
from mcq.models.tiny import TinySpec, make_tiny, resolve_tiny
from mcq.models.weights import named_blocks, shell_model


@pytest.fixture(scope="module")
def tiny46():
    return resolve_tiny("tiny:4.6")


def _digests(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_tiny46_has_the_release_structure(tiny46):
    config = json.loads((tiny46 / "config.json").read_text())
    assert config["model_type"] == "minicpmv4_6" and config["architectures"] == ["MiniCPMV4_6ForConditionalGeneration"]
    text, vision = config["text_config"], config["vision_config"]
    assert text["model_type"] == "qwen3_5_text" and set(text["layer_types"]) == {"linear_attention", "full_attention"}
    assert 0 <= config["insert_layer_id"] < vision["num_hidden_layers"] - 1   # vision layers after the vit_merger too
    assert vision["intermediate_size"] % 32 == 4304 % 32 == 16
    with safe_open(tiny46 / "model.safetensors", "pt") as handle:
        names = set(handle.keys())
        assert {handle.get_tensor(n).dtype for n in names} == {torch.bfloat16}
    # The official layout is transformers' own (no conversion mapping for minicpmv4_6): tied lm_head not stored.
    assert "lm_head.weight" not in names
    assert {n.split(".")[1] for n in names} == {"vision_tower", "language_model", "merger"}
    assert any(".vit_merger.linear_1." in n for n in names) and any(".linear_attn.in_proj_qkv." in n for n in names)
    tokenizer = AutoTokenizer.from_pretrained(tiny46)
    assert {name: getattr(tokenizer, name) for name in PROCESSOR_TOKENS} == PROCESSOR_TOKENS
    assert (config["image_token_id"], config["video_token_id"]) == (tokenizer.image_token_id, tokenizer.video_token_id)


def test_tiny46_runs_an_image_in_transformers(tiny46):
    model = AutoModelForImageTextToText.from_pretrained(tiny46).eval()
    assert isinstance(model, MiniCPMV4_6ForConditionalGeneration)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    inputs = image_inputs(tiny46, random_image(150, 100, seed=0))
    with torch.no_grad():
        logits = model(**inputs).logits
        other_image = image_inputs(tiny46, random_image(150, 100, seed=1))["pixel_values"]
        other = model(**{**inputs, "pixel_values": other_image}).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(logits).all() and logits.shape[:2] == inputs["input_ids"].shape
    # The image reaches the answer: another picture of the same size changes the last position's logits.
    assert not torch.equal(logits[0, -1], other[0, -1])
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3


def test_the_processor_files_load_with_transformers_classes(tiny46):
    """What of MiniCPMV4_6Processor can be loaded here: its image processor and tokenizer from the checkpoint's
    files, and the processor class the files name. The processor itself needs torchvision (transformers builds its
    video processor only with it, and refuses None), which mcq's CPU environment cannot hold: PyPI's torchvision
    wheels fail to load beside torch 2.13.0+cpu (`operator torchvision::nms does not exist`). mcq's 4.6 commands
    (chat, calibration, validate) use these two, and encode video with mcq's torch-only copy of the video processor
    (`mcq.models.minicpmv4_6.video`, checked against the real one in test_minicpmv4_6_chat.py)."""
    from transformers import MiniCPMV4_6Processor
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    image_processor = MiniCPMV4_6ImageProcessorPil.from_pretrained(tiny46)
    assert len(image_processor(random_image(150, 100, seed=0))["pixel_values"]) > 0
    processor_class = json.loads((tiny46 / "processor_config.json").read_text())["processor_class"]
    assert processor_class == MiniCPMV4_6Processor.__name__
    assert AutoTokenizer.from_pretrained(tiny46).image_token == PROCESSOR_TOKENS["image_token"]


def test_make_tiny46_is_deterministic_and_seeded(tmp_path):
    first = make_tiny(tmp_path / "a", TinySpec(version="4.6"))
    second = make_tiny(tmp_path / "b", TinySpec(version="4.6"))
    reseeded = make_tiny(tmp_path / "c", TinySpec(version="4.6", seed=1))
    assert _digests(first) == _digests(second)
    differs = {name for name, digest in _digests(reseeded).items() if digest != _digests(first)[name]}
    assert differs == {"model.safetensors"}


def test_make_tiny46_refuses_what_it_cannot_build(tmp_path):
    for real_widths in (False, True):
        with pytest.raises(McqError, match="more than 1 vision layers"):
            make_tiny(tmp_path / "v", TinySpec(version="4.6", vision_layers=1, real_widths=real_widths))


@pytest.fixture(scope="module")
def real46(tmp_path_factory):
    """`make-tiny --version 4.6 --real-widths`: the release's widths at tiny:4.6's layer counts (533 MB)."""
    out = tmp_path_factory.mktemp("real46") / "model"
    assert main(["make-tiny", str(out), "--version", "4.6", "--real-widths", "--json"]) == 0
    return out


def test_real_widths_46_loads_in_transformers_at_the_release_widths(real46):
    """The release's widths (sourced in tiny.py) at tiny:4.6's layer counts (4 LLM layers, 3 linear-attention + 1
    full; 3 vision layers around the vit_merger), read by transformers' own class with nothing missing or left over,
    in tiny:4.6's layout; a forward on text runs."""
    model, info = MiniCPMV4_6ForConditionalGeneration.from_pretrained(real46, output_loading_info=True)
    assert not any(info.values()), info
    text, vision = model.config.text_config, model.config.vision_config
    assert {key: getattr(text, key) for key in REAL_TEXT} == REAL_TEXT
    assert {key: getattr(vision, key) for key in REAL_VISION} == REAL_VISION
    assert model.model.vision_tower.encoder.layers[0].mlp.fc1.out_features == 4304
    assert text.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert (vision.num_hidden_layers, model.config.insert_layer_id) == (3, 1)
    tokenizer = AutoTokenizer.from_pretrained(real46)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert text.vocab_size == len(tokenizer)
    with safe_open(real46 / "model.safetensors", "pt") as ours, \
            safe_open(resolve_tiny("tiny:4.6") / "model.safetensors", "pt") as tinys:
        assert set(ours.keys()) == set(tinys.keys())
        assert {ours.get_slice(name).get_dtype() for name in ours.keys()} == {"BF16"}
    inputs = tokenizer("A short text to read.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_rtn_quantizes_the_real_width_46(real46, tmp_path):
    """`mcq quantize --method rtn` at the release's widths (about 20 s here): SigLIP's 4304-wide MLP, which no group
    size divides, padded to 4352; the vit_merger's and merger's MLPs kept dense, as vLLM builds them."""
    out = tmp_path / "rtn"
    assert main(["quantize", "--model", str(real46), "--method", "rtn", "--out", str(out), "--json"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["intermediate_size"] == 4352
    assert {"model.vision_tower.vit_merger.linear_1", "model.merger.mlp.0.linear_1"} \
        <= set(config["quantization_config"]["ignore"])


def test_the_unit_by_unit_writer_writes_what_save_pretrained_writes(tmp_path, monkeypatch):
    """The writer real widths use (here at tiny widths, with the release's vocabulary and outliers): the files
    save_pretrained writes but for the weights' values (same configs, tensor names, shapes, bf16), deterministic,
    each unit from a seed of its own (a layer is the same at any depth), the outlier gains on the 1 + weight scale."""
    from mcq.models.minicpmv4_6 import tiny

    spec = TinySpec(version="4.6", real_vocab=True, outliers=True)
    whole = make_tiny(tmp_path / "whole", spec)
    monkeypatch.setattr(tiny, "_per_unit", lambda spec: True)
    two, again = make_tiny(tmp_path / "two", spec), make_tiny(tmp_path / "again", spec)
    deeper = make_tiny(tmp_path / "deeper", dataclasses.replace(spec, llm_layers=5))
    assert _digests(two) == _digests(again)
    assert {name for name, digest in _digests(two).items() if digest != _digests(whole)[name]} == {"model.safetensors"}
    ours, theirs, deeper = stored_tensors(two), stored_tensors(whole), stored_tensors(deeper)
    assert {n: (t.dtype, t.shape) for n, t in ours.items()} == {n: (t.dtype, t.shape) for n, t in theirs.items()}
    assert ours["model.language_model.embed_tokens.weight"].shape[0] == REAL_VOCAB_SIZE
    for name in ("model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
                 "model.language_model.embed_tokens.weight", "model.vision_tower.vit_merger.linear_1.weight"):
        assert torch.equal(ours[name], deeper[name]), name
    layer = "model.language_model.layers.{}.mlp.up_proj.weight"
    assert not torch.equal(ours[layer.format(1)], ours[layer.format(2)])
    scale = 1 + ours["model.language_model.layers.1.input_layernorm.weight"].float()
    assert scale.max() > 19 and (scale == 1).sum() == scale.numel() - 2


def test_blocks_follow_the_data_flow_through_the_vit_merger(tiny46):
    checkpoint = open_checkpoint(tiny46)
    assert (checkpoint.release, checkpoint.family.name) == ("4.6", "minicpmv4_6")
    assert checkpoint.family.components == ("vision", "vit_merger", "merger", "llm")
    names = [name for name, _ in named_blocks(shell_model(checkpoint.config))]
    vision = "model.vision_tower.encoder.layers."
    # insert_layer_id is 1: layers 0 and 1, then the vit_merger, then layer 2.
    assert names == [f"{vision}0", f"{vision}1", "model.vision_tower.vit_merger", f"{vision}2", "model.merger",
                     *(f"model.language_model.layers.{i}" for i in range(4))]
    assert [component_or_other(name + ".") for name in names] == ["vision", "vision", "vit_merger", "vision",
                                                                  "merger", "llm", "llm", "llm", "llm"]
    # The resampler family's names still resolve as before.
    assert [component_or_other(n) for n in ("vpm.encoder.layers.0.mlp.fc2", "resampler.kv_proj", "llm.lm_head")] \
        == ["vision", "resampler", "llm"]


def test_inspect_tiny46(capsys):
    assert main(["inspect", "tiny:4.6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == "4.6" and report["llm"].startswith("Qwen3.5")
    assert list(report["components"]) == ["vision", "vit_merger", "merger", "llm"]
    assert all(part["parameters"] > 0 for part in report["components"].values())
    # The tied lm_head is counted once (with the embedding table) and stored once.
    assert report["total_bytes"] == 2 * report["total_parameters"]
    by_name = {linear["name"]: linear for linear in report["linears"]}
    assert by_name["lm_head"]["component"] == "llm"
    assert by_name["model.vision_tower.vit_merger.linear_2"]["component"] == "vit_merger"
    assert by_name["model.merger.mlp.0.linear_1"]["component"] == "merger"
    assert {"linear_attn.in_proj_qkv", "self_attn.q_proj"} <= {n.split(".", 4)[-1] for n in by_name
                                                               if n.startswith("model.language_model.")}
    assert set(report["non_divisible"]) == {*(f"model.vision_tower.encoder.layers.{i}.mlp.fc2" for i in range(3)),
                                            "model.vision_tower.vit_merger.linear_2"}
    assert report["stored_as"] == []
    assert main(["inspect", "tiny:4.6"]) == 0
    assert "vit_merger" in capsys.readouterr().out


def test_a_46_checkpoint_missing_a_tensor_is_one_line(tiny46, tmp_path, capsys):
    copy = tmp_path / "broken"
    shutil.copytree(tiny46, copy)
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.vision_tower.vit_merger.linear_1.weight"]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    assert main(["inspect", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MiniCPM-V 4.6 layout" in err and "vit_merger.linear_1.weight" in err


def test_the_resampler_family_loader_refuses_46_in_one_line(tiny46):
    with pytest.raises(McqError, match="MiniCPM-V 4.6, which this command does not support yet"):
        model_spec(tiny46)


def test_tiny46_outliers_scale_two_channels_of_each_norm_that_feeds_linears():
    """tiny:4.6-outliers is tiny:4.6 with 2 channels of every such norm 20-50x stronger: for the LLM's RMSNorms,
    which scale by 1 + weight, on that scale; nothing else changes."""
    plain, outliers = stored_tensors(resolve_tiny("tiny:4.6")), stored_tensors(resolve_tiny("tiny:4.6-outliers"))
    changed = {name for name in plain if not torch.equal(plain[name], outliers[name])}
    norms = {name for name in plain if name.endswith(tuple(f"{n}.weight" for n in OUTLIER_NORMS))}
    assert changed == norms and len(norms) == 3 * 2 + 2 + 1 + 4 * 2   # encoder, vit_merger, merger, LLM layers
    for name in norms:
        offset = 1.0 if name.startswith("model.language_model.") else 0.0
        ratio = (offset + outliers[name].float()) / (offset + plain[name].float())
        strong = ratio > 1.5
        assert strong.sum() == 2 and bool(((ratio[strong] > 19) & (ratio[strong] < 51)).all()), name
        assert torch.allclose(ratio[~strong], torch.ones(1)), name
