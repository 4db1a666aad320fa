"""Calibration and evaluation samples from the user's own data.

`read_user_data(path)` accepts:

1. A JSONL file, or a folder holding exactly one `*.jsonl` file. Relative image, video and frame paths are resolved
   against the folder the JSONL file is in. Blank lines are skipped; every other line is one JSON object:

   - the conversation, under one of two keys:
     - `"messages"`: `[{"role": "user" | "assistant", "content": ...}, ...]`
     - `"conversations"`: the same list, or LLaVA/ShareGPT turns `{"from": "human" | "gpt", "value": ...}`
       (`"user"`/`"assistant"` are accepted as `from` values too, and `role`/`content` keys as in MiniCPM-V's
       fine-tuning data).
     A turn's content is a string, or a list of `{"type": "text", "text": ...}` / `{"type": "image"}` /
     `{"type": "video"}` items (the Hugging Face chat form). The first turn is the user's; assistant turns are
     text. A conversation that ends with an assistant turn is teacher-forced whole; one that ends with a user turn
     is prompt-only (see `Sample.has_answer`). System turns are refused: put the instruction in the first user turn.
   - images, optional: `"images": ["rel/path.png", ...]`, or `"image"`: one path, a list of paths, or MiniCPM-V's
     `{"<image_00>": "a.png", "<image_01>": "b.png"}` whose keys are the markers in the text.
     With a list, each `<image>` in the text (or `{"type": "image"}` item) takes the next image, and the count of
     markers must equal the count of images; with no marker at all, every image goes before the text of the first
     user turn (the LLaVA convention).
   - a video, optional, instead of images: `"video": "clip.mp4"` (decoded with PyAV) or `"frames": "dir"` (frame
     images in name order), with `"fps"` (default 1: frames per second kept from a video, or the rate at which the
     frames in the folder were taken) and `"packing"` (frames per 64-token block on 4.5, 1-6, default 3). The frames
     go where `<video>` is in the text, or before the first user turn's text.
   - any other key (`"id"`, ...) is ignored.

   The text around a marker is stripped of surrounding whitespace; the literal `(<image>./</image>)` placeholder is
   refused, since the processor would take it for an image.

2. A folder of images (searched recursively, hidden folders skipped) with no JSONL file: each image is a
   prompt-only sample asking `GENERIC_QUESTION`.

3. A folder written by `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: the "train" split, or the
   only split), with an `image` column (an image, a path or `{"bytes", "path"}`) or an `images` column (a list of
   those), and either a `messages` or `conversations` column (as above) or `question` and optional `answer`
   columns. Paths are resolved against the datasets folder.

Sample names are `user/<jsonl file>:<line>`, `user/<image path in the folder>` and `user/<datasets folder>[<row>]`.
Every line is checked when the data is read (JSON, roles, marker counts, that each file exists); images are decoded
only for the samples `load` is asked for, so an unreadable image is reported then, by name.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mcq.errors import McqError
from mcq.models.minicpmv.processing import IMAGE_MARKER
from mcq.models.minicpmv.video import (
    IMAGE_SUFFIXES,
    MAX_PACKING,
    frames_from_dir,
    frames_from_video,
    open_image,
    temporal_ids,
)

from .samples import Sample

GENERIC_QUESTION = "Describe this image in detail."
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


@dataclass(frozen=True)
class ImageSlot:
    """Where the `index`-th image of the entry goes; `index` None means "the next one in order"."""

    index: int | None = None


@dataclass(frozen=True)
class VideoSlot:
    """Where the frames of the entry's video go."""


Piece = str | ImageSlot | VideoSlot


@dataclass(frozen=True)
class VideoSource:
    path: Path
    is_video_file: bool  # a file decoded with PyAV, or a folder of frames
    fps: float
    packing: int


@dataclass(frozen=True)
class UserEntry:
    """One validated record: its turns with image/video slots, and where its pictures come from."""

    name: str
    where: str  # for error messages: "path/to/data.jsonl:12", "path/to/dataset row 3"
    turns: tuple[tuple[str, tuple[Piece, ...]], ...]
    # Files to open, or (for datasets folders) the raw column values, decoded on load.
    images: tuple[Any, ...] = ()
    video: VideoSource | None = None
    base: Path | None = None  # folder that relative paths in `images` are resolved against


