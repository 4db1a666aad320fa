"""Image processor for MiniCPM-V 2.6 / 4.0 / 4.5, matching the official remote-code ``image_processing_minicpmv.py``.

The model was trained on exactly these pixels and token layouts, so every step reproduces the official arithmetic
rather than an "equivalent" one: LLaVA-UHD slicing with Python ``round``/``int`` truncation on Python floats, BICUBIC
resizes, ``x / 255`` then ``(x - mean) / std`` in float32, and the patch-row layout that the navit SigLIP expects.
A different rounding choice moves a resize by 14 pixels and changes the number of vision tokens.

Sizes are PIL ``(width, height)``; grids are ``[cols, rows]``; ``tgt_sizes`` rows are ``(h_patches, w_patches)``.
"""

from __future__ import annotations

import json
import math
from itertools import chain
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from mcq.errors import McqError

CONFIG_NAME = "preprocessor_config.json"

# Keys of the official preprocessor_config.json that carry settings (auto_map is remote-code plumbing, not a setting).
_SETTING_KEYS = (
    "max_slice_nums",
    "scale_resolution",
    "patch_size",
    "image_feature_size",
    "slice_mode",
    "use_image_id",
    "norm_mean",
    "norm_std",
    "version",
    "im_start",
    "im_end",
    "slice_start",
    "slice_end",
    "unk",
    "im_id_start",
    "im_id_end",
)

Size = tuple[int, int]


