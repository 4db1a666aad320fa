"""The model families mcq supports and their releases, by name only: what the CLI and the build plans offer as
choices, importable without torch or transformers. Each family's folder holds its facts (for the resampler family,
`minicpmv/versions.py`, whose entries tests check against this list)."""

from __future__ import annotations

# family package (under mcq/models) → its releases, as config.json's `version` names them
FAMILIES: dict[str, tuple[str, ...]] = {"minicpmv": ("2.6", "4.0", "4.5")}

RELEASES: tuple[str, ...] = tuple(version for versions in FAMILIES.values() for version in versions)