class UserData:
    """The validated entries of one source; `load` turns chosen entries into samples."""

    def __init__(self, source: Path, entries: list[UserEntry], image_loader=None):
        if not entries:
            raise McqError(f"{source} holds no usable samples")
        self.source = source
        self.entries = entries
        # Datasets folders decode a row's images on demand; other sources list their files in the entries.
        self._image_loader = image_loader

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def load(self, indices: Iterable[int] | None = None) -> list[Sample]:
        chosen = range(len(self.entries)) if indices is None else indices
        return [self._sample(position, self.entries[position]) for position in chosen]

    def _sample(self, position: int, entry: UserEntry) -> Sample:
        raw_images = self._image_loader(position) if self._image_loader else entry.images
        images = [_decode_image(value, entry) for value in raw_images]
        turns = _place_images(entry.turns, len(images), entry.where) if self._image_loader else entry.turns
        frames, frame_ids = [], None
        if entry.video is not None:
            video = entry.video
            frames, stamps = (frames_from_video(video.path, video.fps) if video.is_video_file
                              else frames_from_dir(video.path, video.fps))
            frame_ids = tuple(tuple(group) for group in temporal_ids(stamps, video.packing))
        messages = []
        for role, pieces in turns:
            content: list = []
            for piece in pieces:
                if isinstance(piece, ImageSlot):
                    content.append(images[piece.index])
                elif isinstance(piece, VideoSlot):
                    content.extend(frames)
                else:
                    content.append(piece)
            text_only = all(isinstance(item, str) for item in content)
            messages.append({"role": role, "content": "\n".join(content) if text_only else content})
        return Sample(name=entry.name, kind="user", messages=tuple(messages), temporal_ids=frame_ids)


def read_user_data(path: str | Path) -> UserData:
    """Validate a JSONL file, an image folder or a saved datasets folder (see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise McqError(f"data {path} does not exist (calibration or eval data: a folder, a .jsonl file or a "
                       "saved datasets folder)")
    if path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise McqError(f"data {path} is a file but not .jsonl; pass a JSONL file, a folder of images "
                           "or a folder written by datasets' save_to_disk")
        return UserData(path, _read_jsonl(path))
    if (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                  and (path / "dataset_info.json").is_file()):
        return _read_datasets_folder(path)
    jsonl_files = sorted(path.glob("*.jsonl"))
    if len(jsonl_files) > 1:
        raise McqError(f"{path} holds {len(jsonl_files)} .jsonl files ({', '.join(p.name for p in jsonl_files)}); "
                       "pass the one to use")
    if jsonl_files:
        return UserData(jsonl_files[0], _read_jsonl(jsonl_files[0]))
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not images:
        raise McqError(f"{path} holds no .jsonl file and no images ({', '.join(sorted(IMAGE_SUFFIXES))}), and is not "
                       "a datasets folder")
    entries = [UserEntry(name=f"user/{image.relative_to(path).as_posix()}", where=str(image),
                         turns=(("user", (ImageSlot(0), GENERIC_QUESTION)),), images=(image,))
               for image in images]
    return UserData(path, entries)


def load_user_samples(path: str | Path) -> list[Sample]:
    """Every sample of a user data source, in order."""
    return read_user_data(path).load()


# -- JSONL ------------------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[UserEntry]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise McqError(f"{path} is not UTF-8 text: {err.reason} at byte {err.start}") from None
    except OSError as err:
        raise McqError(f"cannot read {path}: {err.strerror or err}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise McqError(f"{where}: not valid JSON: {err.msg} at column {err.colno}") from None
        if not isinstance(record, dict):
            raise McqError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
        entries.append(_entry_from_record(record, where, f"user/{path.name}:{number}", path.parent))
    if not entries:
        raise McqError(f"{path} holds no samples (every line is blank)")
    return entries


def _entry_from_record(record: dict, where: str, name: str, base: Path) -> UserEntry:
    images, markers = _image_references(record, where)
    turns = _parse_turns(_conversation(record, where), where, markers)
    video = _video_source(record, where, base)
    if video is not None and images:
        raise McqError(f"{where}: a line holds images or a video, not both")
    if video is not None:
        turns = _place_video(turns, where)
    elif any(isinstance(piece, VideoSlot) for _, pieces in turns for piece in pieces):
        raise McqError(f"{where}: the text has {VIDEO_TOKEN} but the line names no \"video\" or \"frames\"")
    files = []
    for reference in images:
        file = (base / reference).resolve() if not Path(reference).is_absolute() else Path(reference)
        if not file.is_file():
            raise McqError(f"{where}: image {reference} not found (looked for {file})")
        files.append(file)
    turns = _place_images(turns, len(files), where)
    return UserEntry(name=name, where=where, turns=turns, images=tuple(files), video=video, base=base)


def _image_references(record: dict, where: str) -> tuple[list[str], dict[str, int]]:
    """The image paths in order, and the named markers of MiniCPM-V's dict form ({"<image_00>": index})."""
    if "images" in record and "image" in record:
        raise McqError(f"{where}: give \"images\" or \"image\", not both")
    value = record.get("images", record.get("image"))
    if value is None:
        return [], {}
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise McqError(f"{where}: \"image\" as an object maps marker strings to image paths")
        return list(value.values()), {marker: i for i, marker in enumerate(value)}
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise McqError(f"{where}: \"images\" must be a list of image paths")
    return value, {}


