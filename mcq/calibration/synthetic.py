"""The built-in multimodal set: documents, tables, charts, scenes, image comparisons, video clips and text chats,
generated from a seed with no download and no system font.

Every sample is a user question and an assistant answer that states what the picture actually shows (the tallest
bar and its value, a table cell, the colour and place of each shape, where a shape moves), so a teacher-forced
pass over it sees the activations of a model reading and answering about real content, and the held-out split can
score answers that are right.

Determinism. Each sample draws from its own `random.Random` seeded with the string
`"mcq.calibration/<split>/<seed>/<variant>/<index>"` (string seeds are hashed with SHA-512, so they do not depend on
`PYTHONHASHSEED`); pixel noise comes from that generator's `randbytes`, never from numpy's generators, whose streams
may change between numpy releases. The same split and seed give byte-identical images on any machine with the same
Pillow and matplotlib versions.

Latin text is drawn in DejaVu Sans, the font file matplotlib ships in its own data (`mpl-data/fonts/ttf/`;
matplotlib is a dependency), rendered by Pillow's FreeType with Pillow's basic layout engine. Nothing depends on
the machine: not the fonts it has installed (the file is opened by path, never looked up), not whether libraqm is
present (which Pillow would otherwise prefer for layout). There is no fallback: a Pillow built without FreeType
would draw another set, so it is refused (McqError). Only printable ASCII goes through that font.

Chinese text. No font bundled with Pillow or this package has CJK glyphs, and a system font (Noto CJK, WenQuanYi)
cannot be required. Chinese characters are therefore drawn as procedural glyphs: each code point seeds a SplitMix64
stream that picks a layout (single, left-right, top-bottom or enclosed, the main structures of Chinese characters)
and three to seven strokes per part (horizontal, vertical, left- and right-falling, dot, small box), drawn with
a stroke width proportional to the size. The result is not legible Chinese: it is a fixed, distinct shape per code
point with the density, stroke directions and square cell of CJK script, laid out on the page exactly as the real
text would be. The conversation itself carries the real characters, so a Chinese document sample teaches the
model's language side real Chinese while its vision side sees a page of CJK-like script. Full-width punctuation is
drawn as the matching ASCII mark in a full-width cell (`。` as a small circle, `、` as a tick).

Splits. `calibration` and `heldout` use different generator seeds and disjoint halves of every name list (people,
cities, products, topics), so no document, table or chart of one split names what the other's does; scenes,
comparisons and clips are drawn from random layouts, colours and noise. A test checks that no image bytes or
conversation texts are shared.
"""

from __future__ import annotations

import functools
import math
import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mcq.errors import McqError
from mcq.models.minicpmv.video import temporal_ids

from .samples import SPLITS, Sample

# (variant, count) per split: every kind in both, calibration 64 samples, heldout 24.
PLANS: dict[str, tuple[tuple[str, int], ...]] = {
    "calibration": (("document-en", 6), ("document-zh", 6), ("table", 8), ("chart-bar", 5), ("chart-line", 5),
                    ("scene", 6), ("scene-wide", 2), ("scene-tall", 2), ("multi-image", 8), ("video", 8), ("text", 8)),
    "heldout": (("document-en", 2), ("document-zh", 2), ("table", 3), ("chart-bar", 2), ("chart-line", 2),
                ("scene", 2), ("scene-wide", 1), ("scene-tall", 1), ("multi-image", 3), ("video", 3), ("text", 3)),
}
VARIANT_KINDS = {"document-en": "document", "document-zh": "document", "table": "table", "chart-bar": "chart",
                 "chart-line": "chart", "scene": "scene", "scene-wide": "scene", "scene-tall": "scene",
                 "multi-image": "multi_image", "video": "video", "text": "text"}


def builtin_samples(split: str, seed: int = 0) -> list[Sample]:
    """The built-in set of `split` ("calibration": 64 samples, "heldout": 24), every kind in both, interleaved so
    that any prefix mixes kinds."""
    if split not in PLANS:
        raise McqError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise McqError(f"seed must be an integer, got {seed!r}")
    vocabulary = Vocabulary(split)
    slots = [(variant, index) for index in range(max(count for _, count in PLANS[split]))
             for variant, count in PLANS[split] if index < count]
    samples = []
    for variant, index in slots:
        rng = random.Random(f"mcq.calibration/{split}/{seed}/{variant}/{index}")
        messages, frame_ids = GENERATORS[variant](rng, vocabulary)
        samples.append(Sample(name=f"builtin/{split}/{variant}/{index:03d}", kind=VARIANT_KINDS[variant],
                              messages=tuple(messages), temporal_ids=frame_ids))
    return samples


# --------------------------------------------------------------------------------------------------------------
# Names. Each split gets every other entry, so the two splits never share one.

_PEOPLE = ("Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keiko", "Liam",
           "Maya", "Nikhil", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tessa", "Umar", "Vera", "Wen", "Yusuf")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Denver", "Krakow", "Hanoi", "Porto", "Quito", "Seville",
           "Tallinn", "Dublin", "Accra", "Bergen", "Cusco", "Geneva", "Hobart", "Izmir", "Jaipur", "Kyoto", "Leeds",
           "Malmo", "Nantes")
# (singular, plural, price in cents)
_PRODUCTS = (("notebook", "notebooks", 350), ("pencil", "pencils", 80), ("mug", "mugs", 650),
             ("lamp", "lamps", 2400), ("backpack", "backpacks", 3900), ("stapler", "staplers", 1150),
             ("kettle", "kettles", 2950), ("towel", "towels", 890), ("umbrella", "umbrellas", 1575),
             ("candle", "candles", 420), ("scarf", "scarves", 1840), ("teapot", "teapots", 2260),
             ("pillow", "pillows", 1690), ("ruler", "rulers", 120), ("basket", "baskets", 1380),
             ("glove", "gloves", 990), ("bowl", "bowls", 540), ("clock", "clocks", 3150),
             ("sponge", "sponges", 95), ("blanket", "blankets", 4480), ("vase", "vases", 2070),
             ("marker", "markers", 210), ("wallet", "wallets", 2790), ("plate", "plates", 610))
_SUBJECTS = ("the new expense policy", "the office move in spring", "the server maintenance window",
             "the quarterly planning meeting", "the updated travel rules", "the printer replacement",
             "the summer schedule", "the security training", "the budget review", "the parking changes",
             "the supplier contracts", "the customer survey results", "the holiday rota", "the laptop upgrade",
             "the team offsite", "the fire drill")
_CITIES_ZH = ("北京", "上海", "广州", "深圳", "杭州", "南京", "成都", "武汉", "西安", "重庆", "天津", "苏州", "长沙",
              "郑州", "青岛", "厦门")
_PEOPLE_ZH = ("王伟", "李娜", "张敏", "刘洋", "陈静", "杨帆", "赵磊", "黄丽", "周杰", "吴芳", "徐明", "孙悦", "马超",
              "朱琳", "胡斌", "郭莹")
_TOPICS_ZH = ("年度预算调整", "办公室搬迁", "系统升级维护", "安全培训安排", "新产品发布", "春季运动会", "图书馆装修",
              "停车场改造", "节假日值班", "供应商评估", "员工体检", "网络安全检查")
