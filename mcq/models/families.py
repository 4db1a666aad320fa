"""The model families mcq supports and their releases, by name only: what the CLI and the build plans offer as
choices, importable without torch or transformers. Each family's folder holds its facts (for the resampler family,
`minicpmv/versions.py`, whose entries tests check against this list; for 4.6, `minicpmv4_6/`)."""

from __future__ import annotations

# family package (under mcq/models) → its releases, as config.json's `version` names them
FAMILIES: dict[str, tuple[str, ...]] = {"minicpmv": ("2.6", "4.0", "4.5"), "minicpmv4_6": ("4.6",)}

RELEASES: tuple[str, ...] = tuple(version for versions in FAMILIES.values() for version in versions)

# The releases every command and format of the default build plan supports: what `mcq build`, the CI matrix and
# `mcq make-tiny`'s default offer. 4.6 has a tiny model, `inspect` and RTN so far (issue 17).
BUILD_RELEASES: tuple[str, ...] = FAMILIES["minicpmv"]


def family_of(release: str) -> str | None:
    """The family package that holds `release` (normalized, "4.5"), None for one mcq does not support."""
    return next((family for family, releases in FAMILIES.items() if release in releases), None)
