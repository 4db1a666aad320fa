"""Tiny MiniCPM-V checkpoints in the exact official on-disk layout, built locally (no download): `tiny:VERSION`
names one, built on first use and cached. Each family writes its own (`Family.write_tiny`: the resampler family's
`minicpmv/tiny.py`, 4.6's `minicpmv4_6/tiny.py`); this module holds what every family shares: the spec, the atomic
output, the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from mcq import __version__
from mcq.errors import McqError
from mcq.outputs import source_digest, staged_output

from .families import RELEASES, family_of
from .minicpmv.versions import normalize_version

TINY_PREFIX = "tiny:"


@dataclass(frozen=True)
class TinySpec:
    version: str = "4.5"
    seed: int = 0
    outliers: bool = False
    real_widths: bool = False
    llm_layers: int | None = None      # None: the family's default (2, or 4 for 4.6: both LLM layer kinds)
    vision_layers: int | None = None   # None: the family's default (2, or 3 for 4.6: layers around the vit_merger)
    real_vocab: bool = False

    def cache_key(self) -> str:
        """The spec and the source of the code that builds the checkpoint: a change to the generator or to the
        model's layout must not be answered with a stale cached build of the same version number."""
        blob = json.dumps({**asdict(self), "mcq": __version__, "code": source_digest("models")}, sort_keys=True)
        return f"{self.version}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def add_outliers(model, seed: int, norms: tuple[str, ...], offset=lambda norm: 0.0) -> None:
    """Give 2 input channels of each norm whose name ends in one of `norms` (those that feed Linears) a 20-50x
    gain, seeded, so reproducible: the activation outliers that make calibration-aware quantization beat
    round-to-nearest (`tiny:VERSION-outliers`). `offset(norm)`: what the norm adds to its stored weight before
    scaling (1 for a norm that scales by 1 + weight, as Qwen3.5's RMSNorm does), so the gain is on the scale it
    computes with."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for norm in [m for name, m in model.named_modules() if name.endswith(norms)]:
            channels = torch.randperm(norm.weight.numel(), generator=generator)[:2]
            gains = 20 + 30 * torch.rand(2, generator=generator)
            shift = offset(norm)
            if shift:
                scale = shift + norm.weight[channels].float()
                norm.weight[channels] = (scale * gains - shift).to(norm.weight.dtype)
            else:
                norm.weight[channels] *= gains.to(norm.weight.dtype)


def make_tiny(out: str | Path, spec: TinySpec, force: bool = False) -> Path:
    """Write a tiny checkpoint to `out` (atomically: built in a staging dir, then renamed into place)."""
    from .family import family_for

    family = family_of(spec.version)
    if family is None:
        raise McqError(f"no tiny model for version {spec.version}; choose one of {', '.join(RELEASES)}")
    out = Path(out)
    with staged_output(out, force) as staging:
        family_for(family).write_tiny(staging, spec)
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("MCQ_CACHE", Path.home() / ".cache" / "mcq"))


def resolve_tiny(name: str) -> Path:
    """`tiny:4.5` (or `tiny:4.5-outliers`) → a cached generated checkpoint, built on first use."""
    body = name[len(TINY_PREFIX):]
    version, _, variant = body.partition("-")
    if variant not in ("", "outliers"):
        raise McqError(f"unknown tiny model {name!r}: use tiny:VERSION or tiny:VERSION-outliers")
    try:
        spec = TinySpec(version=normalize_version(version), outliers=variant == "outliers")
    except McqError:
        raise McqError(f"unknown tiny model {name!r}; versions: {', '.join(RELEASES)}") from None
    path = cache_dir() / "tiny" / spec.cache_key()
    if not (path / "config.json").exists():
        make_tiny(path, spec, force=True)
    return path