# (name, price in yuan)
_PRODUCTS_ZH = (("苹果", 6), ("香蕉", 4), ("牛奶", 12), ("面包", 9), ("鸡蛋", 15), ("大米", 38), ("茶叶", 88),
                ("咖啡", 45), ("酸奶", 7), ("橙汁", 11), ("饼干", 13), ("蜂蜜", 56))


class Vocabulary:
    """The half of every name list that one split uses."""

    def __init__(self, split: str):
        start = SPLITS.index(split)
        self.people = _PEOPLE[start::2]
        self.cities = _CITIES[start::2]
        self.products = _PRODUCTS[start::2]
        self.subjects = _SUBJECTS[start::2]
        self.cities_zh = _CITIES_ZH[start::2]
        self.people_zh = _PEOPLE_ZH[start::2]
        self.topics_zh = _TOPICS_ZH[start::2]
        self.products_zh = _PRODUCTS_ZH[start::2]
        # Every shape and every colour appears in both splits, but each (shape, colour) pair in one only, and every
        # picture and sentence about shapes names such a pair.
        self.shape_pairs = tuple((kind, color) for k, kind in enumerate(SHAPES) for c, color in enumerate(COLORS)
                                 if (k + c) % 2 == start)


# --------------------------------------------------------------------------------------------------------------
# Text: Latin through Pillow's built-in font, everything else through procedural full-width glyphs.

_LATIN = re.compile(r"[ -~]+")
_WRAP_TOKENS = re.compile(r"[!-~]+| +|[^ -~]")
_NO_LINE_START = set("，。、：；？！）》”’")
# Full-width punctuation drawn as the ASCII mark it stands for (NFKC covers the FF01-FF5E block).
_WIDE_AS_ASCII = {"“": '"', "”": '"', "‘": "'", "’": "'", "《": "<", "》": ">", "—": "-", "·": "."}


@functools.lru_cache(maxsize=None)
def latin_font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans from matplotlib's data at `size` pixels, laid out by Pillow's basic engine (see the module
    docstring: no system font, no libraqm, no fallback)."""
    font_file = latin_font_file()   # outside the try: a missing matplotlib is not a Pillow without FreeType
    try:
        return ImageFont.truetype(str(font_file), size=size, layout_engine=ImageFont.Layout.BASIC)
    except ImportError:
        raise McqError("Pillow was built without FreeType, which the built-in calibration set needs to draw its "
                       "text; install Pillow from its PyPI wheels, which include FreeType") from None


def latin_font_file() -> Path:
    """The font file the built-in set's text is drawn with (its bytes decide the images as much as this code)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not path.is_file():
        raise McqError(f"{path} is missing: matplotlib's installation is incomplete, and the built-in calibration "
                       "set draws its text with that font")
    return path


def text_width(text: str, size: int) -> int:
    """Width in pixels of `text` drawn by `draw_text` at `size`."""
    width = 0.0
    for run in _runs(text):
        width += latin_font(size).getlength(run) if _LATIN.fullmatch(run) else size
    return math.ceil(width)


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int,
              fill: tuple[int, int, int]) -> int:
    """Draw one line with its top-left corner at `xy`; returns its width. Non-ASCII characters take one
    full-width cell each (CJK-style), drawn as procedural glyphs."""
    x, y = xy
    start = x
    for run in _runs(text):
        if _LATIN.fullmatch(run):
            draw.text((x, y), run, font=latin_font(size), fill=fill, anchor="la")
            x += latin_font(size).getlength(run)
            continue
        ascii_mark = _WIDE_AS_ASCII.get(run) or unicodedata.normalize("NFKC", run)
        if run not in "。、" and len(ascii_mark) == 1 and " " < ascii_mark <= "~":
            draw.text((x + size * 0.15, y), ascii_mark, font=latin_font(size), fill=fill, anchor="la")
        else:
            draw.bitmap((round(x), round(y + size * 0.1)), wide_glyph(ord(run), size), fill=fill)
        x += size
    return math.ceil(x - start)


def wrap_text(text: str, size: int, width: int) -> list[str]:
    """Greedy line breaking: at spaces for Latin words, between any two characters of CJK text."""
    lines, current = [], ""
    for token in _WRAP_TOKENS.findall(text):
        candidate = current + token
        # Chinese typesetting never starts a line with closing punctuation; it overhangs the line instead.
        if current and token not in _NO_LINE_START and text_width(candidate.rstrip(), size) > width:
            lines.append(current.rstrip())
            current = "" if token.isspace() else token
        else:
            current = candidate
    if current.strip():
        lines.append(current.rstrip())
    return lines


def _runs(text: str) -> list[str]:
    """Maximal printable-ASCII runs and single other characters."""
    return re.findall(r"[ -~]+|[^ -~]", text)


_MASK64 = (1 << 64) - 1


