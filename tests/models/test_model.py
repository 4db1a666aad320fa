"""The native model on tiny checkpoints in the official layout: loading, saving, placeholders, chat()."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM

import mcq  # noqa: F401  (registers the Auto classes)
from mcq.errors import McqError
from mcq.models.loading import load_model, load_processor, stored_tensors
from mcq.models.minicpmv import MiniCPMV
from mcq.models.tiny import TinySpec, make_tiny


# Published files of the official releases (tests/data/official/README.md).
OFFICIAL = Path(__file__).resolve().parents[1] / "data" / "official"


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _digests(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_make_tiny_is_deterministic_and_seeded(tmp_path):
    first = make_tiny(tmp_path / "a", TinySpec(version="4.5", seed=3))
    second = make_tiny(tmp_path / "b", TinySpec(version="4.5", seed=3))
    other = make_tiny(tmp_path / "c", TinySpec(version="4.5", seed=4))
    assert _digests(first) == _digests(second)
    assert _digests(first)["model-00001-of-00004.safetensors"] != _digests(other)["model-00001-of-00004.safetensors"]


def _layout(names) -> set[str]:
    """Tensor names with layer numbers replaced by N: the layout, whatever the depth."""
    return {re.sub(r"\.\d+\.", ".N.", name) for name in names}


def _official_layout(version: str) -> set[str]:
    """The tensor names of the official release (tests/data/official/README.md says where each list comes from)."""
    index_45 = json.loads((OFFICIAL / "minicpm-v-4_5" / "model.safetensors.index.json").read_text())["weight_map"]
    names_26 = json.loads((OFFICIAL / "minicpm-v-2_6" / "weight_names.json").read_text())["weight_names"]
    if version == "4.5":
        return _layout(index_45)
    if version == "2.6":
        return _layout(names_26)
    # 4.0 has no published index: its vision tower and resampler are those of 2.6 and 4.5 (whose names agree), its
    # LLM is LlamaForCausalLM.
    vision = {name for name in _layout(names_26) if not name.startswith("llm.")}
    assert vision == {name for name in _layout(index_45) if not name.startswith("llm.")}
    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    return vision | _layout(f"llm.{name}" for name in llama.state_dict())


def test_tiny_layout_is_official(tiny_path):
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["model_type"] == "minicpmv" and config["architectures"] == ["MiniCPMV"]
    assert config["vision_config"]["intermediate_size"] % 32 != 0  # like 4304
    index = json.loads((tiny_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    stored = {}
    for shard in shards:
        with safe_open(tiny_path / shard, "pt") as handle:
            stored.update({k: handle.get_slice(k).get_dtype() for k in handle.keys()})
    assert set(stored) == set(index["weight_map"])
    assert set(stored.values()) == {"BF16"}
    # The names the official release stores, not the names mcq's own reader expects.
    assert _layout(stored) == _official_layout(str(config["version"]))
    for name in ("tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (tiny_path / name).is_file()
    # Token ids only (4.0's tokenizer has no pad token): vLLM refuses a stop id that is null.
    generation = json.loads((tiny_path / "generation_config.json").read_text())
    assert all(isinstance(token, int) for token in generation["eos_token_id"])


def test_load_save_load_is_bit_exact(tiny_path, tmp_path):
    model = load_model(tiny_path)
    model.save_pretrained(tmp_path / "saved")
    original, saved = stored_tensors(tiny_path), stored_tensors(tmp_path / "saved")
    assert {k: (v["dtype"], v["shape"]) for k, v in saved.items()} == \
        {k: (v["dtype"], v["shape"]) for k, v in original.items()}
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(tiny_path / name, tmp_path / "saved" / name)
    reloaded = load_model(tmp_path / "saved")
    first, second = model.state_dict(), reloaded.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key


def test_automodel_loads_without_remote_code(tiny45):
    config = AutoConfig.from_pretrained(tiny45)
    assert "auto_map" in json.loads((tiny45 / "config.json").read_text())  # names remote code we never run
    model = AutoModel.from_pretrained(tiny45)
    assert isinstance(model, MiniCPMV) and type(config).__module__.startswith("mcq.")


def test_rope_scaling_reaches_the_llm_and_survives_a_save(tiny45, tmp_path):
    """Qwen3's long-context recipe adds YaRN `rope_scaling` to config.json; transformers 5 would standardize it
    against MiniCPM-V's own config, which has no RoPE fields, and fail."""
    copy = tmp_path / "yarn"
    shutil.copytree(tiny45, copy)
    config = json.loads((copy / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    (copy / "config.json").write_text(json.dumps(config))
    model = load_model(copy)
    assert model.llm.config.rope_parameters["rope_type"] == "yarn"
    assert model.llm.config.rope_parameters["factor"] == 4.0
    model.config.save_pretrained(tmp_path / "saved")
    assert AutoConfig.from_pretrained(tmp_path / "saved").llm_kwargs()["rope_parameters"]["rope_type"] == "yarn"


@pytest.fixture(scope="module")
def model45(tiny45):
    return load_model(tiny45, dtype="float32"), load_processor(tiny45)


def test_placeholder_and_image_bound_of_a_3x3_sliced_image(model45):
    _, processor = model45
    prefix = "<|im_start|>user\n"
    text = prefix + "(<image>./</image>)\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    inputs = processor(text, [[_image(1344, 1344)]])
    unk = "<unk>" * 64
    # Hand-built: the 3 x 3 grid is rows of 3 slices joined by newlines, right after </image>.
    row = ("<slice>" + unk + "</slice>") * 3
    expected = prefix + "<image_id>0</image_id><image>" + unk + "</image>" + "\n".join([row] * 3) \
        + "\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    ids = processor.tokenizer.encode(expected, add_special_tokens=False)
    assert inputs["input_ids"][0].tolist() == ids
    offset = len(processor.tokenizer.encode(prefix, add_special_tokens=False))
    first = offset + 4  # <image_id> 0 </image_id> <image>
    spans = [(first, first + 64)]
    for r in range(3):
        for c in range(3):
            # after </image>: each row is 3 x (<slice> 64 </slice>) = 198 tokens, rows separated by one newline
            start = first + 64 + 1 + r * (3 * 66 + 1) + c * 66 + 1
            spans.append((start, start + 64))
    assert inputs["image_bound"][0].tolist() == [list(s) for s in spans]
    assert len(inputs["pixel_values"][0]) == 10
    assert inputs["tgt_sizes"][0].tolist() == [[32, 32]] * 10


def test_forward_official_data_form_merges_vision_features(model45):
    model, processor = model45
    inputs = processor("<|im_start|>user\n(<image>./</image>)\nhi", [[_image(300, 200)]])
    with torch.no_grad():
        logits = model(inputs).logits
        text_only = model(inputs["input_ids"]).logits
        vision = model.get_vision_embedding(inputs["pixel_values"][0], inputs["tgt_sizes"][0])
        embeds, _ = model.get_vllm_embedding(inputs)
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)
    start, end = inputs["image_bound"][0][0].tolist()
    torch.testing.assert_close(embeds[0, start:end], vision[0])
    assert not torch.allclose(logits[0, end:], text_only[0, end:])  # the image changes what follows it


GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "max_new_tokens": 8}