def _conversation(record: dict, where: str) -> list:
    keys = [key for key in ("messages", "conversations") if key in record]
    if len(keys) != 1:
        raise McqError(f"{where}: needs exactly one of \"messages\" or \"conversations\"" +
                       (f", found {len(keys)}" if keys else ""))
    turns = record[keys[0]]
    if not isinstance(turns, list) or not turns:
        raise McqError(f"{where}: \"{keys[0]}\" must be a non-empty list of turns")
    return turns


def _parse_turns(raw_turns: Sequence, where: str, markers: dict[str, int]) -> tuple:
    pattern = re.compile("|".join(re.escape(m) for m in sorted([*(markers or [IMAGE_TOKEN]), VIDEO_TOKEN],
                                                                 key=len, reverse=True)))
    turns = []
    for number, turn in enumerate(raw_turns, 1):
        if not isinstance(turn, dict):
            raise McqError(f"{where}: turn {number} is not an object")
        role_value = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role_value == "system":
            raise McqError(f"{where}: turn {number} is a system turn; put the instruction in the first user turn")
        if not isinstance(role_value, str) or role_value not in _ROLES:
            raise McqError(f"{where}: turn {number} has role {role_value!r}; expected user/human or assistant/gpt")
        role = _ROLES[role_value]
        pieces = _content_pieces(content, where, number, pattern, markers)
        if number == 1 and role != "user":
            raise McqError(f"{where}: the first turn must be the user's")
        if role == "assistant" and any(not isinstance(piece, str) for piece in pieces):
            raise McqError(f"{where}: turn {number} is the assistant's and holds an image or video; answers are text")
        if not pieces:
            raise McqError(f"{where}: turn {number} is empty")
        turns.append((role, tuple(pieces)))
    return tuple(turns)


