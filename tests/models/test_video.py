"""Video input: timestamps → temporal ids on the 0.1 s grid, packed; frames from a folder or a video file."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from mcq.errors import McqError
from mcq.models.minicpmv.video import frames_from_dir, frames_from_video, temporal_ids


def test_temporal_ids_snap_to_tenths_and_pack():
    assert temporal_ids([0.0, 0.5, 1.04, 1.56, 2.0], packing=2) == [[0, 5], [10, 16], [20]]
    assert temporal_ids([0.0, 1.0, 2.0], packing=3) == [[0, 10, 20]]
    with pytest.raises(McqError, match="between 1 and 6"):
        temporal_ids([0.0], packing=7)


def test_frames_from_dir_in_name_order(tmp_path):
    for name, value in (("b.png", 20), ("a.png", 10), ("notes.txt", None)):
        if value is None:
            (tmp_path / name).write_text("skip me")
        else:
            Image.new("RGB", (32, 32), (value, 0, 0)).save(tmp_path / name)
    frames, stamps = frames_from_dir(tmp_path, fps=4)
    assert [f.getpixel((0, 0))[0] for f in frames] == [10, 20] and stamps == [0.0, 0.25]
    with pytest.raises(McqError, match="no image files"):
        frames_from_dir(_empty(tmp_path), fps=1)


def _empty(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty


def test_frames_from_video_file(tmp_path):
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(30):  # 3 s at 10 fps, brightness rising
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 8, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames, stamps = frames_from_video(path, fps=2)
    assert stamps == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert frames[0].size == (64, 48)
    brightness = [np.asarray(f).mean() for f in frames]
    assert brightness == sorted(brightness)
    with pytest.raises(McqError, match="does not exist"):
        frames_from_video(tmp_path / "none.mp4", fps=1)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(McqError, match="cannot decode"):
        frames_from_video(tmp_path / "bad.mp4", fps=1)


# --- video prompts: the official placeholder rule ------------------------------------------------------------------


def _official_video_text(text: str, group_sizes: tuple[int, ...], query_num: int) -> str:
    """The prompt the official 4.5 processor builds (processing_minicpmv.py, `_convert_images_texts_to_inputs`),
    written out: for image marker i, a frame that is not the first of its temporal group gets no placeholder and
    the text chunk before it is stripped; any other frame keeps that chunk as it is, followed by its placeholder
    (one slice per frame, no image id); the text after the last marker is appended unchanged."""
    firsts = {sum(group_sizes[:g]) for g in range(len(group_sizes))}
    chunks = text.split("(<image>./</image>)")
    out = ""
    for i in range(len(chunks) - 1):
        if i in firsts:
            out += chunks[i] + "<image>" + "<unk>" * query_num + "</image>"
        else:
            out += chunks[i].strip()
    return out + chunks[-1]


VIDEO_GROUPS = [(1, 1), (2, 2), (3, 3), (4, 4), (3, 1), (4, 2, 1), (1, 4, 3)]


@pytest.mark.parametrize("group_sizes", VIDEO_GROUPS, ids=lambda sizes: "+".join(map(str, sizes)))
def test_video_prompts_follow_the_official_placeholder_rule(tiny45, group_sizes):
    """Every path that builds a video prompt (chat, calibration and eval encoding) gives the official ids."""
    import json

    from mcq.calibration.encode import encode_sample
    from mcq.calibration.samples import Sample
    from mcq.models.loading import load_processor, model_spec
    from mcq.models.minicpmv.chat import build_chat_inputs, render_conversation

    processor = load_processor(tiny45)
    _, config, spec = model_spec(tiny45)
    frames = [Image.new("RGB", (280, 224), (40 * i, 255 - 30 * i, 90)) for i in range(sum(group_sizes))]
    stamps = iter(range(len(frames)))
    groups = [[next(stamps) for _ in range(size)] for size in group_sizes]
    turns = [{"role": "user", "content": [*frames, "What happens in this clip?"]}]
    text, _ = render_conversation(processor.tokenizer, spec, turns, add_generation_prompt=True)
    query_num = json.loads((tiny45 / "config.json").read_text())["query_num"]
    expected = processor.tokenizer.encode(_official_video_text(text, group_sizes, query_num),
                                          add_special_tokens=False)

    chat_inputs, _ = build_chat_inputs(_ChatModel(config, spec), processor, image=None, msgs=turns,
                                       system_prompt="", max_inp_length=8192, max_slice_nums=1, use_image_id=False,
                                       temporal_ids=groups, enable_thinking=False)
    assert chat_inputs["input_ids"][0].tolist() == expected
    # Calibration and the eval set encode samples with encode_sample (here: the prompt, with no answer yet).
    sample = Sample(name="video", kind="video", messages=tuple(turns), temporal_ids=tuple(map(tuple, groups)))
    assert encode_sample(processor, spec, sample)["input_ids"][0].tolist() == expected
    # One feature block per temporal group.
    assert len(chat_inputs["image_bound"][0]) == len(group_sizes)


class _ChatModel:
    """What build_chat_inputs reads from the model: its config and version."""

    def __init__(self, config, spec):
        self.config, self.spec = config, spec
