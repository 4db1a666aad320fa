"""Video input for 4.5: frames sampled at a fixed rate, their timestamps turned into temporal ids and grouped.

The official recipe (MiniCPM-V 4.5 README): a frame's temporal id is its timestamp on a 0.1 s grid divided by
0.1; consecutive ids are packed `packing` at a time (1-6; 3 by default), each pack sharing one block of 64 tokens.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from mcq.errors import McqError

TIME_SCALE = 0.1
MAX_PACKING = 6
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def temporal_ids(timestamps: list[float], packing: int) -> list[list[int]]:
    if not 1 <= packing <= MAX_PACKING:
        raise McqError(f"packing must be between 1 and {MAX_PACKING}, got {packing}")
    ids = [int(round(t / TIME_SCALE)) for t in timestamps]
    return [ids[i : i + packing] for i in range(0, len(ids), packing)]


def frames_from_dir(directory: str | Path, fps: float) -> tuple[list[Image.Image], list[float]]:
    """A folder of frame images in name order, taken `fps` per second."""
    directory = Path(directory)
    if not directory.is_dir():
        raise McqError(f"frames directory {directory} does not exist")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise McqError(f"{directory} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if fps <= 0:
        raise McqError(f"fps must be positive, got {fps}")
    return [open_image(p) for p in files], [i / fps for i in range(len(files))]


def frames_from_video(path: str | Path, fps: float, max_frames: int = 180) -> tuple[list[Image.Image], list[float]]:
    """Decode a video file with PyAV (`pip install av`), keeping one frame every 1/fps seconds."""
    try:
        import av
    except ImportError:
        raise McqError("reading a video file needs PyAV: pip install av (or pass --frames DIR)") from None
    path = Path(path)
    if not path.is_file():
        raise McqError(f"video file {path} does not exist")
    frames, stamps, next_time = [], [], 0.0
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                if frame.time is None or frame.time + 1e-9 < next_time:
                    continue
                frames.append(frame.to_image().convert("RGB"))
                stamps.append(frame.time)
                next_time += 1 / fps
                if len(frames) >= max_frames:
                    break
    except av.FFmpegError as err:
        raise McqError(f"cannot decode {path}: {err}") from None
    if not frames:
        raise McqError(f"{path} has no decodable video frames")
    return frames, stamps


def open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise McqError(f"cannot read image {path}: {err}") from None
