"""The built-in synthetic set: deterministic, split-disjoint, every kind, answers that match the pictures."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mcq.calibration import synthetic
from mcq.calibration.synthetic import COLORS, PLACES, SHAPES, builtin_samples, draw_text, text_width, wide_glyph
from mcq.errors import McqError

BUILTIN_KINDS = {"document", "table", "chart", "scene", "multi_image", "video", "text"}


@pytest.fixture(scope="module")
def calibration():
    return builtin_samples("calibration")


@pytest.fixture(scope="module")
def heldout():
    return builtin_samples("heldout")


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()


def _conversation(sample) -> str:
    return "\n".join(f"{turn['role']}: {text}" for turn in sample.messages
                     for text in ([turn["content"]] if isinstance(turn["content"], str) else turn["content"])
                     if isinstance(text, str))


def test_same_seed_gives_identical_samples_and_another_seed_does_not(calibration):
    again = builtin_samples("calibration", seed=0)
    assert [s.name for s in again] == [s.name for s in calibration]
    for first, second in zip(calibration, again):
        assert first.kind == second.kind and first.temporal_ids == second.temporal_ids
        assert _conversation(first) == _conversation(second)
        assert [_digest(i) for i in first.images] == [_digest(i) for i in second.images]
    other_seed = builtin_samples("heldout", seed=1)
    assert {_digest(i) for s in other_seed for i in s.images}.isdisjoint({_digest(i) for s in
                                                                           builtin_samples("heldout", seed=0)
                                                                           for i in s.images})


def test_splits_share_no_image_and_no_conversation(calibration, heldout):
    calibration_images = {_digest(i) for s in calibration for i in s.images}
    heldout_images = {_digest(i) for s in heldout for i in s.images}
    assert calibration_images.isdisjoint(heldout_images)
    assert {_conversation(s) for s in calibration}.isdisjoint({_conversation(s) for s in heldout})
    # Disjoint by construction, not by luck: other seeds too.
    assert {_conversation(s) for s in builtin_samples("calibration", seed=5)}.isdisjoint(
        {_conversation(s) for s in builtin_samples("heldout", seed=5)})


def test_sizes_kinds_and_conversation_shape(calibration, heldout):
    assert len(calibration) == 64 and len(heldout) == 24
    for split, samples in (("calibration", calibration), ("heldout", heldout)):
        assert {s.kind for s in samples} == BUILTIN_KINDS
        assert len({s.name for s in samples}) == len(samples)
        assert {s.kind for s in samples[:len(synthetic.PLANS[split])]} == BUILTIN_KINDS  # interleaved
        for sample in samples:
            assert sample.has_answer and sample.messages[0]["role"] == "user"
            assert all(image.mode == "RGB" for image in sample.images)
            assert all(text.strip() for text in sample.texts)
    multi = [s for s in calibration if s.kind == "multi_image"]
    assert all(2 <= len(s.images) <= 3 for s in multi)
    sides = [side for s in calibration for image in s.images for side in image.size]
    assert min(sides) <= 256 and max(sides) == 1024
    ratios = [image.width / image.height for s in calibration for image in s.images]
    assert max(ratios) >= 2 and min(ratios) <= 0.5  # wide and tall pictures get sliced differently


def test_video_samples_have_frames_and_grouped_temporal_ids(calibration):
    videos = [s for s in calibration if s.kind == "video"]
    assert videos and all(s.is_video for s in videos)
    assert not any(s.is_video for s in calibration if s.kind != "video")
    for sample in videos:
        frames = sample.images
        assert 4 <= len(frames) <= 8 and len({f.size for f in frames}) == 1
        ids = [i for group in sample.temporal_ids for i in group]
        assert len(ids) == len(frames) and ids == sorted(set(ids)) and ids[0] == 0
        assert 1 <= len(sample.temporal_ids[0]) <= 3
        assert len({_digest(f) for f in frames}) == len(frames)  # something moves


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_PLACE = "|".join(PLACES)


def _shape_mentions(sample) -> list[tuple[str, str, str]]:
    """(color, shape, place) triples an answer states, from either answer form."""
    question, answer = sample.texts[-2], sample.texts[-1]
    found = re.findall(rf"\b({_COLOR}) ({_SHAPE}) ({_PLACE})", answer)
    asked = re.fullmatch(rf"What color is the ({_SHAPE}) ({_PLACE})\?", question)
    if asked:
        color = re.fullmatch(rf"The {asked[1]} {asked[2]} is ({_COLOR})\.", answer)[1]
        found.append((color, asked[1], asked[2]))
    return found


def _has_color_in_cell(image: Image.Image, color: str, place: str) -> bool:
    pixels = np.asarray(image)
    cell = PLACES.index(place)
    h, w = pixels.shape[0] // 3, pixels.shape[1] // 3
    block = pixels[(cell // 3) * h:(cell // 3 + 1) * h, (cell % 3) * w:(cell % 3 + 1) * w]
    return bool((block == COLORS[color]).all(axis=-1).sum() > 20)


def test_scene_answers_name_shapes_that_are_in_the_picture(calibration, heldout):
    scenes = [s for s in calibration + heldout if s.kind == "scene"]
    checked = 0
    for sample in scenes:
        mentions = _shape_mentions(sample)
        assert mentions, sample.texts
        for color, _, place in mentions:
            assert _has_color_in_cell(sample.images[0], color, place), (sample.name, color, place)
            checked += 1
    assert checked >= len(scenes)


def test_video_answers_match_where_the_shape_starts_and_ends(calibration):
    moving = 0
    for sample in (s for s in calibration if s.kind == "video"):
        match = re.match(rf"An? ({_COLOR}) ({_SHAPE}) moves from the (.+?) to the (.+?) over", sample.texts[-1])
        if not match:
            assert re.match(rf"An? ({_COLOR}) ({_SHAPE}) in the center (grows|shrinks)", sample.texts[-1])
            continue
        color, _, start, end = match.groups()
        place = {p.split(" ", 1)[1].removeprefix("the "): p for p in PLACES}
        assert _has_color_in_cell(sample.images[0], color, place[start])
        assert _has_color_in_cell(sample.images[-1], color, place[end])
        moving += 1
    assert moving


def test_comparison_answers_match_the_pictures(calibration):
    kinds = set()
    for sample in (s for s in calibration if s.kind == "multi_image"):
        answer = sample.texts[-1]
        changed = re.match(rf"The ({_SHAPE}) ({_PLACE}) is ({_COLOR}) in the first image and ({_COLOR}) in the "
                           "second", answer)
        if changed:
            _, place, old, new = changed.groups()
            before, after = sample.images
            assert _has_color_in_cell(before, old, place) and _has_color_in_cell(after, new, place)
            differs = (np.asarray(before) != np.asarray(after)).any(axis=-1)
            assert 0 < differs.mean() < 0.2  # one recoloured shape on the same background and noise
            kinds.add("changed")
            continue
        most = re.match(r"The (first|second|third) image has the most shapes, (\d):", answer)
        image = sample.images[("first", "second", "third").index(most[1])]
        shapes = re.findall(rf"\b({_COLOR}) ({_SHAPE}) ({_PLACE})", answer)
        assert len(shapes) == int(most[2])
        assert all(_has_color_in_cell(image, color, place) for color, _, place in shapes)
        kinds.add("most")
    assert kinds == {"changed", "most"}


def test_chinese_text_renders_distinct_non_blank_glyphs():
    size = 32
    glyphs = {char: np.asarray(wide_glyph(ord(char), size)) for char in "量化模型校准数据中文"}
    for char, glyph in glyphs.items():
        ink = (glyph > 128).mean()
        assert 0.04 < ink < 0.6, (char, ink)
    assert len({glyph.tobytes() for glyph in glyphs.values()}) == len(glyphs)
    assert (np.asarray(wide_glyph(ord("。"), size)) > 128).any()
    page = Image.new("RGB", (400, 60), "white")
    width = draw_text(ImageDraw.Draw(page), (10, 10), "模型量化：2024年", size, (0, 0, 0))
    assert width == text_width("模型量化：2024年", size)
    ink = (np.asarray(page.convert("L")) < 128)
    columns_with_ink = ink.any(axis=0).nonzero()[0]
    assert columns_with_ink.min() < 20 and columns_with_ink.max() > 10 + width - 20
    assert ink.mean() > 0.05


def test_chinese_documents_have_ink_in_their_text_lines(calibration):
    chinese = [s for s in calibration if s.name.split("/")[2] == "document-zh"]
    assert chinese and all(re.search(r"[\u4e00-\u9fff]", s.texts[-1]) for s in chinese)
    for sample in chinese:
        gray = np.asarray(sample.images[0].convert("L")).astype(int)
        background = np.median(gray)
        dark_rows = ((background - gray) > 80).sum(axis=1) > 5
        assert dark_rows.sum() > 60, sample.name  # several lines of glyphs, not an empty page


def test_generation_is_fast():
    wide_glyph.cache_clear()
    synthetic.latin_font.cache_clear()
    start = time.perf_counter()
    builtin_samples("calibration", seed=3)
    assert time.perf_counter() - start < 5


# Renders both splits in a fresh process and prints a digest of every image's bytes; `{setup}` runs first.
_DIGEST_SCRIPT = """
import hashlib, sys
{setup}
from mcq.errors import McqError
from mcq.calibration.synthetic import builtin_samples
digest = hashlib.sha256()
try:
    for split in ("calibration", "heldout"):
        for sample in builtin_samples(split):
            for image in sample.images:
                digest.update(image.tobytes())
