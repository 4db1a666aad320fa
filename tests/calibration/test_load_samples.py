"""`load_samples`: built-in or user data, the held-out split of user data, subsets that keep every kind; `describe`."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mcq.calibration import builtin_samples, describe, heldout_indices, load_samples, select_subset
from mcq.errors import McqError


def _jsonl(tmp_path, count):
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "p.png")
    lines = [{"image": "p.png", "messages": [{"role": "user", "content": f"question {i}"},
                                             {"role": "assistant", "content": f"answer {i}"}]} for i in range(count)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_builtin_source_and_subsets():
    default = load_samples()
    assert len(default) == 64 and all(s.name.startswith("builtin/calibration/") for s in default)
    full = builtin_samples("heldout")  # the smaller split keeps this test fast; the logic is the same
    assert [s.name for s in load_samples("builtin", "heldout")] == [s.name for s in full]
    subset = load_samples(None, "heldout", num_samples=9, seed=2)
    assert len(subset) == 9 and {s.kind for s in subset} == {s.kind for s in full}
    assert [s.name for s in subset] == [s.name for s in load_samples(None, "heldout", num_samples=9, seed=2)]
    order = [s.name for s in full]
    assert [order.index(s.name) for s in subset] == sorted(order.index(s.name) for s in subset)
    assert [s.name for s in load_samples(None, "heldout", num_samples=9, seed=3)] != [s.name for s in subset]


def test_select_subset_keeps_every_kind_and_the_mix():
    kinds = ["a"] * 30 + ["b"] * 10 + ["c"] * 2 + ["d"]
    picked = select_subset(kinds, 12, seed=0)
    counts = {k: sum(kinds[i] == k for i in picked) for k in "abcd"}
    # One each, then the other 8 shared 29:9:1:0 (5.95, 1.85, 0.21, 0 → largest remainders round up a and b).
    assert counts == {"a": 7, "b": 3, "c": 1, "d": 1}
    assert sorted(picked) == picked and len(set(picked)) == 12
    assert {kinds[i] for i in select_subset(kinds, 2, seed=0)} == {"a", "b"}  # too few for every kind
    assert select_subset(kinds, None, seed=0) == list(range(len(kinds)))
    assert select_subset(kinds, len(kinds), seed=4) == list(range(len(kinds)))


def test_user_data_heldout_is_a_fixed_eighth_disjoint_from_calibration(tmp_path):
    source = _jsonl(tmp_path, 17)
    calibration = load_samples(source)
    heldout = load_samples(str(source), "heldout", seed=9)
    assert len(heldout) == 2 and len(calibration) == 15
    names = {s.name for s in calibration}
    assert names.isdisjoint(s.name for s in heldout)
    assert names | {s.name for s in heldout} == {f"user/data.jsonl:{n}" for n in range(1, 18)}
    assert [s.name for s in load_samples(source, "heldout", seed=0)] == [s.name for s in heldout]  # seed-free
    subset = load_samples(source, num_samples=4, seed=1)
    assert len(subset) == 4 and {s.name for s in subset} <= names


def test_small_user_data_splits(tmp_path):
    assert heldout_indices(["only"]) == [] and len(heldout_indices(["a", "b"])) == 1
    single = _jsonl(tmp_path, 1)
    assert len(load_samples(single)) == 1
    with pytest.raises(McqError, match="held-out split needs at least 2"):
        load_samples(single, "heldout")


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, "unknown split 'test'"),
    ({"num_samples": 0}, "positive integer"),
    ({"split": "heldout", "num_samples": 25}, "asked for 25 samples but the built-in heldout set has 24"),
    ({"source": "no/such/folder"}, "does not exist"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(McqError, match=message):
        load_samples(**kwargs)


def test_describe_counts_kinds_images_and_frames(tmp_path):
    samples = builtin_samples("heldout")
    summary = describe(samples)
    assert summary["samples"] == 24 and sum(summary["kinds"].values()) == 24
    assert summary["kinds"]["video"] == summary["videos"] == 3
    assert summary["video_frames"] == sum(len(s.images) for s in samples if s.kind == "video")
    assert summary["images"] == sum(len(s.images) for s in samples if s.kind != "video")
    assert summary["prompt_only"] == 0 and summary["turns"] >= 48
    Image.new("RGB", (20, 20)).save(tmp_path / "x.png")
    assert describe(load_samples(tmp_path)) == {"samples": 1, "kinds": {"user": 1}, "images": 1, "videos": 0,
                                                "video_frames": 0, "turns": 1, "prompt_only": 1}