def _content_pieces(content: Any, where: str, number: int, pattern: re.Pattern, markers: dict[str, int]) -> list:
    if isinstance(content, str):
        items = [content]
    elif isinstance(content, list):
        items = content
    else:
        raise McqError(f"{where}: turn {number} needs content: a string or a list of typed items")
    pieces: list[Piece] = []
    for item in items:
        if isinstance(item, dict):
            kind = item.get("type")
            if kind == "image":
                pieces.append(ImageSlot())
                continue
            if kind == "video":
                pieces.append(VideoSlot())
                continue
            if kind != "text" or not isinstance(item.get("text"), str):
                raise McqError(f"{where}: turn {number} has an item {item!r}; expected {{\"type\": \"text\", "
                               f"\"text\": ...}}, {{\"type\": \"image\"}} or {{\"type\": \"video\"}}")
            item = item["text"]
        if not isinstance(item, str):
            raise McqError(f"{where}: turn {number} has content of type {type(item).__name__}")
        if IMAGE_MARKER in item:
            raise McqError(f"{where}: turn {number} contains {IMAGE_MARKER}; mark images with {IMAGE_TOKEN}")
        position = 0
        for match in pattern.finditer(item):
            pieces.append(item[position:match.start()])
            token = match.group()
            pieces.append(VideoSlot() if token == VIDEO_TOKEN else ImageSlot(markers.get(token)))
            position = match.end()
        pieces.append(item[position:])
    return [piece.strip() if isinstance(piece, str) else piece for piece in pieces
            if not isinstance(piece, str) or piece.strip()]


def _place_images(turns: tuple, count: int, where: str) -> tuple:
    """Number the `ImageSlot`s in order (or put every image first in the first user turn when the text has no
    marker), checking that markers and images agree."""
    slots = [piece for _, pieces in turns for piece in pieces if isinstance(piece, ImageSlot)]
    if not slots:
        if not count:
            return turns
        (role, pieces), rest = turns[0], turns[1:]
        return ((role, (*(ImageSlot(i) for i in range(count)), *pieces)), *rest)
    named = [slot.index for slot in slots if slot.index is not None]
    if named:  # MiniCPM-V's {"<image_00>": path} form: each key must appear
        missing = sorted(set(range(count)) - set(named))
        if missing or len(named) != len(slots):
            raise McqError(f"{where}: image markers and the \"image\" object disagree: every key must appear in the "
                           "text and no plain <image> marker may be used")
        return turns
    if len(slots) != count:
        raise McqError(f"{where}: the text has {len(slots)} image markers but the line names {count} images")
    numbered, next_index = [], 0
    for role, pieces in turns:
        placed = []
        for piece in pieces:
            if isinstance(piece, ImageSlot):
                piece, next_index = ImageSlot(next_index), next_index + 1
            placed.append(piece)
        numbered.append((role, tuple(placed)))
    return tuple(numbered)


def _place_video(turns: tuple, where: str) -> tuple:
    slots = sum(isinstance(piece, VideoSlot) for _, pieces in turns for piece in pieces)
    if slots > 1:
        raise McqError(f"{where}: the text has {slots} {VIDEO_TOKEN} markers; a line holds one video")
    if slots == 1:
        return turns
    (role, pieces), rest = turns[0], turns[1:]
    return ((role, (VideoSlot(), *pieces)), *rest)


def _video_source(record: dict, where: str, base: Path) -> VideoSource | None:
    if "video" in record and "frames" in record:
        raise McqError(f"{where}: give \"video\" or \"frames\", not both")
    key = "video" if "video" in record else "frames" if "frames" in record else None
    if key is None:
        for option in ("fps", "packing"):
            if option in record:
                raise McqError(f"{where}: \"{option}\" is for video, but the line has no \"video\" or \"frames\"")
        return None
    reference = record[key]
    if not isinstance(reference, str):
        raise McqError(f"{where}: \"{key}\" must be a path")
    fps, packing = record.get("fps", 1.0), record.get("packing", 3)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0:
        raise McqError(f"{where}: \"fps\" must be a positive number, got {fps!r}")
    if isinstance(packing, bool) or not isinstance(packing, int) or not 1 <= packing <= MAX_PACKING:
        raise McqError(f"{where}: \"packing\" must be an integer from 1 to {MAX_PACKING}, got {packing!r}")
    path = (base / reference).resolve() if not Path(reference).is_absolute() else Path(reference)
    if key == "video" and not path.is_file():
        raise McqError(f"{where}: video {reference} not found (looked for {path})")
    if key == "frames" and not path.is_dir():
        raise McqError(f"{where}: frames folder {reference} not found (looked for {path})")
    return VideoSource(path=path, is_video_file=key == "video", fps=float(fps), packing=packing)