class _SplitMix64:
    """A tiny, fully specified generator so that glyph shapes depend on the code point and nothing else."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def below(self, n: int) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return (z ^ (z >> 31)) % n


@functools.lru_cache(maxsize=8192)
def wide_glyph(codepoint: int, size: int) -> Image.Image:
    """The procedural glyph of a full-width character: an `L` mask of `size` x `size` (see the module docstring)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    stroke = max(1, round(size * 0.07))

    def line(points: list[tuple[float, float]]) -> None:
        draw.line([(round(px * (size - 1)), round(py * (size - 1))) for px, py in points], fill=255, width=stroke)

    def box(left: float, top: float, right: float, bottom: float) -> None:
        line([(left, top), (right, top), (right, bottom), (left, bottom), (left, top)])

    char = chr(codepoint)
    if char == "。":
        draw.ellipse((round(size * 0.12), round(size * 0.62), round(size * 0.38), round(size * 0.88)), outline=255,
                     width=max(1, stroke // 2))
        return mask
    if char == "、":
        line([(0.15, 0.65), (0.3, 0.85)])
        return mask
    bits = _SplitMix64(codepoint * 0x2545F4914F6CDD1D + 1)
    layout = bits.below(4)
    full = (0.1, 0.08, 0.9, 0.92)
    if layout == 0:
        regions = [full]
    elif layout == 1:  # left-right, the left part narrower like a radical
        split = 0.36 + 0.04 * bits.below(4)
        regions = [(0.1, 0.08, split - 0.04, 0.92), (split + 0.04, 0.08, 0.9, 0.92)]
    elif layout == 2:  # top-bottom
        split = 0.36 + 0.04 * bits.below(4)
        regions = [(0.1, 0.08, 0.9, split - 0.04), (0.1, split + 0.04, 0.9, 0.92)]
    else:  # enclosure
        box(*full)
        regions = [(0.28, 0.26, 0.72, 0.76)]
    # Common characters have roughly 5 to 15 strokes; a part of a shared cell gets fewer.
    strokes_per_part = {0: 5, 1: 3, 2: 3, 3: 3}[layout]
    for left, top, right, bottom in regions:
        width, height = right - left, bottom - top
        for index in range(strokes_per_part + bits.below(3)):
            # A horizontal, vertical or box first, so that every component has a structural stroke.
            kind = bits.below(3) if index == 0 else bits.below(6)
            if kind == 0:  # horizontal
                y = top + height * (0.15 + 0.175 * bits.below(5))
                line([(left + width * 0.08 * bits.below(3), y), (right - width * 0.08 * bits.below(3), y)])
            elif kind == 1:  # vertical
                x = left + width * (0.15 + 0.175 * bits.below(5))
                line([(x, top + height * 0.08 * bits.below(3)), (x, bottom - height * 0.08 * bits.below(3))])
            elif kind == 2:  # small box
                x0 = left + width * 0.1 * bits.below(4)
                y0 = top + height * 0.1 * bits.below(4)
                box(x0, y0, x0 + width * (0.45 + 0.1 * bits.below(3)), y0 + height * (0.4 + 0.1 * bits.below(3)))
            elif kind == 3:  # left-falling
                x = left + width * (0.45 + 0.1 * bits.below(4))
                line([(x, top + height * 0.05), (left + width * 0.05, bottom - height * 0.1 * bits.below(3))])
            elif kind == 4:  # right-falling
                x = left + width * (0.3 + 0.1 * bits.below(3))
                line([(x, top + height * (0.3 + 0.1 * bits.below(3))), (right, bottom)])
            else:  # dot
                x = left + width * (0.2 + 0.15 * bits.below(5))
                y = top + height * (0.05 + 0.2 * bits.below(4))
                line([(x, y), (x + width * 0.1, y + height * 0.1)])
    return mask


class Page:
    """A page written top to bottom; `write` drops lines that no longer fit (facts go first, filler after)."""

    def __init__(self, size: tuple[int, int], background: tuple[int, int, int], margin: int):
        self.image = Image.new("RGB", size, background)
        self.draw = ImageDraw.Draw(self.image)
        self.margin = margin
        self.y = margin

    @property
    def width(self) -> int:
        return self.image.width - 2 * self.margin

    def write(self, text: str, size: int, fill=(20, 20, 20), after: float = 0.35) -> None:
        for line in wrap_text(text, size, self.width):
            if self.y + size * 1.3 > self.image.height - self.margin:
                return
            draw_text(self.draw, (self.margin, self.y), line, size, fill)
            self.y += round(size * 1.3)
        self.y += round(size * after)

    def write_columns(self, left: str, right: str, size: int, fill=(20, 20, 20)) -> None:
        """`left` flush left and `right` flush right on one line (receipts)."""
        if self.y + size * 1.3 > self.image.height - self.margin:
            return
        draw_text(self.draw, (self.margin, self.y), left, size, fill)
        draw_text(self.draw, (self.margin + self.width - text_width(right, size), self.y), right, size, fill)
        self.y += round(size * 1.3)

    def rule(self) -> None:
        self.draw.line([(self.margin, self.y), (self.margin + self.width, self.y)], fill=(120, 120, 120), width=1)
        self.y += 8


# --------------------------------------------------------------------------------------------------------------
# Pictures: gradients, shapes, noise.

COLORS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 200), "orange": (255, 127, 14),
          "purple": (128, 70, 180), "yellow": (235, 195, 20), "pink": (230, 110, 180), "brown": (140, 86, 60),
          "black": (25, 25, 25), "teal": (20, 150, 150)}
BACKGROUNDS = {"white": (250, 250, 250), "light grey": (222, 222, 222), "pale yellow": (250, 244, 200),
               "light blue": (200, 224, 250), "mint green": (205, 240, 220), "lavender": (226, 214, 246),
               "peach": (250, 218, 196)}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
# The 3 x 3 grid of places, row by row, as a sentence says them.
PLACES = ("in the top left corner", "at the top", "in the top right corner", "on the left", "in the center",
          "on the right", "in the bottom left corner", "at the bottom", "in the bottom right corner")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cell: int  # index into PLACES
    center: tuple[float, float]
    radius: float

    def phrase(self) -> str:
        return f"{_article(self.color)} {self.color} {self.kind} {PLACES[self.cell]}"


