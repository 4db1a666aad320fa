"""MiniCPM-V image processor: slicing, placeholders, pixel layout, temporal packing and config I/O.

Expected sizes and grids are computed by hand in the comments (official formulas), not by calling the code under test.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mcq.errors import McqError
from mcq.models.minicpmv.image_processing import MiniCPMVImageProcessor

UNK64 = "<unk>" * 64
SLICE = "<slice>" + UNK64 + "</slice>"


def solid(w, h, color=(10, 20, 30)):
    return Image.new("RGB", (w, h), color)


def gradient(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture()
def proc():
    return MiniCPMVImageProcessor()


def test_defaults(proc):
    assert (proc.max_slice_nums, proc.scale_resolution, proc.patch_size, proc.image_feature_size) == (9, 448, 14, 64)
    assert proc.slice_mode is True and proc.use_image_id is True and proc.version == 4.5
    assert proc.norm_mean == [0.5, 0.5, 0.5] and proc.norm_std == [0.5, 0.5, 0.5]


def test_ensure_divide_uses_round_half_to_even():
    # 21/14 = 1.5 -> round() gives 2 -> 28; 35/14 = 2.5 -> round() gives 2 (half to even) -> 28; never below p.
    assert MiniCPMVImageProcessor.ensure_divide(21, 14) == 28
    assert MiniCPMVImageProcessor.ensure_divide(35, 14) == 28
    assert MiniCPMVImageProcessor.ensure_divide(3, 14) == 14
    assert MiniCPMVImageProcessor.ensure_divide(547, 14) == 546


def test_square_1344_gives_3x3_grid(proc):
    # area 1344^2 / 448^2 = 9 -> multiple 9; candidates 8, 9 (10 > 9); [3, 3] has log error 0.
    img = gradient(1344, 1344)
    assert proc.get_sliced_grid(img.size, 9) == [3, 3]
    source, tiles, grid = proc.slice_image(img)
    assert grid == [3, 3] and source.size == (448, 448)
    assert len(tiles) == 3 and all(len(row) == 3 for row in tiles)
    assert all(t.size == (448, 448) for row in tiles for t in row)

    out = proc.preprocess([img])
    assert len(out["pixel_values"]) == 10
    assert out["tgt_sizes"].dtype == torch.int64
    assert out["tgt_sizes"].tolist() == [[32, 32]] * 10
    assert all(pv.shape == (3, 14, 32 * 32 * 14) and pv.dtype == torch.float32 for pv in out["pixel_values"])
    assert out["image_sizes"] == [(1344, 1344)]
    assert out["temporal_ids"] == [[-1]] * 10 and out["skip_image_idx"] == []

    expected = "<image_id>0</image_id><image>" + UNK64 + "</image>" + "\n".join([SLICE * 3] * 3)
    text = proc.get_slice_image_placeholder(img.size, image_idx=0)
    assert text == expected
    assert text.count("<unk>") == 640
    assert proc.get_slice_image_placeholder(img.size, image_idx=3, use_image_id=False).startswith("<image><unk>")
    assert proc.get_slice_image_placeholder(img.size, image_idx=3).startswith("<image_id>3</image_id><image>")


def test_tiles_are_cropped_row_major_from_refined_image(proc):
    # 1344x1344 -> refine size 1344x1344 (no resize change), so tile (r, c) is the crop at (c*448, r*448).
    img = gradient(1344, 1344, seed=1)
    _, tiles, _ = proc.slice_image(img)
    refined = np.asarray(img.resize((1344, 1344), resample=Image.Resampling.BICUBIC))
    for r in range(3):
        for c in range(3):
            want = refined[r * 448 : (r + 1) * 448, c * 448 : (c + 1) * 448]
            np.testing.assert_array_equal(np.asarray(tiles[r][c]), want)
    # And preprocess emits them source first, then row-major.
    out = proc.preprocess(img)
    tile_1_0 = proc.reshape_by_patch(proc.normalize(tiles[1][0]))
    assert torch.equal(out["pixel_values"][1 + 3], torch.from_numpy(tile_1_0))


def test_small_image_is_upscaled_without_grid(proc):
    # 300x200: area 60000 < 448^2 -> multiple 1 -> no grid. Upscale: r = 1.5, h = int(448/sqrt(1.5)) = int(365.79)
    # = 365, w = int(365*1.5) = int(547.5) = 547; snap: round(547/14 = 39.07) = 39 -> 546, round(365/14 = 26.07)
    # = 26 -> 364. So one slice of 546x364, tgt (26, 39).
    img = gradient(300, 200)
    assert proc.get_sliced_grid(img.size, 9) is None
    source, tiles, grid = proc.slice_image(img)
    assert grid is None and tiles == [] and source.size == (546, 364)
    out = proc.preprocess([img])
    assert out["tgt_sizes"].tolist() == [[26, 39]]
    assert out["pixel_values"][0].shape == (3, 14, 26 * 39 * 14)
    assert proc.get_slice_image_placeholder(img.size, image_idx=1) == "<image_id>1</image_id><image>" + UNK64 + "</image>"


def test_find_best_resize_truncates_height_then_derives_width(proc):
    # 100x103 (upscaled, no grid): r = 100/103 = 0.97087, h = int(448/sqrt(r)) = int(454.67) = 454,
    # w = int(454*r) = int(440.78) = 440 -> snap round(31.43) = 31 -> 434, round(32.43) = 32 -> 448.
    # Without the int() truncations the width would be 441.43 -> round(31.53) = 32 -> 448.
    assert proc.find_best_resize((100, 103), 448, 14, allow_upscale=True) == (434, 448)
    assert proc.preprocess([gradient(100, 103)])["tgt_sizes"].tolist() == [[32, 31]]
    # 100x145: r = 0.68966, h = int(539.46) = 539, w = int(539*r) = int(371.72) = 371. 371/14 = 26.5 and
    # 539/14 = 38.5 exactly: Python round() goes to even -> 26*14 = 364, 38*14 = 532. (Rounding half up would give
    # 378x546; keeping w = 371.72 would give round(26.55) = 27 -> 378.)
    assert proc.find_best_resize((100, 145), 448, 14, allow_upscale=True) == (364, 532)
    # No upscale and small area: only snapped. 300x200 -> round(21.43) = 21 -> 294, round(14.29) = 14 -> 196.
    assert proc.find_best_resize((300, 200), 448, 14) == (294, 196)


def test_wide_image_grid(proc):
    # 2000x500: area 1e6/200704 = 4.98 -> multiple 5; candidates 4, 5, 6 ->
    # [1,4],[2,2],[4,1],[1,5],[5,1],[1,6],[2,3],[3,2],[6,1]. log(2000/500) = log 4, so [4,1] (error 0) wins.
    # Source: r = 4, h = int(448/2) = 224, w = 896 -> 896x224, tgt (16, 64).
    # Refine: ensure_divide(2000, 4) = 2000, ensure_divide(500, 1) = 500; cell 500x500 -> upscale r = 1 -> 448x448;
    # refine 1792x448 -> 4 tiles of 448x448.
    img = gradient(2000, 500)
    assert proc.get_sliced_grid(img.size, 9) == [4, 1]
    out = proc.preprocess([img])
    assert out["tgt_sizes"].tolist() == [[16, 64]] + [[32, 32]] * 4
    expected = "<image_id>0</image_id><image>" + UNK64 + "</image>" + SLICE * 4
    assert proc.get_slice_image_placeholder(img.size) == expected


def test_log_ratio_rule_non_trivial(proc):
    # 1000x600: area 600000/200704 = 2.99 -> multiple 3; candidates 2, 3, 4 ->
    # [1,2],[2,1],[1,3],[3,1],[1,4],[2,2],[4,1]. log(1000/600) = 0.511: errors [2,1] 0.182, [2,2] 0.511,
    # [3,1] 0.588, [1,2] 1.204 ... -> [2,1].
    # Refine: ensure_divide(1000, 2) = 1000, ensure_divide(600, 1) = 600; cell 500x600, r = 0.8333,
    # h = int(448/0.91287) = int(490.76) = 490, w = int(490*0.8333) = 408 -> snap 406 (29*14) x 490 (35*14):
    # tiles 406x490, tgt (35, 29). Source: r = 1.6667, h = int(347.02) = 347, w = int(578.33) = 578
    # -> snap round(41.29) = 41 -> 574, round(24.79) = 25 -> 350: tgt (25, 41).
    img = gradient(1000, 600)
    assert proc.get_sliced_grid(img.size, 9) == [2, 1]
    assert proc.get_refine_size(img.size, [2, 1], 448, 14, allow_upscale=True) == (812, 490)
    out = proc.preprocess([img])
    assert out["tgt_sizes"].tolist() == [[25, 41], [35, 29], [35, 29]]


def test_tie_goes_to_first_candidate(proc):
    # 500x500: area 1.25 -> multiple 2; candidates 2, 3 -> [1,2],[2,1],[1,3],[3,1]. [1,2] and [2,1] both have
    # error log 2; the first ([1, 2]: 1 col, 2 rows) wins. Refine: cell 500x250, r = 2, h = int(316.78) = 316,
    # w = 632 -> snap 630 (45*14) x 322 (23*14): tiles tgt (23, 45). Source 448x448.
    img = gradient(500, 500)
    assert proc.get_sliced_grid(img.size, 9) == [1, 2]
    out = proc.preprocess([img])
    assert out["tgt_sizes"].tolist() == [[32, 32], [23, 45], [23, 45]]
    expected = "<image_id>0</image_id><image>" + UNK64 + "</image>" + SLICE + "\n" + SLICE
    assert proc.get_slice_image_placeholder(img.size) == expected


def test_max_slice_nums_override(proc):
    img = gradient(1344, 1344)
    assert proc.get_sliced_grid(img.size, 1) is None
    out = proc.preprocess([img], max_slice_nums=1)
    assert out["tgt_sizes"].tolist() == [[32, 32]]
    assert proc.get_slice_image_placeholder(img.size, max_slice_nums=1).count("<unk>") == 64
    with pytest.raises(McqError):
        proc.preprocess([img], max_slice_nums=0)


def test_reshape_by_patch_matches_unfold(proc):
    rng = np.random.default_rng(3)
    chw = rng.standard_normal((3, 28, 42)).astype(np.float32)  # 2x3 patches
    got = torch.from_numpy(proc.reshape_by_patch(chw))
    x = torch.from_numpy(chw)
    ref = F.unfold(x.unsqueeze(0), (14, 14), stride=(14, 14))[0]  # [3*14*14, 6]
    ref = ref.reshape(3, 14, 14, -1).permute(0, 1, 3, 2).reshape(3, 14, -1)
    assert got.shape == (3, 14, 6 * 14)
    assert torch.equal(got, ref)
    # Patch n = 4 is row 1, col 1: its pixel (i, j) sits at [:, i, 4*14 + j].
    assert torch.equal(got[:, :, 56:70], x[:, 14:28, 14:28])


def test_normalisation_range(proc):
    white = proc.normalize(solid(28, 14, (255, 255, 255)))
    black = proc.normalize(solid(28, 14, (0, 0, 0)))
    assert white.shape == (3, 14, 28) and white.dtype == np.float32
    assert np.all(white == 1.0) and np.all(black == -1.0)
    # Channel order is RGB and CHW: a pure-red pixel is (1, -1, -1).
    red = proc.normalize(solid(14, 14, (255, 0, 0)))
    assert red[:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    # Matches x/255 then (x - .5)/.5 in float32.
    img = gradient(14, 14)
    want = (np.asarray(img).astype(np.float32) / 255 - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(proc.normalize(img), want.transpose(2, 0, 1))
    # Every byte of every channel, with per-channel statistics (the lookup table is per channel).
    imagenet = MiniCPMVImageProcessor(norm_mean=[0.485, 0.456, 0.406], norm_std=[0.229, 0.224, 0.225])
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    every = np.stack([levels, levels[::-1], levels.T], axis=-1)
    want = (every.astype(np.float32) / 255 - np.asarray(imagenet.norm_mean, dtype=np.float32)) \
        / np.asarray(imagenet.norm_std, dtype=np.float32)
    np.testing.assert_array_equal(imagenet.normalize(Image.fromarray(every)), want.transpose(2, 0, 1))


def test_non_rgb_and_bad_inputs(proc):
    out = proc.preprocess([Image.new("L", (448, 448), 255)])
    assert torch.all(out["pixel_values"][0] == 1.0)
    with pytest.raises(McqError, match="PIL"):
        proc.preprocess([np.zeros((4, 4, 3), dtype=np.uint8)])


def test_temporal_one_group():
    proc = MiniCPMVImageProcessor(use_image_id=False)
    frames = [solid(448, 448, (i * 40, 0, 0)) for i in range(6)]
    out = proc.preprocess(frames, max_slice_nums=1, temporal_ids=[[0, 1, 2, 3, 4, 5]])
    assert len(out["pixel_values"]) == 6
    assert out["tgt_sizes"].tolist() == [[32, 32]] * 6
    assert out["temporal_ids"] == [[0, 1, 2, 3, 4, 5]]
    assert out["skip_image_idx"] == [1, 2, 3, 4, 5]
    # Frames keep their order inside the group.
    for i, pv in enumerate(out["pixel_values"]):
        assert float(pv[0, 0, 0]) == pytest.approx((i * 40 / 255 - 0.5) / 0.5)


def test_temporal_two_groups(proc):
    frames = [solid(448, 448) for _ in range(6)]
    out = proc.preprocess(frames, max_slice_nums=1, temporal_ids=[[0, 1, 2], [3, 4, 5]])
    assert len(out["pixel_values"]) == 6
    assert out["temporal_ids"] == [[0, 1, 2], [3, 4, 5]]
    assert out["skip_image_idx"] == [1, 2, 4, 5]
    # Unequal groups: [[0, 1, 2], [5, 6]] over 5 frames.
    out = proc.preprocess(frames[:5], max_slice_nums=1, temporal_ids=[[0, 1, 2], [5, 6]])
    assert out["temporal_ids"] == [[0, 1, 2], [5, 6]] and out["skip_image_idx"] == [1, 2, 4]


def test_temporal_interleaves_slices_of_a_group(proc):
    # Two 500x500 frames, grid [1, 2] -> 3 slices each. Order: f0 src, f1 src, f0 tile0, f1 tile0, f0 tile1, f1 tile1.
    frames = [solid(500, 500, (255, 255, 255)), solid(500, 500, (0, 0, 0))]
    out = proc.preprocess(frames, temporal_ids=[[7, 8]])
    assert [float(pv[0, 0, 0]) for pv in out["pixel_values"]] == [1.0, -1.0] * 3
    assert out["tgt_sizes"].tolist() == [[32, 32], [32, 32], [23, 45], [23, 45], [23, 45], [23, 45]]
    assert out["temporal_ids"] == [[7, 8]] * 3
    assert out["skip_image_idx"] == [1]


def test_temporal_validation(proc):
    frames = [solid(448, 448) for _ in range(3)]
    with pytest.raises(McqError, match="3 images"):
        proc.preprocess(frames, temporal_ids=[[0, 1]])
    with pytest.raises(McqError, match="temporal_ids"):
        proc.preprocess(frames, temporal_ids=[[0, 1], []])
    with pytest.raises(McqError, match="different numbers of slices"):
        proc.preprocess([solid(448, 448), solid(1344, 1344)], temporal_ids=[[0, 1]])
    # A flat list of ints is a single group (as the official processor accepts it).
    out = proc.preprocess(frames, max_slice_nums=1, temporal_ids=[0, 1, 2])
    assert out["temporal_ids"] == [[0, 1, 2]] and out["skip_image_idx"] == [1, 2]


def test_save_load_round_trip(tmp_path):
    proc = MiniCPMVImageProcessor(max_slice_nums=4, use_image_id=False, version=2.6)
    first = proc.save_pretrained(tmp_path / "a")
    data = json.loads(first.read_text())
    assert data["image_processor_type"] == "MiniCPMVImageProcessor"
    assert data["processor_class"] == "MiniCPMVProcessor"
    assert list(data) == sorted(data) and "auto_map" not in data
    loaded = MiniCPMVImageProcessor.from_pretrained(tmp_path / "a")
    assert loaded.max_slice_nums == 4 and loaded.use_image_id is False and loaded.version == 2.6
    second = loaded.save_pretrained(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()


def test_from_pretrained_official_layout_ignores_unknown_keys(tmp_path):
    official = {
        "image_processor_type": "MiniCPMVImageProcessor",
        "auto_map": {"AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
        "processor_class": "MiniCPMVProcessor",
        "max_slice_nums": 9,
        "scale_resolution": 448,
        "patch_size": 14,
        "use_image_id": True,
        "image_feature_size": 64,
        "im_start": "<image>",
        "im_end": "</image>",
        "slice_start": "<slice>",
        "slice_end": "</slice>",
        "unk": "<unk>",
        "im_id_start": "<image_id>",
        "im_id_end": "</image_id>",
        "slice_mode": True,
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
        "version": 4.5,
        "something_new": 1,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(official))
    loaded = MiniCPMVImageProcessor.from_pretrained(tmp_path)
    expected = {k: v for k, v in official.items() if k not in ("auto_map", "something_new")}
    assert loaded.to_dict() == expected


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(McqError, match="preprocessor_config.json"):
        MiniCPMVImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(McqError, match="preprocessor_config.json"):
        MiniCPMVImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"patch_size": 0}')
    with pytest.raises(McqError, match="patch_size"):
        MiniCPMVImageProcessor.from_pretrained(tmp_path)