class MiniCPMVImageProcessor:
    """Slices images into a source view plus a grid of tiles, normalises them and lays them out as patch rows."""

    def __init__(
        self,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        patch_size: int = 14,
        image_feature_size: int = 64,
        slice_mode: bool = True,
        use_image_id: bool = True,
        norm_mean: Sequence[float] = (0.5, 0.5, 0.5),
        norm_std: Sequence[float] = (0.5, 0.5, 0.5),
        version: float = 4.5,
        im_start: str = "<image>",
        im_end: str = "</image>",
        slice_start: str = "<slice>",
        slice_end: str = "</slice>",
        unk: str = "<unk>",
        im_id_start: str = "<image_id>",
        im_id_end: str = "</image_id>",
    ) -> None:
        for name, value in (
            ("max_slice_nums", max_slice_nums),
            ("scale_resolution", scale_resolution),
            ("patch_size", patch_size),
            ("image_feature_size", image_feature_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise McqError(f"image processor: {name} must be a positive integer, got {value!r}")
        for name, value in (("slice_mode", slice_mode), ("use_image_id", use_image_id)):
            if not isinstance(value, bool):
                raise McqError(f"image processor: {name} must be true or false, got {value!r}")
        for name, value in (("norm_mean", norm_mean), ("norm_std", norm_std)):
            if (
                not isinstance(value, (list, tuple))
                or len(value) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise McqError(f"image processor: {name} must be 3 numbers, got {value!r}")
        if not all(v != 0 for v in norm_std):
            raise McqError(f"image processor: norm_std must not contain 0, got {list(norm_std)!r}")
        for name, value in (
            ("im_start", im_start),
            ("im_end", im_end),
            ("slice_start", slice_start),
            ("slice_end", slice_end),
            ("unk", unk),
            ("im_id_start", im_id_start),
            ("im_id_end", im_id_end),
        ):
            if not isinstance(value, str) or not value:
                raise McqError(f"image processor: {name} must be a non-empty string, got {value!r}")
            setattr(self, name, value)

        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.image_feature_size = image_feature_size
        self.slice_mode = slice_mode
        self.use_image_id = use_image_id
        self.norm_mean = [float(v) for v in norm_mean]
        self.norm_std = [float(v) for v in norm_std]
        self.version = version

    # ------------------------------------------------------------------ config I/O

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "MiniCPMVImageProcessor":
        """Load ``preprocessor_config.json`` from a checkpoint directory; unknown keys (``auto_map``...) are ignored."""
        path = Path(directory) / CONFIG_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise McqError(f"cannot read image processor config {path}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise McqError(f"invalid JSON in {path}: {exc.msg} (line {exc.lineno})") from exc
        if not isinstance(data, dict):
            raise McqError(f"invalid image processor config {path}: expected a JSON object")
        try:
            return cls(**{key: data[key] for key in _SETTING_KEYS if key in data})
        except McqError as exc:
            raise McqError(f"{path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """The official preprocessor_config.json key set (without ``auto_map``, which only remote code needs)."""
        out: dict[str, Any] = {key: getattr(self, key) for key in _SETTING_KEYS}
        out["norm_mean"] = list(self.norm_mean)
        out["norm_std"] = list(self.norm_std)
        out["image_processor_type"] = "MiniCPMVImageProcessor"
        out["processor_class"] = "MiniCPMVProcessor"
        return out

    def to_json_string(self) -> str:
        # Sorted keys and a fixed indent make save -> load -> save byte-identical.
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``preprocessor_config.json`` into ``directory`` (created if needed); returns the file path."""
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json_string(), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ slicing (LLaVA-UHD)

    @staticmethod
    def ensure_divide(length: float, patch_size: int) -> int:
        """Nearest multiple of ``patch_size`` (at least one). Python ``round`` (half to even) as in the official code."""
        return max(round(length / patch_size) * patch_size, patch_size)

    def find_best_resize(
        self, original_size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool = False
    ) -> Size:
        """Keep the aspect ratio, bring the area to about ``scale_resolution**2``, snap both sides to the patch grid.

        The height is truncated first and the width derived from the truncated height; both with ``int``, on Python
        floats, exactly like the official code (that order decides which side loses a pixel).
        """
        width, height = original_size
        if width * height > scale_resolution * scale_resolution or allow_upscale:
            ratio = width / height
            height = int(scale_resolution / math.sqrt(ratio))
            width = int(height * ratio)
        return self.ensure_divide(width, patch_size), self.ensure_divide(height, patch_size)

    def get_refine_size(
        self,
        original_size: Size,
        grid: Sequence[int],
        scale_resolution: int,
        patch_size: int,
        allow_upscale: bool = False,
    ) -> Size:
        """Size of the image that is cut into ``grid`` tiles: one best-resized cell, multiplied by the grid."""
        width, height = original_size
        cols, rows = grid
        refine_width = self.ensure_divide(width, cols)
        refine_height = self.ensure_divide(height, rows)
        # True division on purpose: the cell size stays a float, as in the official code.
        cell_w, cell_h = self.find_best_resize(
            (refine_width / cols, refine_height / rows), scale_resolution, patch_size, allow_upscale=allow_upscale
        )
        return cell_w * cols, cell_h * rows

    def get_sliced_grid(self, image_size: Size, max_slice_nums: int, never_split: bool = False) -> list[int] | None:
        """``[cols, rows]`` whose aspect ratio is closest (in log space) to the image's, or None if not sliced."""
        width, height = image_size
        log_ratio = math.log(width / height)
        multiple = min(math.ceil(width * height / (self.scale_resolution * self.scale_resolution)), max_slice_nums)
        if multiple <= 1 or never_split:
            return None
        candidates: list[list[int]] = []
        for count in (multiple - 1, multiple, multiple + 1):
            if count == 1 or count > max_slice_nums:
                continue
            candidates.extend([m, count // m] for m in range(1, count + 1) if count % m == 0)
        best_grid: list[int] | None = None
        min_error = float("inf")
        for grid in candidates:
            error = abs(log_ratio - math.log(grid[0] / grid[1]))
            if error < min_error:  # strict: the first candidate wins a tie (e.g. [1, 2] over [2, 1] for a square)
                best_grid, min_error = grid, error
        return best_grid

    def split_to_patches(self, image: Image.Image, grid: Sequence[int]) -> list[list[Image.Image]]:
        """Crop ``image`` (already sized to a multiple of the grid) into rows of tiles, row-major."""
        width, height = image.size
        cols, rows = grid
        tile_w, tile_h = width // cols, height // rows
        return [
            [image.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h)) for c in range(cols)]
            for r in range(rows)
        ]

    def slice_image(
        self,
        image: Image.Image,
        max_slice_nums: int | None = None,
        scale_resolution: int | None = None,
        patch_size: int | None = None,
        never_split: bool = False,
    ) -> tuple[Image.Image, list[list[Image.Image]], list[int] | None]:
        """Return ``(source_image, tiles as rows of images, grid)``; tiles is empty and grid None when not sliced."""
        max_slice_nums = self._max_slices(max_slice_nums)
        scale_resolution = self.scale_resolution if scale_resolution is None else scale_resolution
        patch_size = self.patch_size if patch_size is None else patch_size
        original_size = image.size
        grid = self.get_sliced_grid(original_size, max_slice_nums, never_split)
        if grid is None:
            # A single view: small images are upscaled so they still get ~scale_resolution**2 pixels.
            size = self.find_best_resize(original_size, scale_resolution, patch_size, allow_upscale=True)
            return image.resize(size, resample=Image.Resampling.BICUBIC), [], None
        # The overview is only ever downscaled; the detail comes from the tiles of the refined image.
        source_size = self.find_best_resize(original_size, scale_resolution, patch_size)
        source = image.resize(source_size, resample=Image.Resampling.BICUBIC)
        refine_size = self.get_refine_size(original_size, grid, scale_resolution, patch_size, allow_upscale=True)
        refined = image.resize(refine_size, resample=Image.Resampling.BICUBIC)
        return source, self.split_to_patches(refined, grid), grid

    def get_sliced_images(self, image: Image.Image, max_slice_nums: int | None = None) -> list[Image.Image]:
        """The slices of one image in model order: the source view, then the tiles row-major."""
        if not self.slice_mode:
            # Official behaviour: without slice mode the image goes in as is (no resize).
            return [image]
        source, tiles, _ = self.slice_image(image, max_slice_nums)
        return [source] + [tile for row in tiles for tile in row]

    # ------------------------------------------------------------------ placeholders

    def get_image_id_placeholder(self, image_idx: int = 0) -> str:
        return f"{self.im_id_start}{image_idx}{self.im_id_end}"

    def get_grid_placeholder(self, grid: Sequence[int] | None) -> str:
        """``rows`` lines of ``cols`` slice placeholders, joined by newlines; empty without a grid."""
        if grid is None:
            return ""
        cols, rows = grid
        one_slice = self.slice_start + self.unk * self.image_feature_size + self.slice_end
        return "\n".join(one_slice * cols for _ in range(rows))

    def get_slice_image_placeholder(
        self,
        image_size: Size,
        image_idx: int = 0,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
    ) -> str:
        """The text that replaces one ``(<image>./</image>)``: its ``<unk>`` slots receive the resampler outputs."""
        max_slice_nums = self._max_slices(max_slice_nums)
        use_image_id = self.use_image_id if use_image_id is None else bool(use_image_id)
        placeholder = self.im_start + self.unk * self.image_feature_size + self.im_end
        if use_image_id:
            placeholder = self.get_image_id_placeholder(image_idx) + placeholder
        if self.slice_mode:
            # Recomputed from the original size, so it always agrees with what slice_image produces.
            placeholder += self.get_grid_placeholder(self.get_sliced_grid(image_size, max_slice_nums))
        return placeholder

    # ------------------------------------------------------------------ pixels

    def normalize(self, image: Image.Image) -> np.ndarray:
        """RGB image -> float32 ``[3, H, W]``: ``x / 255`` then ``(x - mean) / std``.

        Kept as two float32 steps (not one fused affine map) so the values are bit-identical to the official
        ``astype(float32) / 255`` followed by transformers' ``normalize``. Both act on each byte alone, so they are
        computed once for the 256 values of each channel and looked up (a fifth of the time on 448 x 448 images).
        """
        array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        levels = np.arange(256, dtype=np.uint8)[:, None].astype(np.float32) / 255
        table = (levels - np.asarray(self.norm_mean, dtype=np.float32)) / np.asarray(self.norm_std, dtype=np.float32)
        return np.stack([table[array[..., channel], channel] for channel in range(3)])

    def reshape_by_patch(self, image: np.ndarray) -> np.ndarray:
        """``[C, H, W]`` -> ``[C, p, N*p]``: the N = (H//p)*(W//p) patches, raster order, side by side in one row.

        Same layout as the official ``unfold(p, p)`` -> ``[C*p*p, N]`` -> ``[C, p, p, N]`` -> permute ``[C, p, N, p]``;
        element ``[c, i, n*p + j]`` is pixel ``[c, (n // (W//p))*p + i, (n % (W//p))*p + j]``. A partial border
        (H or W not a multiple of p) is dropped, as unfold does.
        """
        p = self.patch_size
        channels, height, width = image.shape
        hp, wp = height // p, width // p
        blocks = image[:, : hp * p, : wp * p].reshape(channels, hp, p, wp, p)
        return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3, 4).reshape(channels, p, hp * wp * p))

    # ------------------------------------------------------------------ one sample

    def preprocess(
        self,
        images: Image.Image | Sequence[Image.Image],
        max_slice_nums: int | None = None,
        temporal_ids: Sequence[Sequence[int]] | Sequence[int] | None = None,
    ) -> dict[str, Any]:
        """Process the images of ONE sample.

        Returns ``pixel_values`` (float32 ``[3, p, N*p]`` per slice), ``image_sizes`` (original ``(w, h)``),
        ``tgt_sizes`` (int64 ``[n_slices, 2]`` of ``(h_patches, w_patches)``), ``temporal_ids`` (one list per
        resampler item) and ``skip_image_idx`` (images whose placeholders must be removed from the text).

        With ``temporal_ids`` (video), the images are frames split into consecutive groups such as
        ``[[0, 1, 2], [5, 6]]`` (a flat list of ints is one group). The frames of a group share one placeholder:
        for each slice index their slices are emitted consecutively, and the resampler packs them into one item.
        """
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images)
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise McqError(f"image {index} is a {type(image).__name__}, expected a PIL image")
        images = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        max_slice_nums = self._max_slices(max_slice_nums)

        slices: list[np.ndarray] = []
        out_temporal_ids: list[list[int]] = []
        skip_image_idx: list[int] = []
        if temporal_ids is None:
            for image in images:
                slices.extend(self.normalize(s) for s in self.get_sliced_images(image, max_slice_nums))
            out_temporal_ids = [[-1] for _ in slices]
        else:
            groups = self._check_temporal_ids(temporal_ids, len(images))
            start = 0
            for group in groups:
                frames = images[start : start + len(group)]
                per_frame = [
                    [self.normalize(s) for s in self.get_sliced_images(frame, max_slice_nums)] for frame in frames
                ]
                counts = {len(frame_slices) for frame_slices in per_frame}
                if len(counts) != 1:
                    raise McqError(
                        f"frames {start}..{start + len(group) - 1} of temporal group {group} are sliced into "
                        f"different numbers of slices {sorted(counts)}; give the frames of a group the same size "
                        "or use max_slice_nums=1"
                    )
                for slice_index in range(counts.pop()):
                    slices.extend(frame_slices[slice_index] for frame_slices in per_frame)
                    out_temporal_ids.append(list(group))
                # Only the first frame of a group keeps its placeholder: the group yields one set of query tokens.
                skip_image_idx.extend(range(start + 1, start + len(group)))
                start += len(group)

        p = self.patch_size
        return {
            "pixel_values": [torch.from_numpy(self.reshape_by_patch(s)) for s in slices],
            "image_sizes": [image.size for image in images],
            "tgt_sizes": torch.tensor([[s.shape[1] // p, s.shape[2] // p] for s in slices], dtype=torch.int64).reshape(
                -1, 2
            ),
            "temporal_ids": out_temporal_ids,
            "skip_image_idx": skip_image_idx,
        }

    __call__ = preprocess

    # ------------------------------------------------------------------ helpers

    def _max_slices(self, max_slice_nums: int | None) -> int:
        value = self.max_slice_nums if max_slice_nums is None else max_slice_nums
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise McqError(f"max_slice_nums must be a positive integer, got {value!r}")
        return value

    @staticmethod
    def _check_temporal_ids(temporal_ids: Sequence[Any], n_images: int) -> list[list[int]]:
        """Normalise to a list of non-empty int groups whose total length is the number of frames."""
        if isinstance(temporal_ids, (list, tuple)) and temporal_ids and all(
            isinstance(t, int) and not isinstance(t, bool) for t in temporal_ids
        ):
            temporal_ids = [temporal_ids]
        if not isinstance(temporal_ids, (list, tuple)) or not all(
            isinstance(group, (list, tuple))
            and group
            and all(isinstance(t, int) and not isinstance(t, bool) for t in group)
            for group in temporal_ids
        ):
            raise McqError(f"temporal_ids must be a list of non-empty lists of ints, got {temporal_ids!r}")
        n_ids = len(list(chain.from_iterable(temporal_ids)))
        if n_ids != n_images:
            raise McqError(f"temporal_ids hold {n_ids} frame ids but {n_images} images were given; they must match")
        return [list(group) for group in temporal_ids]