def gradient(rng: random.Random, size: tuple[int, int], first: str, second: str, noise: int = 5) -> Image.Image:
    """A linear or radial blend of two background colours with a little pixel noise, like a photo's."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    style = rng.choice(("horizontal", "vertical", "diagonal", "radial"))
    if style == "horizontal":
        t = xs / max(width - 1, 1)
    elif style == "vertical":
        t = ys / max(height - 1, 1)
    elif style == "diagonal":
        t = (xs + ys) / max(width + height - 2, 1)
    else:
        cx, cy = width * rng.uniform(0.3, 0.7), height * rng.uniform(0.3, 0.7)
        t = np.minimum(np.hypot(xs - cx, ys - cy) / (0.75 * math.hypot(width, height)), 1.0)
    a, b = (np.array(BACKGROUNDS[name], np.float32) for name in (first, second))
    pixels = a * (1 - t[..., None]) + b * t[..., None]
    if noise:
        grain = np.frombuffer(rng.randbytes(width * height * 3), np.uint8).reshape(height, width, 3)
        pixels += (grain.astype(np.float32) / 255 - 0.5) * 2 * noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    cx, cy = shape.center
    r = shape.radius
    color = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((round(cx - r), round(cy - r), round(cx + r), round(cy + r)), fill=color)
        return
    if shape.kind == "square":
        points = _polygon(cx, cy, r * 1.3, 4, math.pi / 4)
    elif shape.kind == "triangle":
        points = _polygon(cx, cy, r * 1.15, 3, -math.pi / 2)
    elif shape.kind == "diamond":
        points = _polygon(cx, cy, r * 1.1, 4, 0)
    elif shape.kind == "hexagon":
        points = _polygon(cx, cy, r, 6, 0)
    else:  # star: ten points alternating outer and inner radius
        points = [(round(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5)),
                   round(cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)))
                  for i in range(10)]
    draw.polygon(points, fill=color)


def _polygon(cx: float, cy: float, r: float, sides: int, phase: float) -> list[tuple[int, int]]:
    return [(round(cx + r * math.cos(phase + 2 * math.pi * i / sides)),
             round(cy + r * math.sin(phase + 2 * math.pi * i / sides))) for i in range(sides)]


def layout_shapes(rng: random.Random, vocab: Vocabulary, size: tuple[int, int], count: int) -> list[Shape]:
    """`count` shapes in distinct grid cells, distinct (colour, kind) pairs and distinct sizes (so "the largest"
    and "the red circle" each name exactly one)."""
    width, height = size
    cell_w, cell_h = width / 3, height / 3
    cells = sorted(rng.sample(range(9), count))
    fractions = rng.sample([0.18 + 0.03 * i for i in range(9)], count)
    pairs = rng.sample(vocab.shape_pairs, count)
    shapes = []
    for cell, fraction, (kind, color) in zip(cells, fractions, pairs):
        radius = min(cell_w, cell_h) * fraction
        slack_x, slack_y = max(cell_w / 2 - radius * 1.2, 0), max(cell_h / 2 - radius * 1.2, 0)
        center = ((cell % 3 + 0.5) * cell_w + rng.uniform(-slack_x, slack_x) * 0.5,
                  (cell // 3 + 0.5) * cell_h + rng.uniform(-slack_y, slack_y) * 0.5)
        shapes.append(Shape(kind, color, cell, center, radius))
    return shapes


def scene_image(rng: random.Random, size: tuple[int, int], shapes: list[Shape], backgrounds: tuple[str, str]):
    image = gradient(rng, size, *backgrounds)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    return image


def _two_backgrounds(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(sorted(BACKGROUNDS), 2)
    return first, second


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _place_noun(cell: int) -> str:
    """"in the top left corner" → "the top left corner", "on the left" → "the left"."""
    return PLACES[cell].split(" ", 1)[1]


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


# --------------------------------------------------------------------------------------------------------------
# Generators: each returns the messages and, for video, the temporal ids.

Messages = list[dict]
Generated = tuple[Messages, tuple[tuple[int, ...], ...] | None]

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_WEEKDAYS_ZH = "一二三四五六日"
_PAPER = ((252, 252, 250), (255, 253, 244), (246, 248, 252), (250, 247, 240))
_INK = ((20, 20, 20), (30, 30, 60), (45, 35, 30))


def _turns(image_content: list, question: str, answer: str) -> Messages:
    return [{"role": "user", "content": [*image_content, question]}, {"role": "assistant", "content": answer}]


def _date(rng: random.Random) -> tuple[str, int, str]:
    """Month name, day and weekday (the weekday is not derived from a year: documents never state one)."""
    return rng.choice(_MONTHS), rng.randint(1, 28), rng.choice(_WEEKDAYS)


def document_en(rng: random.Random, vocab: Vocabulary) -> Generated:
    style = rng.choice(("memo", "notice", "receipt", "itinerary"))
    if style == "receipt":
        size = rng.choice(((384, 900), (448, 1024), (360, 720)))
    else:
        size = rng.choice(((612, 792), (595, 842), (768, 1024), (1024, 724), (540, 720)))
    body = max(13, min(24, size[0] // 36 + rng.randint(-2, 2)))
    page = Page(size, rng.choice(_PAPER), margin=max(24, size[0] // 14))
    ink = rng.choice(_INK)
    month, day, weekday = _date(rng)
    if style == "memo":
        writer, reader = rng.sample(vocab.people, 2)
        subject = rng.choice(vocab.subjects)
        deadline = f"{rng.choice(_WEEKDAYS[:5])}, {rng.choice(_MONTHS)} {rng.randint(1, 28)}"
        page.write("MEMO", round(body * 1.8), ink)
        page.rule()
        for label, value in (("To", reader), ("From", writer), ("Date", f"{month} {day}, 2024"),
                             ("Subject", subject[0].upper() + subject[1:])):
            page.write(f"{label}: {value}", body, ink, after=0)
        page.rule()
        page.write(f"This memo summarizes {subject}. Please read it before the next team meeting and send your "
                   f"comments to {writer} by {deadline}.", body, ink)
        page.write(_filler_en(rng, 4), body, ink)
        page.write(_filler_en(rng, 5), body, ink)
        question, answer = rng.choice((
            ("Who wrote this memo, and who is it addressed to?",
             f"The memo was written by {writer} and is addressed to {reader}."),
            ("What is the memo about?", f"The memo is about {subject}."),
            ("By when should comments be sent, and to whom?",
             f"Comments should be sent to {writer} by {deadline}."),
        ))
    elif style == "notice":
        city = rng.choice(vocab.cities)
        reason = rng.choice(("a roof repair", "staff training", "a power upgrade", "a floor renovation",
                             "an inventory count"))
        opens, closes = rng.randint(7, 10), rng.randint(17, 21)
        page.write(f"{city.upper()} PUBLIC LIBRARY", round(body * 1.6), ink)
        page.write("NOTICE TO VISITORS", round(body * 1.2), ink)
        page.rule()
        page.write(f"The library will be closed on {weekday}, {month} {day} for {reason}. All loans due on that day "
                   f"are extended by one week.", body, ink)
        page.write(f"Opening hours on other days: {opens}:00 to {closes}:00.", body, ink)
        page.write(_filler_en(rng, 4), body, ink)
        question, answer = rng.choice((
            ("When will the library be closed, and why?",
             f"The {city} Public Library will be closed on {weekday}, {month} {day} for {reason}."),
            ("What are the library's opening hours on other days?",
             f"On other days the {city} Public Library is open from {opens}:00 to {closes}:00."),
        ))
    elif style == "receipt":
        shop = f"{rng.choice(vocab.cities)} {rng.choice(('Corner Store', 'Market', 'Home Goods', 'Supplies'))}"
        items = rng.sample(vocab.products, rng.randint(3, 7))
        lines = [(product, rng.randint(1, 4)) for product in items]
        total = sum(price * quantity for (_, _, price), quantity in lines)
        page.write(shop.upper(), round(body * 1.3), ink)
        page.write(f"{month} {day}, 2024  {rng.randint(8, 20)}:{rng.randrange(60):02d}", body, ink)
        page.rule()
        for (singular, plural, price), quantity in lines:
            page.write_columns(f"{quantity} x {singular if quantity == 1 else plural}", _money(price * quantity),
                               body, ink)
        page.rule()
        page.write_columns("TOTAL", _money(total), round(body * 1.2), ink)
        page.write("Thank you for shopping with us!", body, ink)
        (singular, plural, price), quantity = rng.choice(lines)
        question, answer = rng.choice((
            ("What is the total amount on this receipt?", f"The total at {shop} is {_money(total)}."),
            (f"How much was paid for the {plural} on this receipt?",
             f"{quantity} {singular if quantity == 1 else plural} cost {_money(price * quantity)} "
             f"({_money(price)} each)."),
        ))
    else:
        traveller = rng.choice(vocab.people)
        stops = rng.sample(vocab.cities, rng.randint(3, 5))
        page.write(f"Travel plan for {traveller}", round(body * 1.5), ink)
        page.rule()
        times = []
        for number, city in enumerate(stops, 1):
            hour, minute = rng.randint(6, 21), rng.choice((0, 15, 30, 45))
            times.append(f"{hour}:{minute:02d}")
            page.write(f"Day {number}: {city}, arriving at {hour}:{minute:02d} by "
                       f"{rng.choice(('train', 'bus', 'ferry', 'plane'))}.", body, ink, after=0.1)
        page.write(_filler_en(rng, 3), body, ink)
        number = rng.randrange(len(stops))
        question, answer = rng.choice((
            (f"Which city does {traveller} visit on day {number + 1}, and at what time?",
             f"On day {number + 1} {traveller} arrives in {stops[number]} at {times[number]}."),
            ("List the cities of this travel plan in order.",
             f"The plan visits {_join(stops)}, in that order."),
        ))
    return _turns([page.image], question, answer), None


_FILLER_EN = (
    "The details below were agreed after the last review.", "Nothing changes for people who already signed up.",
    "Questions can be raised with the front desk at any time.", "A printed copy is kept in the main office.",
    "We expect the work to take less time than last year.", "Thank you for your patience while this is done.",
    "The plan may be adjusted if the weather is poor.", "Everyone affected will receive a reminder by email.",
    "Please keep this page for your records.", "Earlier notices on the same topic are no longer valid.",
    "Volunteers are welcome to help with the preparations.", "The figures were checked twice before publication.",
    "Access for deliveries stays open during the whole period.", "Bring your badge, as the side doors stay locked.",
)


def _filler_en(rng: random.Random, count: int) -> str:
    return " ".join(rng.sample(_FILLER_EN, count))


def _duration(minutes: int) -> str:
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def _money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


_FILLER_ZH = ("请各部门提前做好相关准备工作。", "如有疑问，请与行政办公室联系。", "感谢大家的理解与支持。",
              "具体安排如有变化，将另行通知。", "请大家相互转告，按时参加。", "相关材料已放在会议室，可随时查阅。",
              "此次调整不影响正常的对外服务。", "请注意安全，遵守现场工作人员的指引。", "上次通知的内容同时作废。",
              "欢迎大家提出意见和建议。")


def document_zh(rng: random.Random, vocab: Vocabulary) -> Generated:
    style = rng.choice(("notice", "minutes", "receipt"))
    size = rng.choice(((612, 792), (768, 1024), (595, 842), (480, 800))) if style != "receipt" \
        else rng.choice(((384, 860), (420, 1000)))
    body = max(16, min(28, size[0] // 26 + rng.randint(-2, 2)))
    page = Page(size, rng.choice(_PAPER), margin=max(24, size[0] // 14))
    ink = rng.choice(_INK)
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    weekday = _WEEKDAYS_ZH[rng.randrange(7)]
    if style == "notice":
        topic = rng.choice(vocab.topics_zh)
        place = rng.choice(vocab.cities_zh) + rng.choice(("分公司", "图书馆", "服务中心", "体育馆"))
        reason = rng.choice(("设备检修", "内部装修", "消防演练", "电力维护"))
        title = f"关于{topic}的通知"
        page.write(title, round(body * 1.5), ink)
        page.rule()
        page.write("各位同事：", body, ink, after=0.1)
        page.write(f"因{reason}，{place}将于{month}月{day}日（星期{weekday}）暂停开放一天。{_filler_zh(rng, 2)}",
                   body, ink)
        page.write(_filler_zh(rng, 3), body, ink)
        page.write(f"2024年{rng.randint(1, 12)}月{rng.randint(1, 28)}日", body, ink)
        question, answer = rng.choice((
            ("这份通知的标题是什么？", f"标题是“{title}”。"),
            (f"{place}哪天暂停开放？为什么？",
             f"{place}将于{month}月{day}日（星期{weekday}）暂停开放，原因是{reason}。"),
        ))
    elif style == "minutes":
        topic = rng.choice(vocab.topics_zh)
        city = rng.choice(vocab.cities_zh)
        people = rng.sample(vocab.people_zh, rng.randint(3, 5))
        hour = rng.randint(8, 17)
        page.write(f"{topic}会议纪要", round(body * 1.5), ink)
        page.rule()
        page.write(f"时间：2024年{month}月{day}日 {hour}:00", body, ink, after=0)
        page.write(f"地点：{city}办公室第{rng.randint(2, 9)}会议室", body, ink, after=0)
        page.write(f"参会人员：{'、'.join(people)}", body, ink)
        page.write(f"会议由{people[0]}主持，讨论了{topic}的进度和下一步计划。{_filler_zh(rng, 2)}", body, ink)
        page.write(_filler_zh(rng, 3), body, ink)
        question, answer = rng.choice((
            ("会议在哪里举行？由谁主持？", f"会议在{city}办公室举行，由{people[0]}主持。"),
            ("有哪些人参加了这次会议？", f"参会人员有{'、'.join(people)}，共{len(people)}人。"),
        ))
    else:
        shop = rng.choice(vocab.cities_zh) + rng.choice(("便利店", "超市", "食品店"))
        items = [(name, price, rng.randint(1, 3)) for name, price in rng.sample(vocab.products_zh, rng.randint(3, 5))]
        total = sum(price * quantity for _, price, quantity in items)
        page.write(shop, round(body * 1.4), ink)
        page.write(f"2024年{month}月{day}日", body, ink)
        page.rule()
        for name, price, quantity in items:
            page.write_columns(f"{name} x{quantity}", f"{price * quantity}元", body, ink)
        page.rule()
        page.write_columns("合计", f"{total}元", round(body * 1.2), ink)
        page.write("谢谢惠顾，欢迎再次光临！", body, ink)
        name, price, quantity = rng.choice(items)
        question, answer = rng.choice((
            ("这张收据的合计金额是多少？", f"{shop}这张收据的合计金额是{total}元。"),
            (f"收据上{name}买了多少，花了多少钱？", f"{name}买了{quantity}份，单价{price}元，共{price * quantity}元。"),
        ))
    return _turns([page.image], question, answer), None


def _filler_zh(rng: random.Random, count: int) -> str:
    return "".join(rng.sample(_FILLER_ZH, count))


# (title, columns, smallest value, largest value)
_TABLES_PEOPLE = (("Test scores", ["Math", "Physics", "History", "Art"], 35, 100),
                  ("Hours volunteered", ["Mon", "Tue", "Wed", "Thu", "Fri"], 0, 9))
_TABLES_CITIES = (("Quarterly sales (units)", ["Q1", "Q2", "Q3", "Q4"], 120, 980),
                  ("Yearly visitors (thousands)", ["2021", "2022", "2023"], 15, 400),
                  ("Monthly weather averages", ["Rain (mm)", "Sun (h)", "Wind (km/h)"], 2, 240))
_TABLES_ITEMS = (("Store inventory", ["Stock", "Sold", "Returned"], 0, 150),
                 ("Product overview", ["Price ($)", "Units", "Reviews"], 3, 500))
_TABLES_ZH = (("各城市季度销量（台）", ["一季度", "二季度", "三季度", "四季度"], 100, 900),
              ("各城市月度访客（千人）", ["一月", "二月", "三月"], 10, 300),
              ("各城市门店、员工和仓库数量", ["门店", "员工", "仓库"], 1, 200))


def table(rng: random.Random, vocab: Vocabulary) -> Generated:
    chinese = rng.random() < 0.3
    if chinese:
        rows, corner = rng.sample(vocab.cities_zh, rng.randint(3, 6)), "城市"
        title, columns, low, high = rng.choice(_TABLES_ZH)
    else:
        pool, corner, configs = rng.choice(((vocab.people, "Name", _TABLES_PEOPLE),
                                            (vocab.cities, "City", _TABLES_CITIES),
                                            ([p[0] for p in vocab.products], "Item", _TABLES_ITEMS)))
        rows = rng.sample(pool, rng.randint(3, 7))
        title, columns, low, high = rng.choice(configs)
    values = [[rng.randint(low, high) for _ in columns] for _ in rows]
    image = _draw_table(rng, title, corner, columns, rows, values)
    variant = rng.randrange(3)
    col = rng.randrange(len(columns))
    column_values = [row_values[col] for row_values in values]
    if variant == 0:
        row = rng.randrange(len(rows))
        if chinese:
            question = f"表中{rows[row]}的“{columns[col]}”是多少？"
            answer = f"{rows[row]}的“{columns[col]}”是{values[row][col]}。"
        else:
            question = f"In the table, what is the {columns[col]} value for {rows[row]}?"
            answer = f"The {columns[col]} value for {rows[row]} is {values[row][col]}."
    elif variant == 1:
        best = max(column_values)
        winners = [rows[i] for i, v in enumerate(column_values) if v == best]
        if chinese:
            question = f"哪个城市的“{columns[col]}”最高？"
            answer = f"{'、'.join(winners)}的“{columns[col]}”最高，为{best}。"
        else:
            question = f"Which row has the highest {columns[col]} value in this table?"
            answer = f"{_join(winners)} {'has' if len(winners) == 1 else 'share'} the highest {columns[col]} " \
                     f"value, {best}."
    else:
        total = sum(column_values)
        if chinese:
            parts = "，".join(f"{row}{value}" for row, value in zip(rows, column_values))
            question = f"“{columns[col]}”一列的总和是多少？"
            answer = f"“{columns[col]}”一列的总和是{total}（{parts}）。"
        else:
            question = f"What is the sum of the {columns[col]} column?"
            parts = " + ".join(f"{value} for {row}" for row, value in zip(rows, column_values))
            answer = f"The {columns[col]} column adds up to {total} ({parts})."
    return _turns([image], question, answer), None


def _draw_table(rng: random.Random, title: str, corner: str, columns: list[str], rows: list[str],
                values: list[list[int]]) -> Image.Image:
    size = rng.choice((16, 18, 20, 24, 28))
    while True:  # shrink the font until the table fits in 1024 pixels
        pad = size // 2 + 4
        header = [corner, *columns]
        widths = [max(text_width(text, size) for text in [header[i], *(r[i] for r in _cells(rows, values))]) + 2 * pad
                  for i in range(len(header))]
        row_height = round(size * 1.3) + 2 * pad // 2
        table_w, table_h = sum(widths), row_height * (len(rows) + 1)
        margin = 24
        image_w = max(224, table_w + 2 * margin, text_width(title, size + 4) + 2 * margin)
        image_h = max(224, table_h + 2 * margin + round(size * 2.2))
        if image_w <= 1024 and image_h <= 1024 or size <= 12:
            break
        size -= 2
    image = Image.new("RGB", (min(image_w, 1024), min(image_h, 1024)), rng.choice(_PAPER))
    draw = ImageDraw.Draw(image)
    line_color = rng.choice(((90, 90, 90), (160, 160, 170), (40, 60, 110)))
    draw_text(draw, (margin, margin), title, size + 4, (15, 15, 15))
    top, left = margin + round(size * 2.2), margin
    header_fill = rng.choice(((225, 232, 245), (235, 235, 235), (250, 236, 210)))
    draw.rectangle((left, top, left + table_w, top + row_height), fill=header_fill)
    for r, cells in enumerate([[corner, *columns], *_cells(rows, values)]):
        x = left
        y = top + r * row_height
        for c, text in enumerate(cells):
            # Numbers right-aligned like a spreadsheet, labels left-aligned.
            offset = widths[c] - pad - text_width(text, size) if r > 0 and c > 0 else pad
            draw_text(draw, (x + offset, y + pad // 2), text, size, (20, 20, 20))
            x += widths[c]
    for r in range(len(rows) + 2):
        draw.line((left, top + r * row_height, left + table_w, top + r * row_height), fill=line_color, width=1)
    x = left
    for width in [0, *widths]:
        x += width
        draw.line((x, top, x, top + table_h), fill=line_color, width=1)
    return image


def _cells(rows: list[str], values: list[list[int]]) -> list[list[str]]:
    return [[row, *map(str, row_values)] for row, row_values in zip(rows, values)]


_CHART_SIZES = ((640, 480), (800, 600), (960, 540), (1024, 576), (512, 512), (448, 336), (720, 960))


def chart_bar(rng: random.Random, vocab: Vocabulary) -> Generated:
    subject = rng.choice(("rain", "sales", "books"))
    if subject == "rain":
        labels = rng.sample(vocab.cities, rng.randint(3, 7))
        title, unit, thing = f"Rainfall in {rng.choice(_MONTHS)} (mm)", "mm", "city"
    elif subject == "sales":
        labels = [p[1] for p in rng.sample(vocab.products, rng.randint(3, 7))]
        title, unit, thing = "Units sold last week", "units", "product"
    else:
        labels = rng.sample(vocab.people, rng.randint(3, 7))
        title, unit, thing = "Books read this year", "books", "person"
    values = rng.sample(range(4, 96), len(labels))
    image = _draw_chart(rng, title, labels, {"": values}, bars=True)
    top = max(range(len(values)), key=values.__getitem__)
    other = rng.choice([i for i in range(len(values)) if i != top])
    question, answer = rng.choice((
        (f"Which {thing} has the tallest bar in this chart, and what is its value?",
         f"The tallest bar is {labels[top]}, at {values[top]} {unit}."),
        (f"What value does the chart show for {labels[other]}?", f"The bar for {labels[other]} shows "
                                                                  f"{values[other]} {unit}."),
        (f"Is the bar for {labels[other]} higher than the bar for {labels[top]}?",
         f"No: the bar for {labels[other]} shows {values[other]} {unit}, less than the {values[top]} {unit} of "
         f"{labels[top]}."),
    ))
    return _turns([image], question, answer), None


def chart_line(rng: random.Random, vocab: Vocabulary) -> Generated:
    count = rng.randint(5, 9)
    if rng.random() < 0.5:
        first = rng.randrange(12 - count + 1)
        labels = [month[:3] for month in _MONTHS[first:first + count]]
        long_labels = list(_MONTHS[first:first + count])
    else:
        first = rng.randint(2010, 2024 - count)
        labels = long_labels = [str(year) for year in range(first, first + count)]
    names = rng.sample(vocab.cities, rng.choice((1, 2)))
    series = {}
    for name in names:
        while True:  # a walk with a single highest point, so "the peak" is one answer
            values = [rng.randint(20, 60)]
            for _ in range(count - 1):
                values.append(max(1, min(99, values[-1] + rng.randint(-12, 12))))
            if values.count(max(values)) == 1:
                break
        series[name] = values
    if len(names) == 1:
        title = f"Visitors to the {names[0]} museum (thousands)"
        values = series[names[0]]
        peak = values.index(max(values))
        image = _draw_chart(rng, title, labels, {"": values}, bars=False)
        question, answer = rng.choice((
            (f"When do visits to the {names[0]} museum peak, and how many visitors are there then?",
             f"Visits peak in {long_labels[peak]} at {values[peak]} thousand."),
            (f"How many visitors does the chart show for the {names[0]} museum in {long_labels[0]} and in "
             f"{long_labels[-1]}?",
             f"{values[0]} thousand in {long_labels[0]} and {values[-1]} thousand in {long_labels[-1]}."),
        ))
    else:
        title = "Average temperature (F)"
        image = _draw_chart(rng, title, labels, series, bars=False)
        a, b = names
        differing = [i for i in range(count) if series[a][i] != series[b][i]] or [0]
        i = rng.choice(differing)
        warmer, cooler = (a, b) if series[a][i] > series[b][i] else (b, a)
        if series[a][i] == series[b][i]:
            question = f"Compare {a} and {b} in {long_labels[i]}."
            answer = f"Both show {series[a][i]} F in {long_labels[i]}."
        else:
            question = f"Which city is warmer in {long_labels[i]} according to the chart?"
            answer = f"{warmer} is warmer in {long_labels[i]}: {series[warmer][i]} F against " \
                     f"{series[cooler][i]} F in {cooler}."
    return _turns([image], question, answer), None


_SERIES_COLORS = ("blue", "orange", "green", "red", "purple", "teal")


def _draw_chart(rng: random.Random, title: str, labels: list[str], series: dict[str, list[int]],
                bars: bool) -> Image.Image:
    width, height = rng.choice(_CHART_SIZES)
    image = Image.new("RGB", (width, height), rng.choice(((255, 255, 255), (248, 248, 244), (244, 247, 252))))
    draw = ImageDraw.Draw(image)
    size = max(12, min(22, width // 40))
    left, right = round(size * 3.5), width - round(size * 1.5)
    top, bottom = round(size * 3.2), height - round(size * 3)
    draw_text(draw, ((width - text_width(title, size + 4)) / 2, size * 0.8), title, size + 4, (20, 20, 20))
    peak = max(max(values) for values in series.values())
    step = next(s for s in (5, 10, 20, 25, 50) if peak / s <= 8)
    axis_max = step * math.ceil(peak / step)
    grid = (215, 215, 215)
    for tick in range(0, axis_max + 1, step):
        y = bottom - (bottom - top) * tick / axis_max
        draw.line((left, y, right, y), fill=grid, width=1)
        draw_text(draw, (left - text_width(str(tick), size) - 6, y - size * 0.6), str(tick), size, (60, 60, 60))
    draw.line((left, top, left, bottom), fill=(40, 40, 40), width=2)
    draw.line((left, bottom, right, bottom), fill=(40, 40, 40), width=2)
    slot = (right - left) / len(labels)
    label_size = size
    while label_size > 9 and max(text_width(label, label_size) for label in labels) > slot * 0.95:
        label_size -= 1
    for i, label in enumerate(labels):
        x = left + slot * (i + 0.5)
        draw_text(draw, (x - text_width(label, label_size) / 2, bottom + 6), label, label_size, (40, 40, 40))

    def y_of(value: int) -> float:
        return bottom - (bottom - top) * value / axis_max

    colors = rng.sample(_SERIES_COLORS, len(series))
    if bars:
        values = next(iter(series.values()))
        one_color = rng.random() < 0.5
        show_values = rng.random() < 0.5
        for i, value in enumerate(values):
            x0, x1 = left + slot * (i + 0.18), left + slot * (i + 0.82)
            color = COLORS[colors[0] if one_color else _SERIES_COLORS[i % len(_SERIES_COLORS)]]
            draw.rectangle((round(x0), round(y_of(value)), round(x1), bottom - 1), fill=color)
            if show_values:
                text = str(value)
                draw_text(draw, ((x0 + x1) / 2 - text_width(text, size) / 2, y_of(value) - size * 1.35), text, size,
                          (30, 30, 30))
    else:
        for values, color in zip(series.values(), colors):
            points = [(left + slot * (i + 0.5), y_of(v)) for i, v in enumerate(values)]
            draw.line(points, fill=COLORS[color], width=max(2, size // 6))
            for x, y in points:
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=COLORS[color])
        if len(series) > 1:  # legend, top right inside the plot
            y = top + 4
            for (name, _), color in zip(series.items(), colors):
                x = right - text_width(name, size) - size * 2
                draw.rectangle((x, y + size * 0.3, x + size, y + size * 0.9), fill=COLORS[color])
                draw_text(draw, (x + size * 1.3, y), name, size, (30, 30, 30))
                y += round(size * 1.4)
    return image


_SCENE_SIZES = ((224, 224), (320, 240), (448, 448), (512, 384), (640, 480), (800, 600), (768, 768), (1024, 1024))
# Strongly wide and tall pictures: the processor slices them into a row or a column of tiles.
_WIDE_SIZES = ((1024, 384), (1024, 512), (960, 320))
_TALL_SIZES = ((300, 900), (384, 1024), (336, 1008))


def scene(rng: random.Random, vocab: Vocabulary, sizes: tuple[tuple[int, int], ...] = _SCENE_SIZES) -> Generated:
    size = rng.choice(sizes)
    shapes = layout_shapes(rng, vocab, size, rng.randint(2, 5))
    backgrounds = _two_backgrounds(rng)
    image = scene_image(rng, size, shapes, backgrounds)
    largest = max(shapes, key=lambda s: s.radius)
    asked = rng.choice(shapes)
    question, answer = rng.choice((
        ("Describe the shapes in this picture.",
         f"On a background that fades from {backgrounds[0]} to {backgrounds[1]} there "
         f"{'is' if len(shapes) == 1 else 'are'} {_plural(len(shapes), 'shape')}: "
         f"{_join([s.phrase() for s in shapes])}."),
        (f"What color is the {asked.kind} {PLACES[asked.cell]}?", f"The {asked.kind} {PLACES[asked.cell]} is "
                                                                  f"{asked.color}."),
        ("How many shapes are there, and which one is the largest?",
         f"There are {_plural(len(shapes), 'shape')}; the largest is {largest.phrase()}."),
    ))
    return _turns([image], question, answer), None


def multi_image(rng: random.Random, vocab: Vocabulary) -> Generated:
    if rng.random() < 0.5:  # which picture has the most shapes
        counts = rng.sample(range(1, 6), rng.choice((2, 3)))
        sizes = [rng.choice(_SCENE_SIZES[:6]) for _ in counts]
        layouts = [layout_shapes(rng, vocab, size, n) for size, n in zip(sizes, counts)]
        images = [scene_image(rng, size, shapes, _two_backgrounds(rng)) for size, shapes in zip(sizes, layouts)]
        most = counts.index(max(counts))
        ordinals = ("first", "second", "third")
        others = _join([f"the {ordinals[i]} has {n}" for i, n in enumerate(counts) if i != most])
        question = f"Here are {len(counts)} images. Which one contains the most shapes?"
        answer = f"The {ordinals[most]} image has the most shapes, {max(counts)}: " \
                 f"{_join([s.phrase() for s in layouts[most]])}. {others[0].upper()}{others[1:]}."
        return _turns(images, question, answer), None
    size = rng.choice(_SCENE_SIZES[:6])  # the same scene twice with one shape recoloured
    shapes = layout_shapes(rng, vocab, size, rng.randint(2, 4))
    backgrounds = _two_backgrounds(rng)
    old = rng.choice(shapes)
    taken = {(s.kind, s.color) for s in shapes}
    new_color = rng.choice([c for k, c in vocab.shape_pairs if k == old.kind and (k, c) not in taken])
    recoloured = [Shape(s.kind, new_color, s.cell, s.center, s.radius) if s is old else s for s in shapes]
    state = rng.getstate()
    before = scene_image(rng, size, shapes, backgrounds)
    rng.setstate(state)  # the same background and noise in both pictures: only the shape differs
    after = scene_image(rng, size, recoloured, backgrounds)
    question = "What is different between these two images?"
    answer = f"The {old.kind} {PLACES[old.cell]} is {old.color} in the first image and {new_color} in the second; " \
             "everything else is the same."
    return _turns([before, after], question, answer), None


# A moving shape's path: start and end cell (PLACES index), and the corners a still shape may sit in.
_PATHS = {(3, 5): (0, 2, 6, 8), (5, 3): (0, 2, 6, 8), (1, 7): (0, 2, 6, 8), (7, 1): (0, 2, 6, 8),
          (0, 8): (2, 6), (8, 0): (2, 6), (2, 6): (0, 8), (6, 2): (0, 8)}
_VIDEO_SIZES = ((320, 240), (384, 288), (448, 256), (256, 256), (480, 360))


def video(rng: random.Random, vocab: Vocabulary) -> Generated:
    size = rng.choice(_VIDEO_SIZES)
    width, height = size
    frame_count = rng.randint(4, 8)
    fps = rng.choice((1, 2, 4))
    packing = rng.choice((1, 2, 3))
    timestamps = [i / fps for i in range(frame_count)]
    backgrounds = _two_backgrounds(rng)
    background = gradient(rng, size, *backgrounds)
    kind, color = rng.choice(vocab.shape_pairs)
    radius = min(width, height) * rng.uniform(0.1, 0.16)
    duration = timestamps[-1]
    seconds = f"{duration:g} second" + ("" if duration == 1 else "s")
    frames = []
    if rng.random() < 0.7:
        (start, end), corners = rng.choice(sorted(_PATHS.items()))
        still = None
        if rng.random() < 0.6:
            still_kind, still_color = rng.choice([(k, c) for k, c in vocab.shape_pairs if k != kind and c != color])
            cell = rng.choice(corners)
            still = Shape(still_kind, still_color, cell, ((cell % 3 + 0.5) * width / 3, (cell // 3 + 0.5) * height / 3),
                          radius * 0.8)
        for i in range(frame_count):
            t = i / (frame_count - 1)
            cx = ((start % 3) * (1 - t) + (end % 3) * t + 0.5) * width / 3
            cy = ((start // 3) * (1 - t) + (end // 3) * t + 0.5) * height / 3
            frame = background.copy()
            draw = ImageDraw.Draw(frame)
            if still:
                draw_shape(draw, still)
            draw_shape(draw, Shape(kind, color, start, (cx, cy), radius))
            frames.append(frame)
        answer = f"{_article(color).capitalize()} {color} {kind} moves from {_place_noun(start)} to {_place_noun(end)} over {seconds}"
        answer += f", while {_article(still.color)} {still.color} {still.kind} stays {PLACES[still.cell]}." if still else "."
    else:
        grow = rng.random() < 0.5
        for i in range(frame_count):
            t = i / (frame_count - 1)
            scale = (0.5 + t) if grow else (1.5 - t)
            frame = background.copy()
            draw_shape(ImageDraw.Draw(frame), Shape(kind, color, 4, (width / 2, height / 2), radius * scale))
            frames.append(frame)
        answer = f"{_article(color).capitalize()} {color} {kind} in the center {'grows' if grow else 'shrinks'} steadily over {seconds}; " \
                 f"nothing else moves."
    question = rng.choice(("What happens in this video?", "Describe the motion in this clip."))
    groups = tuple(tuple(group) for group in temporal_ids(timestamps, packing))
    return _turns(frames, question, answer), groups


def text_chat(rng: random.Random, vocab: Vocabulary) -> Generated:
    style = rng.choice(("shopping", "sorting", "train", "minutes", "zh-shopping", "zh-sorting", "zh-meeting"))
    if style == "shopping":
        person = rng.choice(vocab.people)
        (_, plural, price), count = rng.choice(vocab.products), rng.randint(2, 9)
        extra = rng.randint(1, 4)
        return [
            {"role": "user", "content": f"{person} buys {count} {plural} at {_money(price)} each. "
                                        "How much does that cost in total?"},
            {"role": "assistant", "content": f"{count} x {_money(price)} = {_money(count * price)}, so {person} "
                                             f"pays {_money(count * price)}."},
            {"role": "user", "content": f"And if {person} buys {extra} more?"},
            {"role": "assistant", "content": f"{count + extra} x {_money(price)} = {_money((count + extra) * price)} "
                                             f"in total, {_money(extra * price)} more than before."},
        ], None
    if style == "sorting":
        numbers = rng.sample(range(1, 500), rng.randint(5, 9))
        person = rng.choice(vocab.people)
        return [{"role": "user", "content": f"{person} wrote down these numbers: {', '.join(map(str, numbers))}. "
                                            "Sort them from smallest to largest."},
                {"role": "assistant", "content": ", ".join(map(str, sorted(numbers)))}], None
    if style == "train":
        origin, destination = rng.sample(vocab.cities, 2)
        hour, minute = rng.randint(5, 20), rng.randrange(0, 60, 5)
        trip = rng.randint(35, 290)
        arrival = hour * 60 + minute + trip
        return [{"role": "user", "content": f"A train leaves {origin} at {hour}:{minute:02d} and the trip to "
                                            f"{destination} takes {_duration(trip)}. When does it arrive?"},
                {"role": "assistant", "content": f"It arrives in {destination} at {arrival // 60 % 24}:"
                                                 f"{arrival % 60:02d}."}], None
    if style == "minutes":
        hours, minutes = rng.randint(1, 9), rng.randint(1, 59)
        person = rng.choice(vocab.people)
        return [{"role": "user", "content": f"{person} worked for {_plural(hours, 'hour')} and "
                                            f"{_plural(minutes, 'minute')}. How many minutes is that?"},
                {"role": "assistant", "content": f"{hours} x 60 + {minutes} = {hours * 60 + minutes}, so {person} "
                                                 f"worked {hours * 60 + minutes} minutes."}], None
    if style == "zh-shopping":
        person = rng.choice(vocab.people_zh)
        (name, price), count = rng.choice(vocab.products_zh), rng.randint(2, 9)
        return [{"role": "user", "content": f"{person}买了{count}份{name}，每份{price}元，一共要付多少钱？"},
                {"role": "assistant",
                 "content": f"{count} × {price} = {count * price}，一共要付{count * price}元。"}], None
    if style == "zh-sorting":
        numbers = rng.sample(range(1, 1000), rng.randint(5, 8))
        person = rng.choice(vocab.people_zh)
        listed = "、".join(map(str, numbers))
        return [{"role": "user", "content": f"{person}记下了这些数字：{listed}。请从大到小排列。"},
                {"role": "assistant", "content": "从大到小依次是：" + "、".join(map(str, sorted(numbers, reverse=True)))
                                                 + "。"}], None
    city = rng.choice(vocab.cities_zh)
    hour, minute, length = rng.randint(8, 16), rng.choice((0, 10, 15, 20, 30, 45)), rng.choice((40, 50, 75, 90, 120))
    end = hour * 60 + minute + length
    return [{"role": "user", "content": f"{city}的会议{hour}点{minute:02d}分开始，开{length}分钟，几点结束？"},
            {"role": "assistant", "content": f"会议在{end // 60}点{end % 60:02d}分结束。"}], None


GENERATORS: dict[str, Callable[[random.Random, Vocabulary], Generated]] = {
    "document-en": document_en, "document-zh": document_zh, "table": table, "chart-bar": chart_bar,
    "chart-line": chart_line, "scene": scene, "scene-wide": functools.partial(scene, sizes=_WIDE_SIZES),
    "scene-tall": functools.partial(scene, sizes=_TALL_SIZES), "multi-image": multi_image, "video": video,
    "text": text_chat,
}