def test_chat_single_image_is_deterministic(model45):
    model, processor = model45
    msgs = [{"role": "user", "content": [_image(500, 400), "What is in the image?"]}]
    first = model.chat(msgs=msgs, processor=processor, **GREEDY)
    assert isinstance(first, str) and first == model.chat(msgs=msgs, processor=processor, **GREEDY)
    assert model.chat(image=_image(500, 400), msgs=[{"role": "user", "content": "What is in the image?"}],
                      processor=processor, **GREEDY) == first


def test_chat_streaming_matches_and_thinking_prefix(model45):
    model, processor = model45
    msgs = [{"role": "user", "content": [_image(448, 448), "Describe."]}]
    answer = model.chat(msgs=msgs, processor=processor, **GREEDY)
    assert "".join(model.chat(msgs=msgs, processor=processor, stream=True, **GREEDY)) == answer
    assert model.chat(msgs=msgs, processor=processor, enable_thinking=True, **GREEDY).startswith("<think>\n")


def test_chat_multi_image_few_shot_and_batch(model45):
    model, processor = model45
    a, b = _image(640, 480, 1), _image(480, 640, 2)
    two_images = [{"role": "user", "content": [a, b, "Compare the two images."]}]
    few_shot = [
        {"role": "user", "content": [a, "What is this?"]},
        {"role": "assistant", "content": "noise"},
        {"role": "user", "content": [b, "And this?"]},
    ]
    single = [model.chat(msgs=m, processor=processor, **GREEDY) for m in (two_images, few_shot)]
    batched = model.chat(msgs=[two_images, few_shot], processor=processor, **GREEDY)
    assert batched == single


