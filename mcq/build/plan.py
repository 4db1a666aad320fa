"""Build plans (YAML): which variants `mcq build` makes from one calibration, and how each is gated.

Schema (every key is checked; an unknown key, a wrong type or a bad value is an `McqError` naming it):

    name: default                         # default: the file name without .yaml
    description: one line
    calibration: {num_samples: 64, max_slice_nums: 2}   # the one set every calibrated variant reads
    validate:                             # `mcq validate` settings for every variant
      num_samples: null                   # null: the whole held-out split
      max_slice_nums: 2
      max_new_tokens: 24
      latency_runs: 3
      fail_if: ["kl_mean>0.1"]            # default gates, per variant overridable
    variants:                             # name → one step; built in this order
      awq:
        quantize: {method: awq}           # or {recipe: NAME|PATH}: mcq quantize
      onnx-int4:
        export: {format: onnx, precision: int4, from: awq}   # mcq export; `from` names an earlier variant
        fail_if: ["kl_mean>0.1"]          # replaces validate.fail_if for this variant
        versions: ["2.6", "4.5"]          # MiniCPM-V versions it applies to (default: all that have its format)

A variant's format (what `--only` and the CI matrix select by) is `compressed-tensors` or `bitsandbytes` for a
quantize step, and the export's format otherwise. A release mcq writes no such format for
(`mcq.models.families.FAMILY_FORMATS`) is left out of a variant's default versions, and naming it is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mcq.errors import McqError
from mcq.models.families import FORMATS, RELEASES, formats_of

# The options each export format takes in a plan, as `mcq export` names them (minus the leading dashes).
EXPORT_OPTIONS = {"gguf": ("quant", "mmproj_quant", "imatrix", "from"), "onnx": ("precision", "block_size", "from"),
                  "coreml": ("target", "vision", "llm", "from")}
VALIDATE_DEFAULTS = {"num_samples": None, "max_slice_nums": 2, "max_new_tokens": 24, "latency_runs": 3,
                     "fail_if": []}
CALIBRATION_DEFAULTS = {"num_samples": 64, "max_slice_nums": 2}


@dataclass(frozen=True)
class Variant:
    name: str
    step: str                    # "quantize" or "export"
    options: dict[str, Any]      # the step's options (method/recipe, or format and export options)
    fail_if: tuple[str, ...]
    versions: tuple[str, ...]

    @property
    def format(self) -> str:
        return _format_of(self.step, self.options)

    @property
    def source(self) -> str | None:
        """The variant whose weights this one exports (`from`), if any."""
        return self.options.get("from")

    def to_dict(self) -> dict[str, Any]:
        return {self.step: dict(self.options), "fail_if": list(self.fail_if), "versions": list(self.versions)}


@dataclass(frozen=True)
class Plan:
    name: str
    description: str
    calibration: dict[str, int]
    validate: dict[str, Any]
    variants: tuple[Variant, ...]
    text: str = field(repr=False, default="")

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def select(self, only: list[str] | tuple[str, ...] = (), version: str | None = None,
               with_sources: bool = True) -> list[Variant]:
        """The variants whose format or name is in `only` (all when empty) and that apply to `version`, in plan
        order; `with_sources`: and the earlier variants they export from (what must be built for them)."""
        unknown = [o for o in only if o not in FORMATS and o not in {v.name for v in self.variants}]
        if unknown:
            raise McqError(f"--only {unknown[0]}: not a format ({', '.join(FORMATS)}) nor a variant of plan "
                           f"{self.name} ({', '.join(v.name for v in self.variants)})")
        wanted = {v.name for v in self.variants if (not only or v.format in only or v.name in only)
                  and (version is None or version in v.versions)}
        for variant in reversed(self.variants):
            if with_sources and variant.name in wanted and variant.source:
                wanted.add(variant.source)
        return [v for v in self.variants if v.name in wanted]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "calibration": dict(self.calibration),
                "validate": dict(self.validate), "variants": {v.name: v.to_dict() for v in self.variants}}


def load_plan(source: str | Path | None = None) -> Plan:
    """A plan file, or the built-in default plan when `source` is None or "default"."""
    if source is None or str(source) == "default":
        text, name = resources.files("mcq").joinpath("plans/default.yaml").read_text(encoding="utf-8"), "default"
    else:
        path = Path(source)
        if not path.is_file():
            raise McqError(f"plan {source} does not exist (pass a .yaml file, or omit --plan for the default)")
        text, name = path.read_text(encoding="utf-8"), path.stem
    from mcq.quantize.recipe import load_yaml

    data = load_yaml(text, f"plan {source or 'default'}")
    return _parse(data, name, text, str(source or "default"))


def _parse(data: Any, default_name: str, text: str, where: str) -> Plan:
    if not isinstance(data, dict):
        raise McqError(f"plan {where}: expected a mapping at the top level")
    _check_keys(data, ("name", "description", "calibration", "validate", "variants"), f"plan {where}")
    calibration = {**CALIBRATION_DEFAULTS, **_mapping(data.get("calibration") or {}, f"plan {where}: calibration")}
    _check_keys(calibration, tuple(CALIBRATION_DEFAULTS), f"plan {where}: calibration")
    for key, value in calibration.items():
        _positive(value, f"plan {where}: calibration.{key}")
    validate = {**VALIDATE_DEFAULTS, **_mapping(data.get("validate") or {}, f"plan {where}: validate")}
    _check_keys(validate, tuple(VALIDATE_DEFAULTS), f"plan {where}: validate")
    for key in ("max_slice_nums", "max_new_tokens", "latency_runs"):
        _positive(validate[key], f"plan {where}: validate.{key}")
    if validate["num_samples"] is not None:
        _positive(validate["num_samples"], f"plan {where}: validate.num_samples")
    validate["fail_if"] = list(_thresholds(validate["fail_if"], f"plan {where}: validate.fail_if"))
    variants_data = _mapping(data.get("variants"), f"plan {where}: variants")
    if not variants_data:
        raise McqError(f"plan {where}: variants: name at least one variant")
    variants: list[Variant] = []
    for name, spec in variants_data.items():
        variants.append(_variant(str(name), spec, [v.name for v in variants], tuple(validate["fail_if"]),
                                 f"plan {where}: variants.{name}"))
    return Plan(name=str(data.get("name") or default_name), description=str(data.get("description") or ""),
                calibration=calibration, validate=validate, variants=tuple(variants), text=text)


def _variant(name: str, spec: Any, earlier: list[str], default_gates: tuple[str, ...], where: str) -> Variant:
    from mcq.quantize.recipe import NAME_RE

    if not NAME_RE.fullmatch(name):
        raise McqError(f"{where}: a variant name is a folder name: letters, digits, '.', '_' and '-'")
    spec = _mapping(spec, where)
    _check_keys(spec, ("quantize", "export", "fail_if", "versions"), where)
    steps = [key for key in ("quantize", "export") if key in spec]
    if len(steps) != 1:
        raise McqError(f"{where}: give exactly one of quantize or export")
    step = steps[0]
    options = dict(_mapping(spec[step], f"{where}.{step}"))
    if step == "quantize":
        _check_keys(options, ("method", "recipe"), f"{where}.quantize")
        if ("method" in options) == ("recipe" in options):
            raise McqError(f"{where}.quantize: give method or recipe")
        from mcq.quantize.api import resolve_recipe

        resolve_recipe(options.get("method"), options.get("recipe"))   # an unknown method or recipe fails now
    else:
        fmt = options.get("format")
        if fmt not in EXPORT_OPTIONS:
            raise McqError(f"{where}.export.format: choose one of {', '.join(EXPORT_OPTIONS)}")
        _check_keys(options, ("format", *EXPORT_OPTIONS[fmt]), f"{where}.export")
        source = options.get("from")
        if source is not None and source not in earlier:
            raise McqError(f"{where}.export.from: {source!r} is not a variant listed before {name}")
        _check_export(fmt, options, f"{where}.export")
    fmt = _format_of(step, options)
    versions = spec.get("versions", [release for release in RELEASES if fmt in formats_of(release)])
    if not isinstance(versions, list) or not versions or any(str(v) not in RELEASES for v in versions):
        raise McqError(f"{where}.versions: a list of MiniCPM-V versions among {', '.join(RELEASES)}")
    lacking = [str(v) for v in versions if fmt not in formats_of(str(v))]
    if lacking:
        raise McqError(f"{where}.versions: mcq writes no {fmt} for MiniCPM-V {lacking[0]} yet")
    gates = _thresholds(spec["fail_if"], f"{where}.fail_if") if "fail_if" in spec else default_gates
    return Variant(name=name, step=step, options=options, fail_if=tuple(gates),
                   versions=tuple(str(v) for v in versions))


def export_call(fmt: str):
    """The export function of a format (`mcq export --format FMT`)."""
    if fmt == "gguf":
        from mcq.export.gguf import export_gguf as function
    elif fmt == "onnx":
        from mcq.export.onnx import export_onnx as function
    else:
        from mcq.export.coreml import export_coreml as function
    return function


def export_arguments(options: dict[str, Any]) -> dict[str, Any]:
    """A plan step's export options as keyword arguments of the export function."""
    return {("from_dir" if key == "from" else key): value for key, value in options.items() if key != "format"}