# -- images -----------------------------------------------------------------------------------------------------


def _decode_image(value: Any, entry: UserEntry) -> Image.Image:
    """A file path, or a datasets value: a PIL image, a path, or {"bytes", "path"}."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("bytes"):
        try:
            with Image.open(io.BytesIO(value["bytes"])) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as err:
            raise McqError(f"{entry.where}: cannot decode image {value.get('path') or '(bytes)'}: {err}") from None
    if isinstance(value, dict) and value.get("path"):
        value = value["path"]
    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_absolute() and entry.base is not None:
            path = entry.base / path
        if not path.is_file():
            raise McqError(f"{entry.where}: image {value} not found (looked for {path})")
        return open_image(path)
    raise McqError(f"{entry.where}: an image value must be an image, a path or {{\"bytes\", \"path\"}}, got "
                   f"{type(value).__name__}")


# -- datasets folders -------------------------------------------------------------------------------------------


def _read_datasets_folder(directory: Path) -> UserData:
    try:
        import datasets
    except ImportError:
        raise McqError(f"{directory} is a datasets folder; reading it needs: pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(directory))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise McqError(f"cannot load the datasets folder {directory}: {err}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise McqError(f"{directory} holds splits {', '.join(loaded)} and none is \"train\"; save one split")
    columns = loaded.column_names
    image_column = next((c for c in ("images", "image") if c in columns), None)
    if image_column is None:
        raise McqError(f"{directory}: no \"image\" or \"images\" column (columns: {', '.join(columns)})")
    if "messages" in columns or "conversations" in columns:
        text_columns = ["messages" if "messages" in columns else "conversations"]
    elif "question" in columns:
        text_columns = ["question", *(["answer"] if "answer" in columns else [])]
    else:
        raise McqError(f"{directory}: needs a \"messages\" or \"conversations\" column, or \"question\" (and "
                       f"\"answer\") columns (columns: {', '.join(columns)})")
    # Only the text columns are read here; images are decoded on load, for the rows that are used.
    rows = loaded.select_columns(text_columns).to_list()
    entries = []
    for index, row in enumerate(rows):
        where = f"{directory} row {index}"
        if "question" in row:
            if not isinstance(row["question"], str) or not row["question"].strip():
                raise McqError(f"{where}: \"question\" must be a non-empty string")
            turns_raw = [{"role": "user", "content": row["question"]}]
            if row.get("answer") is not None:
                if not isinstance(row["answer"], str):
                    raise McqError(f"{where}: \"answer\" must be a string")
                turns_raw.append({"role": "assistant", "content": row["answer"]})
        else:
            turns_raw = row[text_columns[0]]
            if not isinstance(turns_raw, list) or not turns_raw:
                raise McqError(f"{where}: \"{text_columns[0]}\" must be a non-empty list of turns")
            # Arrow stores typed content items as structs with every field, so an image item has "text": None.
            turns_raw = [_drop_null_fields(turn) for turn in turns_raw]
        turns = _parse_turns(turns_raw, where, {})
        if any(isinstance(piece, VideoSlot) for _, pieces in turns for piece in pieces):
            raise McqError(f"{where}: video in datasets folders is not supported; use a JSONL file with \"video\"")
        entries.append(UserEntry(name=f"user/{directory.name}[{index}]", where=where, turns=turns,
                                 base=directory))

    def row_images(position: int) -> list:
        value = loaded[position][image_column]
        if image_column == "image":
            return [] if value is None else [value]
        return list(value or [])

    return UserData(directory, entries, image_loader=row_images)


def _drop_null_fields(turn: Any) -> Any:
    if not isinstance(turn, dict):
        return turn
    cleaned = {key: value for key, value in turn.items() if value is not None}
    if isinstance(cleaned.get("content"), list):
        cleaned["content"] = [{key: value for key, value in item.items() if value is not None}
                              if isinstance(item, dict) else item for item in cleaned["content"]]
    return cleaned
