"""`encode_sample` on the tiny checkpoints: the batch `MiniCPMV.forward(data)` takes, and a real forward pass."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mcq.calibration import Sample, builtin_samples, encode_sample, load_samples
from mcq.errors import McqError
from mcq.models.loading import load_model, load_processor
from mcq.models.minicpmv.chat import render_conversation


@pytest.fixture(scope="module")
def smallest_per_kind() -> dict[str, Sample]:
    """The held-out sample of each kind with the fewest pixels, to keep the passes fast."""
    chosen: dict[str, Sample] = {}
    for sample in builtin_samples("heldout"):
        pixels = sum(i.width * i.height for i in sample.images)
        if sample.kind not in chosen or pixels < sum(i.width * i.height for i in chosen[sample.kind].images):
            chosen[sample.kind] = sample
    return chosen


@pytest.fixture(scope="module")
def processor(tiny_path):
    return load_processor(tiny_path)


def _assert_answer_tokens(processor, inputs, answer: str) -> None:
    """The masked tokens are one run at the end: the answer and the turn's closing tokens. A tokenizer may merge
    the answer's first character with the newline before it (4.0's does), and that token is the answer's too."""
    mask = inputs["answer_mask"][0]
    assert mask.any() and mask[mask.nonzero()[0, 0]:].all()
    decoded = processor.tokenizer.decode(inputs["input_ids"][0][mask])
    closing = processor.spec.terminators[0] + "\n"
    assert decoded.endswith(answer + closing) and len(decoded) - len(answer + closing) <= 1, decoded


def test_teacher_forced_text_continues_the_generation_prompt(processor, smallest_per_kind):
    """What calibration runs is what chat() generates from, followed by the answer."""
    for sample in smallest_per_kind.values():
        full, images = render_conversation(processor.tokenizer, processor.spec, sample.messages,
                                           add_generation_prompt=False)
        prompt, _ = render_conversation(processor.tokenizer, processor.spec, sample.messages[:-1])
        assert full.startswith(prompt) and full[len(prompt):].startswith(sample.messages[-1]["content"])
        assert len(images) == len(sample.images)


@pytest.mark.parametrize("kind", ["document", "table", "chart", "scene", "multi_image", "text"])
def test_images_and_text(processor, smallest_per_kind, kind):
    sample = smallest_per_kind[kind]
    inputs = encode_sample(processor, processor.spec, sample)
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and inputs["attention_mask"].equal(torch.ones_like(ids))
    assert inputs["answer_mask"].shape == ids.shape
    feature_slots = int((ids[0] == processor.tokens.unk_id).sum())
    bounds = inputs["image_bound"][0]
    assert feature_slots == int((bounds[:, 1] - bounds[:, 0]).sum()) if len(bounds) else feature_slots == 0
    assert feature_slots == len(inputs["pixel_values"][0]) * processor.image_processor.image_feature_size
    assert len(inputs["image_sizes"][0]) == len(sample.images)
    _assert_answer_tokens(processor, inputs, sample.messages[-1]["content"])


def test_video(processor, smallest_per_kind):
    sample = smallest_per_kind["video"]
    inputs = encode_sample(processor, processor.spec, sample, max_slice_nums=9)
    frames = len(sample.images)
    assert len(inputs["pixel_values"][0]) == frames  # one slice per frame, whatever max_slice_nums says
    assert processor.tokenizer.convert_tokens_to_ids("<image_id>") not in inputs["input_ids"][0].tolist()
    if processor.spec.temporal:  # 4.5: a group of frames shares one block of features
        assert inputs["temporal_ids"][0] == [list(group) for group in sample.temporal_ids]
        assert len(inputs["image_bound"][0]) == len(sample.temporal_ids)
    else:  # 2.6 / 4.0: the frames are a sequence of images
        assert len(inputs["image_bound"][0]) == frames
    _assert_answer_tokens(processor, inputs, sample.messages[-1]["content"])


def test_prompt_only_sample_ends_with_the_generation_prompt(processor, tmp_path):
    Image.new("RGB", (300, 200), (0, 120, 0)).save(tmp_path / "green.png")
    (sample,) = load_samples(tmp_path)
    inputs = encode_sample(processor, processor.spec, sample)
    assert not inputs["answer_mask"].any()
    text = processor.tokenizer.decode(inputs["input_ids"][0])
    prompt, _ = render_conversation(processor.tokenizer, processor.spec, sample.messages)
    assert text.endswith(prompt[-30:])


def test_max_length_cuts_the_answer_but_never_an_image(processor, smallest_per_kind):
    sample = smallest_per_kind["scene"]
    full = encode_sample(processor, processor.spec, sample)
    length = full["input_ids"].shape[1]
    answer = int(full["answer_mask"].sum())
    cut = encode_sample(processor, processor.spec, sample, max_length=length - answer // 2)
    assert cut["input_ids"].equal(full["input_ids"][:, :length - answer // 2])
    assert int(cut["answer_mask"].sum()) == answer - answer // 2
    assert all(a.equal(b) for a, b in zip(cut["image_bound"], full["image_bound"]))
    with pytest.raises(McqError, match=r"builtin/heldout/scene.*would cut an image placeholder"):
        encode_sample(processor, processor.spec, sample, max_length=int(full["image_bound"][0][-1, 0]))


def test_processor_of_another_version_is_refused(processor, smallest_per_kind):
    from mcq.models.minicpmv.versions import VERSIONS

    other = next(spec for version, spec in VERSIONS.items() if version != processor.version)
    with pytest.raises(McqError, match=f"processor is for MiniCPM-V {processor.version}"):
        encode_sample(processor, other, smallest_per_kind["text"])


@pytest.fixture
def one_thread():
    # The tiny model's matrices are a few kilobytes: a second thread costs more in synchronisation than it saves,
    # and on a busy two-core machine it turns a 50 ms pass into seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_forward_pass_on_every_kind(tiny45, smallest_per_kind, tmp_path, one_thread):
    model = load_model(tiny45, dtype="float32")
    processor = load_processor(tiny45)
    Image.new("RGB", (260, 180), (200, 30, 30)).save(tmp_path / "user.png")
    samples = [*smallest_per_kind.values(), *load_samples(tmp_path)]
    assert {s.kind for s in samples} == {"document", "table", "chart", "scene", "multi_image", "video", "text",
                                         "user"}
    for sample in samples:
        inputs = encode_sample(processor, model.spec, sample)
        with torch.no_grad():
            logits = model(inputs).logits
        assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size), sample.name
        assert torch.isfinite(logits).all(), sample.name
