"""User calibration data: JSONL + image folders, plain image folders, saved datasets folders, and their errors."""

from __future__ import annotations

import json

import av
import datasets
import numpy as np
import pytest
from PIL import Image

from mcq.calibration.user_data import GENERIC_QUESTION, load_user_samples, read_user_data
from mcq.errors import McqError


def _picture(path, width, height, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((height, width, 3), value, np.uint8)
    pixels[:, : width // 2, 0] = 255 - value  # not a flat colour, so a wrong crop or channel order would show
    Image.fromarray(pixels).save(path)
    return np.asarray(Image.open(path).convert("RGB"))


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records),
                    encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    pixels = {name: _picture(root / name, 64 + 8 * i, 48, 30 * i) for i, name in
              enumerate(["a.png", "sub/b.jpg", "c.png", "d.png", "e.png"])}
    for i in range(4):
        _picture(root / "clip" / f"{i:03d}.png", 32, 32, 50 * i)
    records = [
        {"id": "llava", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Two colours."}]},
        {"images": ["sub/b.jpg", "c.png"], "messages": [
            {"role": "user", "content": "Compare <image> with <image> please."},
            {"role": "assistant", "content": "They differ."},
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Different values."}]},
        {"image": {"<image_00>": "d.png", "<image_01>": "e.png"}, "conversations": [
            {"role": "user", "content": "<image_01> then <image_00>: which is brighter?"},
            {"role": "assistant", "content": "The first."}]},
        {"images": ["a.png", "c.png"], "messages": [{"role": "user", "content": "Describe them."},
                                                    {"role": "assistant", "content": "Two pictures."}]},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}],
         "images": ["e.png"]},
        "",
        {"messages": [{"role": "user", "content": "你好，请介绍一下你自己。"},
                      {"role": "assistant", "content": "我是助手。"}]},
        {"frames": "clip", "fps": 2, "packing": 2, "messages": [
            {"role": "user", "content": "What happens in <video>?"},
            {"role": "assistant", "content": "It brightens."}]},
    ]
    _write_jsonl(root / "train.jsonl", records)
    return root, pixels


def _content(sample, turn):
    content = sample.messages[turn]["content"]
    return [c if isinstance(c, str) else "IMG" for c in ([content] if isinstance(content, str) else content)]


def test_jsonl_folder_round_trip(folder):
    root, pixels = folder
    samples = load_user_samples(root)
    assert [s.name for s in samples] == [f"user/train.jsonl:{n}" for n in (1, 2, 3, 4, 5, 7, 8)]
    assert all(s.kind == "user" for s in samples)
    llava, pair, named, unmarked, prompt_only, chinese, clip = samples
    assert _content(llava, 0) == ["IMG", "What is shown?"] and llava.messages[1] == {"role": "assistant",
                                                                                    "content": "Two colours."}
    assert np.array_equal(np.asarray(llava.images[0]), pixels["a.png"])
    assert _content(pair, 0) == ["Compare", "IMG", "with", "IMG", "please."] and len(pair.messages) == 4
    assert [np.asarray(i).tolist() for i in pair.images] == [pixels["sub/b.jpg"].tolist(), pixels["c.png"].tolist()]
    assert _content(named, 0) == ["IMG", "then", "IMG", ": which is brighter?"]
    assert [np.asarray(i).tolist() for i in named.images] == [pixels["e.png"].tolist(), pixels["d.png"].tolist()]
    assert _content(unmarked, 0) == ["IMG", "IMG", "Describe them."]  # no marker: images first (LLaVA)
    assert not prompt_only.has_answer and _content(prompt_only, 0) == ["IMG", "And this?"]
    assert chinese.messages[0]["content"] == "你好，请介绍一下你自己。" and not chinese.images
    assert clip.is_video and clip.temporal_ids == ((0, 5), (10, 15)) and len(clip.images) == 4
    assert _content(clip, 0) == ["What happens in", "IMG", "IMG", "IMG", "IMG", "?"]
    assert all(s.has_answer for s in samples if s is not prompt_only)


def test_jsonl_file_given_directly_equals_the_folder(folder):
    root, _ = folder
    direct = load_user_samples(root / "train.jsonl")
    found = load_user_samples(root)
    assert [s.name for s in direct] == [s.name for s in found]
    assert [s.texts for s in direct] == [s.texts for s in found]
    data = read_user_data(root)
    assert len(data) == 7 and [s.name for s in data.load([6, 0])] == ["user/train.jsonl:8", "user/train.jsonl:1"]


def test_video_file_line(tmp_path):
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10, np.uint8),
                                                                   format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    _write_jsonl(tmp_path / "v.jsonl", [{"video": "clip.mp4", "fps": 2, "messages": [
        {"role": "user", "content": "Describe."}, {"role": "assistant", "content": "It gets brighter."}]}])
    (sample,) = load_user_samples(tmp_path / "v.jsonl")
    assert sample.temporal_ids == ((0, 5, 10), (15,)) and len(sample.images) == 4
    assert _content(sample, 0)[:4] == ["IMG"] * 4 and _content(sample, 0)[-1] == "Describe."