def test_chat_video_frames_pack_into_one_block(model45):
    model, processor = model45
    frames = [_image(448, 448, seed) for seed in range(6)]
    text = "<|im_start|>user\n" + "\n".join(["(<image>./</image>)"] * 6) + "\nWhat happens?"
    inputs = processor(text, [frames], max_slice_nums=1, use_image_id=False, temporal_ids=[[[0, 1, 2, 3, 4, 5]]])
    assert len(inputs["image_bound"][0]) == 1  # six frames, one 64-token block
    with torch.no_grad():
        packed = model.get_vision_embedding(inputs["pixel_values"][0], inputs["tgt_sizes"][0],
                                            inputs["temporal_ids"][0])
    assert packed.shape == (1, 64, model.config.hidden_size)
    answer = model.chat(msgs=[{"role": "user", "content": frames + ["What happens?"]}], processor=processor,
                        use_image_id=False, max_slice_nums=1, temporal_ids=[[0, 1, 2], [3, 4, 5]], **GREEDY)
    assert isinstance(answer, str)


def test_chat_default_is_beam_search_like_the_release(model45, monkeypatch):
    model, processor = model45
    seen = {}
    original = model.llm.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**{**kwargs, "max_new_tokens": 1})

    monkeypatch.setattr(model.llm, "generate", spy)
    model.chat(msgs=[{"role": "user", "content": "hi"}], processor=processor, sampling=False, max_new_tokens=1)
    assert seen["num_beams"] == 3 and seen["repetition_penalty"] == 1.2
    model.chat(msgs=[{"role": "user", "content": "hi"}], processor=processor, max_new_tokens=1)
    assert seen["do_sample"] is True and seen["top_k"] == 100 and seen["repetition_penalty"] == 1.03


@pytest.mark.parametrize("version", ["2.6", "4.0"])
def test_other_versions_chat(version):
    from mcq.models.tiny import resolve_tiny

    path = resolve_tiny(f"tiny:{version}")
    model, processor = load_model(path, dtype="float32"), load_processor(path)
    assert model.spec.version == version
    answer = model.chat(msgs=[{"role": "user", "content": [_image(700, 300), "What is it?"]}], processor=processor,
                        **GREEDY)
    assert isinstance(answer, str)
    with pytest.raises(mcq.errors.McqError, match="4.5"):
        model.chat(msgs=[{"role": "user", "content": [_image(448, 448), "?"]}], processor=processor,
                   temporal_ids=[[0]], **GREEDY)


def test_scale_emb_multiplies_text_embeddings_only():
    from mcq.models.tiny import resolve_tiny

    path = resolve_tiny("tiny:4.0")
    model, processor = load_model(path, dtype="float32"), load_processor(path)
    assert model.embedding_scale == 12.0
    inputs = processor("<|im_start|>user\n(<image>./</image>)\nhi", [[_image(448, 448)]])
    with torch.no_grad():
        embeds, vision = model.get_vllm_embedding(inputs)
        raw = model.get_input_embeddings()(inputs["input_ids"])
    start, end = inputs["image_bound"][0][0].tolist()
    torch.testing.assert_close(embeds[0, :start], raw[0, :start] * 12.0)
    torch.testing.assert_close(embeds[0, start:end], vision[0][0])


def test_greedy_generation_is_the_argmax_of_teacher_forced_logits_with_scale_emb():
    """4.0's generated tokens are embedded with scale_emb like the prompt's (as a forward over them does)."""
    from mcq.models.tiny import resolve_tiny

    path = resolve_tiny("tiny:4.0")
    model, processor = load_model(path, dtype="float32"), load_processor(path)
    inputs = processor("<|im_start|>user\n(<image>./</image>)\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
                       [[_image(448, 448)]])
    inputs.pop("image_sizes")
    new = model.generate(**inputs, tokenizer=processor.tokenizer, max_new_tokens=6, do_sample=False, num_beams=1)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], new], 1))
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    with torch.no_grad():
        logits = model(full, use_cache=False).logits[0]
    start = inputs["input_ids"].shape[1] - 1
    assert logits[start: start + new.shape[1]].argmax(-1).tolist() == new[0].tolist()


def test_outliers_give_a_few_norm_channels_a_large_gain(tmp_path):
    plain = load_model(make_tiny(tmp_path / "plain", TinySpec(version="4.5")), dtype="float32")
    spiky = load_model(make_tiny(tmp_path / "spiky", TinySpec(version="4.5", outliers=True)), dtype="float32")
    spiky_weights = dict(spiky.named_parameters())
    names = [n for n in dict(plain.named_parameters())
             if n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "layer_norm1.weight",
                            "layer_norm2.weight", "ln_kv.weight"))]
    assert len(names) == 2 * 2 + 2 * 2 + 1
    for name in names:
        gain = (spiky_weights[name] / dict(plain.named_parameters())[name]).abs()
        big = gain > 15
        assert big.sum() == 2, name  # two channels per norm ...
        assert torch.all((gain[big] >= 19.5) & (gain[big] <= 50.5)), name  # ... at 20-50x
        torch.testing.assert_close(gain[~big], torch.ones_like(gain[~big]))