def _check_export(fmt: str, options: dict[str, Any], where: str) -> None:
    """The option values an export would refuse, refused when the plan is read (the API's defaults fill in the
    options the plan leaves out)."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(export_call(fmt)).parameters.items()}
    given = {**defaults, **export_arguments(options)}
    try:
        if fmt == "gguf":
            from mcq.export.gguf.writer import check_type

            check_type(str(given["quant"]), "quant")
            check_type(str(given["mmproj_quant"]), "mmproj_quant")
            if given["imatrix"] not in ("auto", "none"):
                raise McqError("imatrix: auto or none (the build computes the importance matrix once)")
        elif fmt == "onnx":
            from mcq.export.onnx.quantize import check_options

            check_options(given["precision"], given["block_size"], given["algorithm"],
                          from_quantized=given["from_dir"] is not None)
        else:
            from mcq.export.coreml.api import check_options

            check_options(given["target"], given["vision"], given["llm"])
    except McqError as err:
        raise McqError(f"{where}: {err}") from None


def _thresholds(value: Any, where: str) -> tuple[str, ...]:
    from mcq.validate.api import parse_threshold

    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise McqError(f"{where}: a list of expressions like 'kl_mean>0.05'")
    return tuple(parse_threshold(item).expression for item in value)


def _format_of(step: str, options: dict[str, Any]) -> str:
    if step == "export":
        return options["format"]
    method = options.get("method") or ""
    if method.startswith("bnb") or (options.get("recipe") and _recipe_method(options["recipe"]) == "bnb"):
        return "bitsandbytes"
    return "compressed-tensors"


def _recipe_method(recipe: str) -> str:
    from mcq.quantize.recipe import load_recipe

    return load_recipe(recipe).method


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise McqError(f"{where}: expected a mapping")
    return value


def _check_keys(mapping: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = [str(key) for key in mapping if key not in allowed]
    if unknown:
        raise McqError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")


def _positive(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise McqError(f"{where}: must be a positive integer")