def test_image_folder_without_jsonl_gives_prompt_only_samples(tmp_path):
    _picture(tmp_path / "z.png", 40, 30, 10)
    _picture(tmp_path / "nested" / "a.jpg", 30, 40, 90)
    _picture(tmp_path / ".cache" / "skip.png", 30, 40, 90)
    (tmp_path / "notes.txt").write_text("not an image")
    samples = load_user_samples(tmp_path)
    assert [s.name for s in samples] == ["user/nested/a.jpg", "user/z.png"]
    for sample in samples:
        assert not sample.has_answer and len(sample.messages) == 1
        assert _content(sample, 0) == ["IMG", GENERIC_QUESTION]


def _save_dataset(path, columns, dict_of_splits=False):
    dataset = datasets.Dataset.from_dict(columns)
    (datasets.DatasetDict({"train": dataset}) if dict_of_splits else dataset).save_to_disk(str(path))
    return path


def test_datasets_folder_question_answer_and_messages(tmp_path):
    red, blue = Image.new("RGB", (40, 30), (200, 0, 0)), Image.new("RGB", (30, 40), (0, 0, 200))
    qa = _save_dataset(tmp_path / "qa", {"image": [red, blue], "question": ["What colour?", "<image>\nAnd here?"],
                                         "answer": ["Red.", "Blue."]})
    first, second = load_user_samples(qa)
    assert first.name == "user/qa[0]" and _content(first, 0) == ["IMG", "What colour?"]
    assert first.images[0].getpixel((0, 0)) == (200, 0, 0) and second.messages[1]["content"] == "Blue."
    chat = _save_dataset(tmp_path / "chat", {
        "images": [[red, blue]],
        "messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "vs"},
                                                   {"type": "image"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Red vs blue."}]}]],
    }, dict_of_splits=True)
    (sample,) = load_user_samples(chat)
    assert _content(sample, 0) == ["IMG", "vs", "IMG"] and sample.messages[1]["content"] == "Red vs blue."
    assert [i.getpixel((0, 0)) for i in sample.images] == [(200, 0, 0), (0, 0, 200)]


def test_datasets_folder_errors(tmp_path):
    no_image = _save_dataset(tmp_path / "noimg", {"question": ["q"], "answer": ["a"]})
    with pytest.raises(McqError, match=r"no \"image\" or \"images\" column \(columns: question, answer\)"):
        read_user_data(no_image)
    no_text = _save_dataset(tmp_path / "notext", {"image": [Image.new("RGB", (8, 8))], "caption": ["c"]})
    with pytest.raises(McqError, match="needs a \"messages\""):
        read_user_data(no_text)
    mismatch = _save_dataset(tmp_path / "mismatch", {"image": [Image.new("RGB", (8, 8))],
                                                     "question": ["<image> and <image>?"], "answer": ["a"]})
    with pytest.raises(McqError, match=r"mismatch row 0: the text has 2 image markers but the line names 1"):
        load_user_samples(mismatch)


def _one_line(tmp_path, record, name="data.jsonl"):
    return _write_jsonl(tmp_path / name, [record])


GOOD = {"image": "a.png", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}


@pytest.mark.parametrize("record, message", [
    ({**GOOD, "image": "missing.png"}, r"data.jsonl:1: image missing.png not found"),
    ({**GOOD, "messages": [{"role": "system", "content": "be brief"}, *GOOD["messages"]]}, "system turn"),
    ({**GOOD, "messages": GOOD["messages"][::-1]}, "first turn must be the user's"),
    ({**GOOD, "messages": [{"role": "robot", "content": "x"}]}, r"turn 1 has role 'robot'"),
    ({**GOOD, "messages": [{"role": "user", "content": "<image> <image>"}]}, "2 image markers but the line names 1"),
    ({**GOOD, "messages": [{"role": "user", "content": "(<image>./</image>) hi"}]}, r"mark images with <image>"),
    ({**GOOD, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "turn 2 is empty"),
    ({**GOOD, "messages": [{"role": "user", "content": 3}]}, "turn 1 needs content"),
    ({k: v for k, v in GOOD.items() if k != "messages"}, "needs exactly one of \"messages\" or \"conversations\""),
    ({**GOOD, "conversations": GOOD["messages"]}, "found 2"),
    ({**GOOD, "frames": "clip"}, "images or a video, not both"),
    ({"frames": "nowhere", "messages": GOOD["messages"]}, "frames folder nowhere not found"),
    ({"video": "clip.mp4", "messages": GOOD["messages"]}, "video clip.mp4 not found"),
    ({**GOOD, "fps": 2}, "\"fps\" is for video"),
    ({"frames": "clip", "fps": 0, "messages": GOOD["messages"]}, "\"fps\" must be a positive number"),
    ({"frames": "clip", "packing": 9, "messages": GOOD["messages"]}, "\"packing\" must be an integer from 1 to 6"),
    ({"messages": [{"role": "user", "content": "<video>"}]}, "names no \"video\" or \"frames\""),
    ({**GOOD, "images": ["a.png"]}, "give \"images\" or \"image\", not both"),
    ({"image": {"<image_00>": "a.png", "<image_01>": "a.png"},
      "messages": [{"role": "user", "content": "<image_00> hi"}]}, "every key must appear"),
    ({**GOOD, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "has an item"),
])
def test_bad_lines_name_the_file_line_and_problem(tmp_path, record, message):
    _picture(tmp_path / "a.png", 16, 16, 0)
    _picture(tmp_path / "clip" / "0.png", 16, 16, 0)
    _one_line(tmp_path, record)
    with pytest.raises(McqError, match=message):
        read_user_data(tmp_path / "data.jsonl")


def test_source_errors(tmp_path):
    with pytest.raises(McqError, match="does not exist"):
        read_user_data(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(McqError, match="holds no .jsonl file and no images"):
        read_user_data(empty)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(McqError, match="not .jsonl"):
        read_user_data(tmp_path / "notes.txt")
    blank = _write_jsonl(tmp_path / "blank.jsonl", ["", "   "])
    with pytest.raises(McqError, match="holds no samples"):
        read_user_data(blank)
    broken = _write_jsonl(tmp_path / "broken.jsonl", [{"messages": GOOD["messages"]}, '{"messages": [}'])
    with pytest.raises(McqError, match=r"broken.jsonl:2: not valid JSON: .* at column 15"):
        read_user_data(broken)
    _write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(McqError, match="list.jsonl:1: each line must be a JSON object, got list"):
        read_user_data(tmp_path / "list.jsonl")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        _write_jsonl(two / name, [{"messages": GOOD["messages"]}])
    with pytest.raises(McqError, match=r"2 .jsonl files \(a.jsonl, b.jsonl\)"):
        read_user_data(two)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"messages": "caf\xe9"}\n')
    with pytest.raises(McqError, match="not UTF-8"):
        read_user_data(tmp_path / "latin1.jsonl")


def test_unreadable_image_is_named_when_loaded(tmp_path):
    (tmp_path / "a.png").write_bytes(b"definitely not a png")
    data = read_user_data(_one_line(tmp_path, GOOD))  # reading checks the file exists; decoding is on load
    with pytest.raises(McqError, match=r"cannot read image .*a\.png"):
        data.load()
    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(McqError, match="broken.jpg"):
        load_user_samples(folder)
