"""The model families mcq supports, their releases and their components: what the CLI, the build plans and recipe
validation read, importable without torch or transformers. Each family's folder holds its facts: its components as
data (`components.yaml`), the rest beside it (for the resampler family, `minicpmv/versions.py`, whose entries tests
check against this list)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib import resources
from types import MappingProxyType

# family package (under mcq/models) → its releases, as config.json's `version` names them
FAMILIES: dict[str, tuple[str, ...]] = {"minicpmv": ("2.6", "4.0", "4.5"), "minicpmv4_6": ("4.6",)}

RELEASES: tuple[str, ...] = tuple(version for versions in FAMILIES.values() for version in versions)

# The formats mcq writes: `mcq quantize`'s two (by method) and `mcq export --format`'s three.
FORMATS: tuple[str, ...] = ("compressed-tensors", "bitsandbytes", "gguf", "onnx", "coreml")

# family → the formats mcq writes for it: what a build plan builds, and the CI matrix has a job for, per release
# (a family added with fewer formats lists those, and plans leave the others out for its releases).
FAMILY_FORMATS: dict[str, tuple[str, ...]] = {"minicpmv": FORMATS, "minicpmv4_6": FORMATS}


def family_of(release: str) -> str | None:
    """The family package that holds `release` (normalized, "4.5"), None for one mcq does not support."""
    return next((family for family, releases in FAMILIES.items() if release in releases), None)


def formats_of(release: str) -> tuple[str, ...]:
    """The formats mcq writes for `release` (a supported one)."""
    return FAMILY_FORMATS[family_of(release)]


# The releases mcq writes every format for: `mcq make-tiny`'s default is the newest.
COMPLETE_RELEASES: tuple[str, ...] = tuple(r for r in RELEASES if formats_of(r) == FORMATS)


@cache
def family_components(family: str) -> Mapping[str, tuple[str, ...]]:
    """Component → state-dict prefixes of `family`, in data-flow order (its folder's `components.yaml`, read as a
    file: importing the resampler family's package would import transformers)."""
    import yaml

    text = resources.files(__package__).joinpath(family, "components.yaml").read_text(encoding="utf-8")
    return MappingProxyType({component: tuple(prefixes) for component, prefixes in yaml.safe_load(text).items()})


@cache
def component_prefixes() -> tuple[tuple[str, str], ...]:
    """Every family's (prefix, component), longest prefix first. Names of different families never share a prefix
    (`vpm.`/`resampler.`/`llm.` against `model.`/`lm_head`), so one table answers for a name of any family, and a
    component nested in another's prefix (4.6's `vit_merger` inside its vision tower) wins over the outer one."""
    return tuple(sorted(((prefix, component) for family in FAMILIES
                         for component, prefixes in family_components(family).items() for prefix in prefixes),
                        key=lambda entry: -len(entry[0])))


@cache
def component_names() -> tuple[str, ...]:
    """Every family's component names (what a recipe rule's `component:` may say)."""
    return tuple(dict.fromkeys(component for family in FAMILIES for component in family_components(family)))


def in_data_flow_order(components: set[str]) -> list[str]:
    """One model's `components` in its family's data-flow order (the first family that has them all), names of no
    family's components sorted after them."""
    known = set(components) & set(component_names())
    order = next((list(family_components(family)) for family in FAMILIES
                  if known <= family_components(family).keys()), [])
    return [c for c in order if c in components] + sorted(set(components) - set(order))
