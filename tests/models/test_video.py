"""Video input: timestamps → temporal ids on the 0.1 s grid, packed; frames from a folder or a video file."""

from __future__ import annotations

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
    av = pytest.importorskip("av")
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