def test_make_tiny_writes_the_bytes_save_pretrained_wrote(tmp_path):
    """The streaming shard writer gives small tiny models exactly the files `save_pretrained` of the whole model
    wrote (the bytes every test and documented number was measured on)."""
    from mcq.models.minicpmv import tiny
    from mcq.models.tiny import add_outliers

    ours = make_tiny(tmp_path / "ours", TinySpec(version="4.5", outliers=True))
    config = json.loads((ours / "config.json").read_text())
    torch.manual_seed(0)
    model = MiniCPMV(AutoConfig.from_pretrained(ours))
    add_outliers(model, 0, tiny.OUTLIER_NORMS)
    model = model.to(torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path / "theirs", max_shard_size=max(total // 3, 1 << 16))
    theirs = _digests(tmp_path / "theirs")
    assert len(theirs) == 6 and config["vocab_size"] == model.config.vocab_size
    assert {name: digest for name, digest in _digests(ours).items() if name in theirs} == theirs


def test_shard_writer_matches_safetensors(tmp_path):
    from safetensors.torch import save_file

    from mcq.models.shards import TensorEntry, plan_shards, write_shard

    tensors = {"b.weight": torch.randn(3, 5).to(torch.bfloat16), "a.bias": torch.randn(7),
               "c.idx": torch.arange(4, dtype=torch.int32), "a.weight": torch.randn(2, 2).half(),
               "d.scalar": torch.tensor(1.5)}
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    (shard,) = plan_shards([TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], 1 << 20)
    write_shard(tmp_path / "ours.safetensors", shard, ((e.name, tensors[e.name]) for e in shard.layout()))
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    # sharded as huggingface_hub shards a state dict in name order (what save_pretrained does)
    from huggingface_hub import split_torch_state_dict_into_shards

    for limit in (29, 40, 60):
        split = plan_shards([TensorEntry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], limit)
        hub = split_torch_state_dict_into_shards(dict(sorted(tensors.items())), max_shard_size=limit,
                                                 filename_pattern="model{suffix}.safetensors")
        assert {s.file: [e.name for e in s.entries] for s in split} == hub.filename_to_tensors
        assert len(split) > 1


def test_per_block_init_real_vocab(tmp_path, monkeypatch):
    """The per-block initialization real widths use (here at tiny widths): a loadable checkpoint, deterministic,
    each block from its own seed (layer 0 is the same at any depth), with the official 151,748-row tables."""
    from mcq.models.minicpmv import tiny
    from mcq.models.weights import CheckpointReader

    monkeypatch.setattr(tiny, "_per_block", lambda spec: True)
    two = make_tiny(tmp_path / "two", TinySpec(version="4.5", real_vocab=True, outliers=True))
    again = make_tiny(tmp_path / "again", TinySpec(version="4.5", real_vocab=True, outliers=True))
    three = make_tiny(tmp_path / "three", TinySpec(version="4.5", real_vocab=True, outliers=True, llm_layers=3))
    assert _digests(two) == _digests(again)
    model = load_model(two, dtype="float32")
    assert model.config.vocab_size == tiny.REAL_VOCAB_SIZE
    assert model.llm.model.embed_tokens.weight.shape[0] == model.llm.lm_head.weight.shape[0] == 151748
    assert len(load_processor(two).tokenizer) < 151748
    reader_two, reader_three = CheckpointReader(two), CheckpointReader(three)
    for name in ("llm.model.layers.0.mlp.down_proj.weight", "llm.model.embed_tokens.weight", "resampler.query"):
        assert torch.equal(reader_two.read_stored(name), reader_three.read_stored(name))
    # blocks differ from each other, and the outlier gains are there
    assert not torch.equal(reader_three.read_stored("llm.model.layers.1.mlp.up_proj.weight"),
                           reader_three.read_stored("llm.model.layers.2.mlp.up_proj.weight"))
    norm = reader_two.read_stored("llm.model.layers.1.input_layernorm.weight").float()
    assert norm.max() > 19 and (norm == 1).sum() == norm.numel() - 2
    with pytest.raises(McqError, match="--real-vocab"):
        make_tiny(tmp_path / "v26", TinySpec(version="2.6", real_vocab=True))
