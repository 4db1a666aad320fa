"""Reading `mcq validate` results files and combining several into one.

The rule for combining: the combined results must be something a single `mcq validate` run could have written.
So every file must name the same reference model and eval set and have been measured with the same settings and
package versions (otherwise their numbers do not belong in one table), and a variant may appear only once. The
reference is the exception: every run measures it as its first variant, so the first file's measurement of it is
kept and the others are dropped (noted in the report).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcq.errors import McqError
from mcq.validate.results import FORMAT

# Sections that must agree between files, and what a disagreement means to the user.
_MUST_AGREE = (("eval", "were evaluated on different eval sets"),
               ("settings", "were measured with different settings"),
               ("versions", "were measured with different package versions"))
_OBJECT_KEYS = ("reference", "eval", "settings", "versions")
# Settings that change no measurement: gates are checked per variant (its "thresholds"), so runs gated differently
# still combine, and the combined settings list every gate.
_GATE_SETTINGS = ("fail_if",)
_IGNORED = {("settings", key) for key in _GATE_SETTINGS}
_VARIANT_OBJECTS = ("metrics", "spread", "components", "kl_by_kind")


@dataclass(frozen=True)
class Combined:
    results: dict[str, Any]      # in FORMAT, with the variants of every file (the reference once, first)
    sources: tuple[str, ...]     # the input files' names, in order
    notes: tuple[str, ...]       # what combining decided (which file the reference's numbers come from)


def load_results(path: Path) -> dict[str, Any]:
    """One results file, checked enough that reporting it cannot fail on a missing key or a wrong type."""
    path = Path(path)
    if not path.is_file():
        raise McqError(f"results file {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        # NaN/Infinity are not JSON (mcq validate writes null for a missing metric): refuse them rather than
        # print "nan" in a table and break the ranking.
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise McqError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise McqError(f"{path} is not an mcq validate result (format {FORMAT!r} expected, found {found!r})")
    for key in _OBJECT_KEYS:
        if not isinstance(data.get(key), dict):
            raise McqError(f"{path}: '{key}' must be an object")
    for key in ("name", "path"):
        if not isinstance(data["reference"].get(key), str):
            raise McqError(f"{path}: reference '{key}' must be a string")
    variants = data.get("variants")
    if not isinstance(variants, list) or not variants:
        raise McqError(f"{path} has no variants")
    for number, variant in enumerate(variants, 1):
        _check_variant(path, number, variant)
    return data


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_variant(path: Path, number: int, variant: Any) -> None:
    where = f"{path}: variant {number}"
    if not isinstance(variant, dict):
        raise McqError(f"{where} must be an object")
    for key in ("name", "path"):
        if not isinstance(variant.get(key), str):
            raise McqError(f"{where}: '{key}' must be a string")
    if variant.get("status") not in ("ok", "failed"):
        raise McqError(f"{where} ({variant['name']}): status must be 'ok' or 'failed', got {variant.get('status')!r}")
    for key in _VARIANT_OBJECTS:
        if not isinstance(variant.get(key, {}), dict):
            raise McqError(f"{where} ({variant['name']}): '{key}' must be an object")
    for key, value in variant.get("metrics", {}).items():
        if not _is_number_or_none(value):
            raise McqError(f"{where} ({variant['name']}): metric '{key}' must be a number or null, got {value!r}")
    # `passed` is null when the threshold's metric does not apply to the run (it then passes none and fails none).
    if not isinstance(variant.get("thresholds", []), list) or not all(
            isinstance(t, dict) and isinstance(t.get("expression"), str)
            and (t.get("passed") is None or isinstance(t.get("passed"), bool))
            and _is_number_or_none(t.get("value")) for t in variant.get("thresholds", [])):
        raise McqError(f"{where} ({variant['name']}): 'thresholds' must be a list of "
                       "{expression, value, passed} objects")
    values = {"kl_vision_path": variant.get("kl_vision_path"),
              **{f"kl_by_kind.{kind}": value for kind, value in variant.get("kl_by_kind", {}).items()}}
    for key, value in values.items():
        if not _is_number_or_none(value):
            raise McqError(f"{where} ({variant['name']}): '{key}' must be a number or null, got {value!r}")
    for section, fields in (("spread", ("median", "min", "max", "runs")),
                            ("components", ("bytes", "params", "bits_per_weight"))):
        for name, entry in variant.get(section, {}).items():
            if not isinstance(entry, dict) or not all(_is_number_or_none(entry.get(f)) for f in fields):
                raise McqError(f"{where} ({variant['name']}): {section} '{name}' must map "
                               f"{', '.join(fields)} to numbers or null")


def _is_number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def reference_row(results: dict[str, Any]) -> dict[str, Any] | None:
    """The reference's own row: mcq validate writes it first (its checkpoint served by another runtime, `NAME
    (vllm)`, is a variant like any other); None when no file measured it."""
    variants = results["variants"]
    return variants[0] if variants and variants[0]["path"] == results["reference"]["path"] else None


def combine_results(paths: list[Path]) -> Combined:
    """Load every file and merge them into one results object (see the module docstring for the rules)."""
    if not paths:
        raise McqError("no results files given")
    loaded = [(Path(p), load_results(p)) for p in paths]
    first_path, first = loaded[0]
    reference: dict | None = None
    reference_from = None
    others: list[dict] = []
    seen: dict[str, Path] = {}
    for path, data in loaded:
        if path != first_path:
            _check_agreement(first_path, first, path, data)
        own_reference = reference_row(data)
        for variant in data["variants"]:
            if variant is own_reference:
                if reference is None:
                    reference, reference_from = variant, path
                continue
            if variant["name"] in seen:
                raise McqError(f"variant {variant['name']} ({variant['path']}) is in both {seen[variant['name']]} "
                               f"and {path}; pass only one result for it")
            seen[variant["name"]] = path
            others.append(variant)
    notes = []
    if reference is not None and len(loaded) > 1:
        notes.append(f"the reference was measured in each results file; its numbers here are from "
                     f"{reference_from.name}")
    results = {key: first[key] for key in ("format", *_OBJECT_KEYS)}
    results["settings"] = {**first["settings"], **{key: sorted({gate for _, data in loaded
                                                                for gate in data["settings"].get(key) or []})
                                                   for key in _GATE_SETTINGS}}
    seconds = [data.get("seconds") for _, data in loaded]
    if None not in seconds and all(_is_number_or_none(t) for t in seconds):
        results["seconds"] = round(sum(seconds), 1)  # the validation time of every run together
    results["variants"] = ([reference] if reference is not None else []) + others
    return Combined(results=results, sources=tuple(p.name for p, _ in loaded), notes=tuple(notes))


def _check_agreement(first_path: Path, first: dict, path: Path, data: dict) -> None:
    ours, theirs = first["reference"], data["reference"]
    if (ours["name"], ours["path"]) != (theirs["name"], theirs["path"]):
        raise McqError(f"{first_path} and {path} have different reference models ({ours['name']} at {ours['path']} "
                       f"vs {theirs['name']} at {theirs['path']}); report them separately")
    for key, meaning in _MUST_AGREE:
        differing = sorted(k for k in first[key].keys() | data[key].keys()
                           if first[key].get(k) != data[key].get(k) and (key, k) not in _IGNORED)
        if differing:
            detail = ", ".join(f"{k}: {first[key].get(k)!r} vs {data[key].get(k)!r}" for k in differing)
            raise McqError(f"{first_path} and {path} {meaning} ({detail}); report them separately")