except McqError as err:
    print("McqError:", err)
    sys.exit(2)
print(digest.hexdigest())
"""


def _set_digest() -> str:
    digest = hashlib.sha256()
    for split in ("calibration", "heldout"):
        for sample in builtin_samples(split):
            for image in sample.images:
                digest.update(image.tobytes())
    return digest.hexdigest()


def _render_elsewhere(tmp_path: Path, setup: str = "", **env: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[2]
    environment = {**os.environ, **env,
                   "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT.format(setup=setup)], env=environment,
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)


def test_the_set_is_the_same_without_system_fonts_or_libraqm(tmp_path):
    """No system font is looked up and Pillow's layout does not depend on libraqm: a process that sees no font
    directory, no fontconfig configuration and no libraqm draws the same bytes."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "fonts.conf").write_text("<?xml version='1.0'?><fontconfig></fontconfig>\n")
    hidden = _render_elsewhere(tmp_path, setup="from PIL import ImageFont\nImageFont.core.HAVE_RAQM = False",
                               XDG_DATA_DIRS=str(empty), XDG_DATA_HOME=str(empty), HOME=str(empty),
                               FONTCONFIG_FILE=str(tmp_path / "fonts.conf"), FONTCONFIG_PATH=str(empty),
                               MPLCONFIGDIR=str(empty))
    assert hidden.returncode == 0, hidden.stderr[-2000:]
    assert hidden.stdout.strip() == _set_digest()


def test_without_freetype_the_set_is_refused_not_drawn_otherwise(tmp_path):
    """A Pillow without FreeType cannot draw the set's font; it must say so, not fall back to another font."""
    result = _render_elsewhere(tmp_path, setup="sys.modules['PIL._imagingft'] = None")
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert result.stdout.startswith("McqError:") and "FreeType" in result.stdout


@pytest.mark.parametrize("split, seed", [("train", 0), ("calibration", "0"), ("calibration", 1.5)])
def test_bad_arguments_are_user_errors(split, seed):
    with pytest.raises(McqError):
        builtin_samples(split, seed)
