"""Quantization recipes (YAML) and the per-layer plan a recipe gives on a model.

A recipe says what to quantize and how: the method, and per Linear the bits, group size, symmetry and what to do
when the group size does not divide the layer's input width (SigLIP's `mlp.fc2` has 4304 = 16 × 269 inputs).
`plan_quantization` turns it into one explicit decision per Linear, so engines, exporters and reports all act on
the same list instead of each re-matching patterns.

A rule selects Linears by component, by name pattern, or both (a Linear must then satisfy both). Components are
what each model family calls its parts (`mcq.models.families.component_names()`: vision, resampler, llm for
2.6-4.5; vision, vit_merger, merger, llm for 4.6), so one rule applies to every family that has the component.
Pattern syntax (`ignore` entries and rule `match`): a Python regular expression searched anywhere in the full
module name (`re.search`), so anchor with `^`/`$` where it matters (`^vpm\\.`, `(^|\\.)out_proj$`). A leading `re:`
is accepted with llm-compressor's meaning: the rest must match from the start of the name (`re.match`), so a
pattern copied from an llm-compressor recipe selects the same modules.

Schema (every key is checked; unknown keys, wrong types and bad values are an `McqError` naming the key):

    name: awq-w4g128            # default: the file name without .yaml
    description: one line       # default: ""
    method: awq                 # awq | gptq | rtn | bnb
    method_args: {}             # per method, see METHOD_ARGS (defaults filled in)
    calibration: {num_samples: 64, max_slice_nums: 2}   # awq/gptq only (defaults as shown); rtn/bnb are data-free
    ignore: []                  # patterns of Linears never quantized
    quantize_lm_head: false     # lm_head is kept unless this is true (and a rule matches it)
    target: vllm-gpu            # runtime(s) the output must load in (mcq.models.runtimes.RUNTIMES); default: the
                                # runtimes a user of the format serves with (DEFAULT_TARGETS)
    rules:                      # first match wins; Linears no rule matches are kept
      - component: [vision, vit_merger]   # a component or a list of them, and/or
        match: "mlp\\.fc2$"     # a name pattern; at least one of the two (both: a Linear must satisfy both)
        bits: 4                 # required: 4 or 8
        group_size: 128         # power of two >= 8, or "channel"; default 128      (not for bnb)
        symmetric: true         # default true                                     (not for bnb)
        non_divisible: fallback_group   # fallback_group | pad | per_channel | skip | error (not for bnb)

The plan applies the targets' rules per layer (`mcq.models.runtimes`): a module a target builds as something other
than a quantizable Linear stays dense (in its official names), zero points become symmetric where a target runs
none, a group a target does not run falls back through the rule's `non_divisible` policy (a smaller group, the MLP
padded, per channel). What no policy can fix (bits a target does not run, a fused group planned two ways) refuses
the recipe before any calibration, naming the layers, the rule and the runtime's reason.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import yaml

from mcq.errors import McqError
from mcq.models.runtimes import (BITSANDBYTES, COMPRESSED_TENSORS, DEFAULT_TARGETS, RUNTIMES, PlannedLayer, Runtime,
                                 kind_of, violations)

if TYPE_CHECKING:  # mcq.models.family imports torch; `mcq recipes` should not have to
    from mcq.models.family import LinearInfo

METHODS = ("awq", "gptq", "rtn", "bnb")
CALIBRATED_METHODS = ("awq", "gptq")
POLICIES = ("fallback_group", "pad", "per_channel", "skip", "error")
BITS = (4, 8)
DEFAULT_GROUP_SIZE = 128
# Below 8 columns a group's 16-bit scale weighs as much as its int4 codes, so fallback_group goes per channel there.
MIN_FALLBACK_GROUP = 8
RECIPE_SUFFIXES = (".yaml", ".yml")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ---------------------------------------------------------------------------------------------------- value checks
# Each returns the (normalised) value or raises ValueError with what the value must be.

def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a positive integer")
    return value


def _open_fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError("must be a number between 0 and 1 (exclusive)")
    return float(value)


def _non_negative(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError("must be a number >= 0")
    return float(value)


def _one_of(*choices: Any) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        # Compare types too: YAML's `1` must not pass for `true` (bool is an int in Python).
        if any(type(value) is type(choice) and value == choice for choice in choices):
            return value
        raise ValueError("must be one of " + ", ".join(_yaml_literal(c) for c in choices))

    return check


def _yaml_literal(value: Any) -> str:
    """A value as the user wrote it in YAML (true, null, 'text'); a dict lookup would turn 1 into true."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


_OBSERVER = _one_of("minmax", "mse")
# imatrix_mse weighs each input channel's rounding error by its calibration E[x²] (llama.cpp's importance matrix), so
# it needs calibration data: awq only (rtn is data-free).
_CALIBRATED_OBSERVER = _one_of("minmax", "mse", "imatrix_mse")

# method → key → (default, check). Defaults follow the libraries: llm-compressor's AWQModifier (duo_scaling=True,
# n_grid=20) and GPTQModifier (block_size=128, dampening_frac=0.01, actorder=static); awq ranges are min/max, what
# its scale search scores with (see recipes/awq-w4g128.yaml for the measured alternative); bnb's nf4 + double quant is QLoRA's best 4-bit setting.
METHOD_ARGS: dict[str, dict[str, tuple[Any, Callable[[Any], Any]]]] = {
    "awq": {"engine": ("mcq", _one_of("mcq", "llm-compressor")),
            "duo_scaling": (True, _one_of(True, False, "both")), "n_grid": (20, _positive_int),
            "weight_observer": ("minmax", _CALIBRATED_OBSERVER), "loss_tokens": (1024, _positive_int),
            "weight_clip": (True, _bool)},
    "gptq": {"block_size": (128, _positive_int), "dampening_frac": (0.01, _open_fraction),
             "actorder": ("static", _one_of("static", "group", "weight", None))},
    "rtn": {"weight_observer": ("minmax", _OBSERVER)},
    "bnb": {"quant_type": ("nf4", _one_of("nf4", "fp4")), "double_quant": (True, _bool),
            "compute_dtype": ("bfloat16", _one_of("bfloat16", "float16", "float32")),
            "int8_threshold": (6.0, _non_negative)},
}
# AWQ's scale search is mcq's (engine: mcq, mcq/quantize/awq.py) or llm-compressor's AWQModifier; these arguments
# only the named engine reads (given for the other, they are an error, not silently ignored).
AWQ_ENGINE_ARGS = {"loss_tokens": "mcq", "weight_clip": "mcq"}
# bitsandbytes has two unrelated code paths; an option of the other one would be silently ignored.
BNB_ARGS_BY_BITS = {4: ("quant_type", "double_quant", "compute_dtype"), 8: ("int8_threshold",)}
CALIBRATION_ARGS = {"num_samples": (64, _positive_int), "max_slice_nums": (2, _positive_int)}
TOP_LEVEL_KEYS = ("name", "description", "method", "method_args", "calibration", "ignore", "quantize_lm_head",
                  "target", "rules")
RULE_KEYS = ("component", "match", "bits", "group_size", "symmetric", "non_divisible", "method")
# A rule of a calibrated recipe may pick another calibrated-engine method for its layers (e.g. GPTQ rounding where
# AWQ has no smoothing partner); a data-free recipe stays data-free.
RULE_METHODS = {"awq": ("awq", "gptq", "rtn"), "gptq": ("awq", "gptq", "rtn"), "rtn": ("rtn",)}
BNB_RULE_KEYS = ("component", "match", "bits")


# ---------------------------------------------------------------------------------------------------- the recipe

@dataclass(frozen=True)
class NamePattern:
    """A module-name pattern as written in the recipe: a regex searched in the name, or `re:` + a regex matched
    from the start (llm-compressor's syntax)."""

    text: str
    regex: re.Pattern = field(repr=False, compare=False)
    from_start: bool = field(repr=False, compare=False)

    def matches(self, name: str) -> bool:
        return bool(self.regex.match(name) if self.from_start else self.regex.search(name))

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Rule:
    index: int  # 1-based position in `rules`, as messages and plan reasons name it
    pattern: NamePattern | None   # None: any name (the rule selects by component)
    bits: int
    group_size: int | None  # None = one scale per output channel
    symmetric: bool
    non_divisible: str
    method: str = ""  # the engine for this rule's layers (the recipe's method unless the rule names one)
    components: tuple[str, ...] = ()   # () = any component (the rule selects by name)

    def matches(self, name: str, component: str) -> bool:
        return ((self.pattern is None or self.pattern.matches(name))
                and (not self.components or component in self.components))

    def describe(self) -> str:
        # A name-only rule reads as before components existed: "rule 1 (^llm\.)".
        selectors = ([f"component: {', '.join(self.components)}"] if self.components else []) \
            + ([str(self.pattern)] if self.pattern is not None else [])
        return f"rule {self.index} ({'; '.join(selectors)})"


@dataclass(frozen=True)
class Calibration:
    num_samples: int
    max_slice_nums: int


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    method: str
    method_args: Mapping[str, Any]
    calibration: Calibration | None  # None for the data-free methods
    ignore: tuple[NamePattern, ...]
    quantize_lm_head: bool
    rules: tuple[Rule, ...]
    targets: tuple[str, ...] = ()   # the runtimes the output must load in (RUNTIMES names)
    source: str = field(default="", compare=False)  # "built-in" or the file it came from
    text: str = field(default="", compare=False, repr=False)  # the YAML as written, for `mcq recipes show`

    def to_dict(self) -> dict[str, Any]:
        """The validated recipe with every default filled in; parsing it again gives the same recipe."""
        rules = []
        for rule in self.rules:
            entry: dict[str, Any] = {}
            if rule.components:
                entry["component"] = list(rule.components)
            if rule.pattern is not None:
                entry["match"] = rule.pattern.text
            entry["bits"] = rule.bits
            if self.method != "bnb":
                entry.update(group_size="channel" if rule.group_size is None else rule.group_size,
                             symmetric=rule.symmetric, non_divisible=rule.non_divisible, method=rule.method)
            rules.append(entry)
        data: dict[str, Any] = {"name": self.name, "description": self.description, "method": self.method,
                                "method_args": dict(self.method_args)}
        if self.calibration is not None:
            data["calibration"] = {"num_samples": self.calibration.num_samples,
                                   "max_slice_nums": self.calibration.max_slice_nums}
        data.update(ignore=[p.text for p in self.ignore], quantize_lm_head=self.quantize_lm_head,
                    target=list(self.targets), rules=rules)
        return data

    @property
    def format(self) -> str:
        """The checkpoint format the recipe writes."""
        return recipe_format(self.method)

    def with_targets(self, targets: str | list[str], where: str = "--target") -> Recipe:
        """The same recipe planned for other runtimes (`mcq quantize --target`): a name, a comma-separated list
        or a list of names."""
        return replace(self, targets=_parse_targets(targets, self.method, where))


def recipe_format(method: str) -> str:
    return BITSANDBYTES if method == "bnb" else COMPRESSED_TENSORS


# ---------------------------------------------------------------------------------------------------- parsing

def parse_recipe(data: Any, where: str, default_name: str | None = None, *, source: str = "",
                 text: str = "") -> Recipe:
    """Validate a recipe mapping (as read from YAML). `where` starts every error message (a path or a name)."""
    if not isinstance(data, dict):
        raise McqError(f"{where}: a recipe must be a YAML mapping (name, method, rules, ...), got "
                       f"{type(data).__name__}")
    _no_unknown_keys(data, TOP_LEVEL_KEYS, where)

    name = data.get("name", default_name)
    if name is None:
        raise McqError(f"{where}: missing key 'name'")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise McqError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (starting with a letter "
                       f"or digit)")
    description = data.get("description", "")
    if not isinstance(description, str) or "\n" in description.strip():
        raise McqError(f"{where}: description must be one line of text")

    if "method" not in data:
        raise McqError(f"{where}: missing key 'method' (one of {', '.join(METHODS)})")
    method = data["method"]
    if method not in METHODS:
        raise McqError(f"{where}: unknown method {method!r}; methods: {', '.join(METHODS)}")

    rules = _parse_rules(data.get("rules"), method, where)
    method_args = _parse_method_args(data.get("method_args"), method, rules, where)
    calibration = _parse_calibration(data.get("calibration"), method, where)

    ignore = data.get("ignore", [])
    if ignore is None:
        ignore = []
    if not isinstance(ignore, list):
        raise McqError(f"{where}: ignore must be a list of module-name patterns")
    patterns = tuple(_pattern(p, f"{where}: ignore entry {i}") for i, p in enumerate(ignore, start=1))

    quantize_lm_head = _checked(data.get("quantize_lm_head", False), _bool, f"{where}: quantize_lm_head")
    targets = _parse_targets(data.get("target", list(DEFAULT_TARGETS[recipe_format(method)])), method,
                             f"{where}: target")
    return Recipe(name=name, description=description.strip(), method=method,
                  method_args=MappingProxyType(method_args), calibration=calibration, ignore=patterns,
                  quantize_lm_head=quantize_lm_head, rules=rules, targets=targets, source=source, text=text)


def _parse_targets(value: Any, method: str, where: str) -> tuple[str, ...]:
    """Runtime names (a name, a comma-separated string or a list), each one that reads the recipe's format."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise McqError(f"{where} must be a runtime name or a list of them; runtimes: {', '.join(RUNTIMES)}")
    fmt = recipe_format(method)
    targets = tuple(dict.fromkeys(n.strip() for n in names))
    for name in targets:
        if name not in RUNTIMES:
            raise McqError(f"{where}: unknown runtime {name!r}; runtimes: {', '.join(RUNTIMES)}")
        if fmt not in RUNTIMES[name].formats:
            readers = ", ".join(r.name for r in RUNTIMES.values() if fmt in r.formats)
            raise McqError(f"{where}: {name} does not read {fmt} checkpoints ({method} recipes write them); "
                           f"runtimes that do: {readers}")
    return targets


def _no_unknown_keys(mapping: dict, allowed: tuple[str, ...], where: str, why: str = "") -> None:
    for key in mapping:
        if key not in allowed:
            raise McqError(f"{where}: unknown key {key!r}{why}; allowed keys: {', '.join(allowed)}")


def _checked(value: Any, check: Callable[[Any], Any], where: str) -> Any:
    try:
        return check(value)
    except ValueError as err:
        raise McqError(f"{where} {err}, got {_yaml_literal(value)}") from None


def _pattern(text: Any, where: str) -> NamePattern:
    if not isinstance(text, str):
        raise McqError(f"{where}: a pattern must be a string (a regular expression), got {_yaml_literal(text)}")
    from_start = text.startswith("re:")
    body = text[3:] if from_start else text
    if not body:
        raise McqError(f"{where}: empty pattern; write '.' to match every module")
    try:
        regex = re.compile(body)
    except re.error as err:
        raise McqError(f"{where}: bad regular expression {text!r}: {err}") from None
    return NamePattern(text, regex, from_start)


def _parse_rules(rules: Any, method: str, where: str) -> tuple[Rule, ...]:
    if not isinstance(rules, list) or not rules:
        raise McqError(f"{where}: rules must be a non-empty list (each: match, bits, ...)")
    parsed = []
    for index, entry in enumerate(rules, start=1):
        at = f"{where}: rule {index}"
        if not isinstance(entry, dict):
            raise McqError(f"{at}: must be a mapping with keys {', '.join(RULE_KEYS)}")
        if method == "bnb":
            _no_unknown_keys(entry, BNB_RULE_KEYS, at, " (bnb quantizes blocks of 64 over the flattened weight: "
                                                       "no group size, always symmetric)")
        else:
            _no_unknown_keys(entry, RULE_KEYS, at)
        if "match" not in entry and "component" not in entry:
            raise McqError(f"{at}: missing key 'component' or 'match' (what the rule selects)")
        if "bits" not in entry:
            raise McqError(f"{at}: missing key 'bits'")
        bits = _checked(entry["bits"], _one_of(*BITS), f"{at}: bits")
        group_size = _group_size(entry.get("group_size", DEFAULT_GROUP_SIZE), at) if method != "bnb" else None
        parsed.append(Rule(
            index=index,
            pattern=_pattern(entry["match"], f"{at}: match") if "match" in entry else None,
            components=_components(entry["component"], f"{at}: component") if "component" in entry else (),
            bits=bits,
            group_size=group_size,
            symmetric=_checked(entry.get("symmetric", True), _bool, f"{at}: symmetric"),
            non_divisible=_checked(entry.get("non_divisible", "fallback_group"), _one_of(*POLICIES),
                                   f"{at}: non_divisible"),
            method=method if method == "bnb" else _checked(entry.get("method", method),
                                                           _one_of(*RULE_METHODS[method]), f"{at}: method"),
        ))
    if method == "bnb" and len({r.bits for r in parsed}) > 1:
        raise McqError(f"{where}: bnb quantizes the whole model at one width (load_in_4bit or load_in_8bit); "
                       f"the rules mix 4 and 8 bits")
    return tuple(parsed)


def _components(value: Any, at: str) -> tuple[str, ...]:
    """A component name or a list of them, each one some family's (`mcq.models.families`, no torch needed)."""
    from mcq.models.families import component_names

    names = [value] if isinstance(value, str) else value
    known = component_names()
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise McqError(f"{at} must be a component name or a list of them ({', '.join(known)}), got "
                       f"{_yaml_literal(value)}")
    for name in names:
        if name not in known:
            raise McqError(f"{at}: unknown component {name!r}; components: {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def _group_size(value: Any, at: str) -> int | None:
    if value == "channel":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_FALLBACK_GROUP \
            or value & (value - 1):
        # Powers of two are what kernels implement and what fallback_group steps down through.
        raise McqError(f"{at}: group_size must be a power of two >= {MIN_FALLBACK_GROUP} or \"channel\", "
                       f"got {_yaml_literal(value)}")
    return value


def _parse_method_args(args: Any, method: str, rules: tuple[Rule, ...], where: str) -> dict[str, Any]:
    at = f"{where}: method_args"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise McqError(f"{at} must be a mapping")
    spec = METHOD_ARGS[method]
    if method == "bnb":
        bits = rules[0].bits
        spec = {key: spec[key] for key in BNB_ARGS_BY_BITS[bits]}
        _no_unknown_keys(args, tuple(spec), at, f" (for {method} with {bits}-bit rules)")
    else:
        _no_unknown_keys(args, tuple(spec), at, f" (for {method})")
    values = {key: _checked(args[key], check, f"{at}: {key}") if key in args else default
              for key, (default, check) in spec.items()}
    if method == "awq":
        for key, engine in AWQ_ENGINE_ARGS.items():
            if values["engine"] != engine:
                if key in args:
                    raise McqError(f"{at}: {key} applies to engine {engine}, not {values['engine']}")
                del values[key]
    return values


def _parse_calibration(calibration: Any, method: str, where: str) -> Calibration | None:
    at = f"{where}: calibration"
    if method not in CALIBRATED_METHODS:
        if calibration is not None:
            raise McqError(f"{at}: {method} is data-free and takes no calibration; remove the section")
        return None
    if calibration is None:
        calibration = {}
    if not isinstance(calibration, dict):
        raise McqError(f"{at} must be a mapping")
    _no_unknown_keys(calibration, tuple(CALIBRATION_ARGS), at)
    values = {key: _checked(calibration[key], check, f"{at}: {key}") if key in calibration else default
              for key, (default, check) in CALIBRATION_ARGS.items()}
    return Calibration(**values)


# ---------------------------------------------------------------------------------------------------- loading

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML silently keeps the last one)."""


def _construct_unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(text: str, where: str) -> Any:
    """`text` parsed as YAML (safe tags only), a key given twice refused: a one-line `McqError` naming `where` and
    the line. Recipes and build plans are read with it."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise McqError(f"{where} is not valid YAML: {' '.join(str(problem).split())}{line}") from None


def _builtin_dir():
    return resources.files("mcq").joinpath("recipes")


def builtin_recipe_names() -> list[str]:
    """The recipes shipped in mcq/recipes/ (package data), sorted."""
    return sorted(entry.name.rsplit(".", 1)[0] for entry in _builtin_dir().iterdir()
                  if entry.is_file() and entry.name.endswith(".yaml"))


def is_recipe_path(name_or_path: str | Path) -> bool:
    """A path has a directory part or a .yaml/.yml suffix; anything else names a built-in recipe."""
    text = str(name_or_path)
    return isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(RECIPE_SUFFIXES)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (`awq-w4g128`) or a recipe file by path, validated."""
    if is_recipe_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise McqError(f"recipe file {path} does not exist")
        if not path.is_file():
            raise McqError(f"recipe {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise McqError(f"cannot read recipe file {path}: {err}") from None
        where, default_name, source = str(path), path.stem, str(path)
    else:
        name = str(name_or_path)
        names = builtin_recipe_names()
        if name not in names:
            raise McqError(f"unknown recipe {name!r}; built-in recipes: {', '.join(names)} "
                           f"(or give the path of a .yaml file)")
        text = _builtin_dir().joinpath(f"{name}.yaml").read_text(encoding="utf-8")
        where, default_name, source = f"built-in recipe {name}", name, "built-in"
    return parse_recipe(load_yaml(text, where), where, default_name, source=source, text=text)


def format_recipe_list(recipes: list[Recipe]) -> str:
    width = max([len("name")] + [len(r.name) for r in recipes])
    targets = {r.name: ",".join(r.targets) for r in recipes}
    target_width = max([len("target")] + [len(t) for t in targets.values()])
    lines = [f"{'name':<{width}}  {'method':<6}  {'target':<{target_width}}  description"]
    lines += [f"{r.name:<{width}}  {r.method:<6}  {targets[r.name]:<{target_width}}  {r.description}" for r in recipes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class LayerScheme:
    bits: int
    group_size: int | None  # None = per output channel (also bnb, whose blocks run over the flattened weight)
    symmetric: bool

    def _sort_key(self) -> tuple:
        return self.bits, self.group_size or 0, self.symmetric

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def describe(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


@dataclass(frozen=True)
class LayerPlan:
    name: str
    component: str
    in_features: int
    out_features: int
    scheme: LayerScheme | None  # None → kept in the source dtype
    reason: str  # why, for people: "rule 1 (^llm\.)", "ignored (lm_head)", "no rule matches", ...
    fallback: bool  # the plan differs from the rule as written (a non_divisible policy or a target's rule)
    rule: int | None = None  # the index of the rule that decided it (None: ignored or no rule matches)
    pad_to: int | None = None  # `pad`: the MLP's intermediate width after zero-padding (this layer's input width
    #                            for the down projection, its output width for the projections that feed it)
    kind: str = ""  # mcq.models.runtimes kind ("vision.mlp.fc2"); "" for a Linear the runtime table does not know
    mlp_role: str | None = None  # "consumer" / "producer" in its family's paddable MLP (which side pad_to widens)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "component": self.component, "kind": self.kind, "in_features": self.in_features,
                "out_features": self.out_features, "scheme": self.scheme.to_dict() if self.scheme else None,
                "reason": self.reason, "fallback": self.fallback, "rule": self.rule, "pad_to": self.pad_to}


def layer_pattern(name: str) -> str:
    """The name with layer indices replaced by `*` (one row per kind of layer in summaries)."""
    return re.sub(r"\.\d+\.", ".*.", name)


@dataclass(frozen=True)
class QuantPlan:
    recipe: Recipe
    layers: tuple[LayerPlan, ...]

    @property
    def targets(self) -> tuple[str, ...]:
        return self.recipe.targets

    def quantized(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.scheme is not None]

    def padded_widths(self) -> dict[str, int]:
        """Component → intermediate width after `pad` (components with no padded layer are absent)."""
        widths: dict[str, int] = {}
        for layer in self.layers:
            if layer.pad_to is not None:
                widths[layer.component] = max(widths.get(layer.component, 0), layer.pad_to)
        return widths

    def kept(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.scheme is None]

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def summary(self) -> dict[str, dict[str, int]]:
        """Per component (data-flow order): how many Linears are quantized, kept, and changed from their rule (by a
        non_divisible policy or a target's rules)."""
        from mcq.models.families import in_data_flow_order

        order = in_data_flow_order({layer.component for layer in self.layers})
        return {component: {
            "quantized": sum(1 for l in self.layers if l.component == component and l.scheme is not None),
            "kept": sum(1 for l in self.layers if l.component == component and l.scheme is None),
            "changed": sum(1 for l in self.layers if l.component == component and l.fallback),
        } for component in order}

    def schemes(self) -> dict[LayerScheme, list[str]]:
        """Quantized layer names per scheme, schemes sorted by (bits, group size with per-channel first, symmetric)
        and names in model order."""
        grouped: dict[LayerScheme, list[str]] = {}
        for layer in self.quantized():
            grouped.setdefault(layer.scheme, []).append(layer.name)
        return {scheme: grouped[scheme] for scheme in sorted(grouped, key=LayerScheme._sort_key)}

    def unused_rules(self) -> list[Rule]:
        """Rules that decided no layer (they match nothing, or only layers an earlier rule or `ignore` took)."""
        used = {layer.rule for layer in self.layers}
        return [rule for rule in self.recipe.rules if rule.index not in used]

    def decisions(self) -> list[dict[str, Any]]:
        """The plan in a few lines: one entry per decision (scheme and reason), in model order, with the kinds of
        layer it covers (`*` patterns), how many layers, and whether it differs from the rule as written."""
        grouped: dict[tuple, list[LayerPlan]] = {}
        for layer in self.layers:
            grouped.setdefault((layer.scheme, layer.reason), []).append(layer)
        return [{"layers": ", ".join(dict.fromkeys(layer_pattern(layer.name) for layer in members)),
                 "count": len(members), "scheme": scheme.describe() if scheme else "dense", "reason": reason,
                 "changed": members[0].fallback}
                for (scheme, reason), members in grouped.items()]

    def stored_layers(self) -> list[PlannedLayer]:
        """Every Linear as it is written: its scheme and its widths after padding."""
        stored = []
        for layer in self.layers:
            in_features, out_features = layer.in_features, layer.out_features
            if layer.pad_to is not None:
                if layer.mlp_role == "consumer":
                    in_features = layer.pad_to
                else:
                    out_features = layer.pad_to
            scheme = layer.scheme
            stored.append(PlannedLayer(layer.name, in_features, out_features, scheme.bits if scheme else None,
                                       scheme.group_size if scheme else None, scheme.symmetric if scheme else True))
        return stored

    def problems(self, runtime: str | Runtime) -> list[tuple[str, str]]:
        """(layer or fused group, why) for everything in the plan that `runtime` cannot hold; [] when it loads."""
        runtime = RUNTIMES[runtime] if isinstance(runtime, str) else runtime
        if self.recipe.format not in runtime.formats:
            return [("*", f"{runtime.name} does not read {self.recipe.format} checkpoints")]
        return violations(runtime, self.stored_layers())

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe.name, "method": self.recipe.method, "targets": list(self.targets),
                "summary": self.summary(), "layers": [layer.to_dict() for layer in self.layers]}


def is_lm_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "lm_head"


def dividing_groups(in_features: int, largest: int) -> list[int]:
    """Power-of-two group sizes from MIN_FALLBACK_GROUP to `largest` that divide `in_features`."""
    sizes, size = [], MIN_FALLBACK_GROUP
    while size <= largest:
        if in_features % size == 0:
            sizes.append(size)
        size *= 2
    return sizes


def plan_quantization(recipe: Recipe, linears: list[LinearInfo]) -> QuantPlan:
    """One decision per Linear: ignored → kept; else the first matching rule, fitted to the recipe's targets
    (module docstring), with its non_divisible policy applied when the group size does not divide in_features or
    a target does not run it. Refuses (McqError) what no policy fixes."""
    layers = _Planner(recipe, linears).plan()
    if not any(layer.scheme for layer in layers):
        patterns = ", ".join(dict.fromkeys(info.pattern for info in linears)) or "(none)"
        kept = list(dict.fromkeys(layer.reason for layer in layers if layer.rule))
        if kept:
            why = f"every Linear its rules match is kept ({'; '.join(kept[:3])})"
        else:
            why = "no rule matches a Linear that is not ignored"
        raise McqError(f"recipe {recipe.name} quantizes nothing on this model: {why}; the model's Linears: "
                       f"{patterns}")
    plan = QuantPlan(recipe, tuple(layers))
    problems = {name: found for name in recipe.targets if (found := plan.problems(name))}
    if problems:
        raise McqError(_target_refusal(plan, problems))
    return plan


class _Planner:
    """Fits each matched rule to the targets' rules (mcq.models.runtimes), in two passes: the first finds which
    MLPs must grow (`pad`) and to what multiple, the second plans every layer at the final widths."""

    def __init__(self, recipe: Recipe, linears: list[LinearInfo]):
        self.recipe, self.linears = recipe, linears
        self.roles = {info.name: info.mlp_role for info in linears}
        self.runtimes = [RUNTIMES[name] for name in recipe.targets]
        self.widths: dict[str, int] = {}     # component → intermediate width after padding
        self.pad_cause: dict[str, str] = {}  # layer → why it asked for padding, when a target's rule is the reason
        self.refused: list[LinearInfo] = []

    def plan(self) -> list[LayerPlan]:
        first = [self._layer(info) for info in self.linears]
        self.widths = self._padded_widths(first)
        if self.widths:
            self.refused = []
            first = [self._layer(info) for info in self.linears]
        if self.refused:
            raise McqError(_refusal_message(self.recipe, self.refused, self.linears))
        return first

    # -- roles inside a paddable MLP ---------------------------------------------------------------------------
    def _role(self, name: str) -> str | None:
        return self.roles.get(name)

    def _padded_widths(self, first: list[LayerPlan | None]) -> dict[str, int]:
        """Per component with a layer that asked for padding: the smallest width every quantized member fits (the
        down projection's group and the targets' width multiples all divide it), and the same for the MLPs derived
        from it (`PaddableMlp.derived_from`), at their ratio of that width."""
        mlps = {info.component: info.mlp for info in self.linears if info.mlp_role}
        derived = {component: mlp.derived_from for component, mlp in mlps.items() if mlp.derived_from}
        widths = {}
        for component in mlps:
            members = self._mlp_members(first, component)
            if component in derived or not any(layer.pad_to for layer, _ in members):
                continue
            width = self._mlp_width(component)
            followers = {}
            for follower in (name for name, source in derived.items() if source == component):
                ratio, rest = divmod(self._mlp_width(follower), width)
                if rest:
                    raise McqError(f"the {follower} MLP ({self._mlp_width(follower)} wide) cannot grow with the "
                                   f"{component} MLP ({width}): its width is not a multiple of it")
                followers[follower] = ratio
            # A constraint m on a follower's width r * W holds when W is a multiple of m / gcd(m, r).
            modulus = self._width_modulus(members, 1)
            for follower, ratio in followers.items():
                modulus = math.lcm(modulus, self._width_modulus(self._mlp_members(first, follower), ratio))
            widths[component] = -(-width // modulus) * modulus
            for follower, ratio in followers.items():
                widths[follower] = ratio * widths[component]
                for layer, _ in self._mlp_members(first, follower):
                    self.pad_cause[layer.name] = f"{ratio} x the {component} MLP's width, which grows"
        return widths

    def _mlp_width(self, component: str) -> int:
        """The intermediate width of `component`'s paddable MLP, as the model has it."""
        return next(info.in_features if info.mlp_role == "consumer" else info.out_features
                    for info in self.linears if info.component == component and info.mlp_role)

    def _mlp_members(self, first: list[LayerPlan | None], component: str) -> list[tuple[LayerPlan, str]]:
        """The planned layers of `component`'s paddable MLP, with their roles."""
        return [(layer, role) for layer in first
                if layer is not None and layer.component == component and (role := self._role(layer.name))]

    def _width_modulus(self, members: list[tuple[LayerPlan, str]], ratio: int) -> int:
        """What the width W of the source MLP must be a multiple of for these members, whose width is ratio x W."""
        modulus = 1
        for layer, role in members:
            if layer.scheme is None:
                continue   # a dense member grows with zeros and has no constraint
            needed = [layer.scheme.group_size] if role == "consumer" and layer.scheme.group_size else []
            for runtime in self.runtimes:
                holds = runtime.holds_for(layer.name)
                needed.append(holds.multiple_in if role == "consumer" else holds.multiple_out)
            for multiple in needed:
                modulus = math.lcm(modulus, multiple // math.gcd(multiple, ratio))
        return modulus

    # -- one layer ---------------------------------------------------------------------------------------------
    def _layer(self, info: LinearInfo) -> LayerPlan | None:
        """The layer's plan, or None (and the layer in `refused`) when the group size does not divide its width
        and the rule's policy allows nothing else."""
        recipe = self.recipe
        kind = kind_of(info.name)

        def kept(reason: str, *, fallback: bool = False, rule: int | None = None) -> LayerPlan:
            grown = self._grown(info)
            if grown:   # dense, but its MLP grows (the width comes from another layer's plan)
                reason, fallback = f"{reason}, {self._pad_text(info, info.mlp_role, None, grown)}", True
            return LayerPlan(info.name, info.component, info.in_features, info.out_features, None, reason, fallback,
                             rule, grown, kind.name if kind else "", info.mlp_role)

        if is_lm_head(info.name) and not recipe.quantize_lm_head:
            return kept("ignored (lm_head)")
        for pattern in recipe.ignore:
            if pattern.matches(info.name):
                return kept(f"ignored ({pattern})")
        rule = next((r for r in recipe.rules if r.matches(info.name, info.component)), None)
        if rule is None:
            return kept("no rule matches")
        holds = [(runtime, runtime.holds_for(info.name)) for runtime in self.runtimes]
        for runtime, held in holds:
            if held.dense_only:
                return kept(f"{rule.describe()}, kept dense for {runtime.name}: {held.why}", fallback=True,
                            rule=rule.index)
        notes: list[str] = []
        # bnb: blocks of 64 over the flattened weight, always symmetric: no groups, no width constraint.
        group = None if recipe.method == "bnb" else rule.group_size
        symmetric = rule.symmetric or recipe.method == "bnb"
        if not symmetric:
            lacking = [runtime.name for runtime, held in holds
                       if (rule.bits, False) not in held.schemes and (rule.bits, True) in held.schemes]
            if lacking:
                symmetric = True
                notes.append(f"symmetric: {' and '.join(lacking)} run{'s' if len(lacking) == 1 else ''} no zero "
                             f"points at {rule.bits} bits")
        role = self._role(info.name)
        width = self.widths.get(info.component)
        in_w = width if width and role == "consumer" else info.in_features
        out_w = width if width and role == "producer" else info.out_features

        def quantized(group_size: int | None, reason: str = "", *, pad_to: int | None = None) -> LayerPlan:
            texts = [*notes, reason] if reason else list(notes)
            if width and role and (in_w, out_w) != (info.in_features, info.out_features):
                texts.append(self._pad_text(info, role, group_size, width))
            return LayerPlan(info.name, info.component, info.in_features, info.out_features,
                             LayerScheme(rule.bits, group_size, symmetric),
                             ", ".join([rule.describe(), *texts]), bool(texts), rule.index,
                             pad_to or self._grown(info), kind.name if kind else "", info.mlp_role)

        def runs(group_size: int | None) -> bool:
            return (all(held.runs_group(group_size) for _, held in holds)
                    and (group_size is None or in_w % group_size == 0))

        shaped = all(in_w % held.multiple_in == 0 and out_w % held.multiple_out == 0 for _, held in holds)
        if runs(group) and shaped:
            return quantized(group)
        problem = self._problem(in_w, out_w, group, holds)
        policy = rule.non_divisible
        if policy == "skip":
            return kept(f"{rule.describe()}, skipped: {problem}", fallback=True, rule=rule.index)
        if policy == "fallback_group" and group is not None and shaped:
            smaller = [size for size in dividing_groups(in_w, group) if runs(size)]
            if smaller:
                size = smaller[-1]
                why = f"{in_w} = {size} × {in_w // size}" if in_w % group else problem
                return quantized(size, f"group {group} → {size}: {why}")
        grows = (role == "consumer" or (role == "producer" and runs(group) and not shaped)) \
            and not info.mlp.derived_from
        if policy in ("fallback_group", "pad") and grows and width is None:
            # Grow the MLP (exact): the largest group the targets run, and their width multiples, fit after it.
            pad_group = _largest_group_run(group, holds) if role == "consumer" else group
            if group is None or pad_group is not None:
                if not (policy == "pad" and pad_group == group and in_w % group):   # else: the rule asked for it
                    self.pad_cause[info.name] = self._pad_cause(in_w, out_w, group, holds)
                modulus = pad_group or 1
                for _, held in holds:
                    modulus = math.lcm(modulus, held.multiple_in if role == "consumer" else held.multiple_out)
                base = in_w if role == "consumer" else out_w
                return quantized(pad_group, pad_to=-(-base // modulus) * modulus)
        if policy in ("fallback_group", "per_channel") and runs(None) and shaped and group is not None:
            if policy == "fallback_group":
                why = (f"no power-of-two group >= {MIN_FALLBACK_GROUP} divides {in_w}"
                       if not dividing_groups(in_w, group) else problem)
            else:
                why = f"{in_w} not divisible by {group}" if in_w % group else problem
            return quantized(None, f"group {group} → per channel: {why}")
        if group is not None and in_w % group:
            self.refused.append(info)   # the engine cannot quantize a group that does not divide the width
            return None
        return quantized(group)   # holdable by mcq; plan.problems() names what a target lacks

    def _grown(self, info: LinearInfo) -> int | None:
        width = self.widths.get(info.component)
        return width if width and self._role(info.name) else None

    def _pad_cause(self, in_w: int, out_w: int, group: int | None, holds: list[tuple[Runtime, Any]]) -> str:
        """Why a target's rules make this layer's MLP grow."""
        for runtime, held in holds:
            for size, multiple, side in ((in_w, held.multiple_in, "input"), (out_w, held.multiple_out, "output")):
                if size % multiple:
                    return f"{runtime.name} needs {side} widths that are multiples of {multiple}, not {size}"
        if group is not None and in_w % group and dividing_groups(in_w, group):
            names = " and ".join(runtime.name for runtime, _ in holds)
            return f"no group ≤ {group} that {names} run{'s' if len(holds) == 1 else ''} divides {in_w}"
        return self._problem(in_w, out_w, group, holds)

    def _pad_text(self, info: LinearInfo, role: str, group_size: int | None, width: int) -> str:
        cause = self.pad_cause.get(info.name)
        if role == "consumer":
            group = f"group {group_size}, " if group_size else ""
            text = f"{group}inputs zero-padded {info.in_features} → {width} (with the rows that feed them; exact)"
        else:
            text = f"outputs zero-padded {info.out_features} → {width} with the MLP (exact)"
        return f"{text}: {cause}" if cause else text

    def _problem(self, in_w: int, out_w: int, group: int | None, holds: list[tuple[Runtime, Any]]) -> str:
        """Why the rule's group does not fit as written: the width, or the first target rule it breaks."""
        if group is not None and in_w % group:
            return f"{in_w} not divisible by {group}"
        for runtime, held in holds:
            if not held.runs_group(group):
                runs = ", ".join("per channel" if g is None else str(g) for g in held.groups)
                return f"{runtime.name} runs groups {runs}"
            for size, multiple, side in ((in_w, held.multiple_in, "input"), (out_w, held.multiple_out, "output")):
                if size % multiple:
                    return f"{runtime.name} needs {side} widths that are multiples of {multiple}, not {size}"
        return ""


def _largest_group_run(group: int | None, holds: list[tuple[Runtime, Any]]) -> int | None:
    """The largest power-of-two group <= `group` (>= MIN_FALLBACK_GROUP) that every target runs."""
    size = group or 0
    while size >= MIN_FALLBACK_GROUP:
        if all(held.runs_group(size) for _, held in holds):
            return size
        size //= 2
    return None


def _refusal_message(recipe: Recipe, refused: list[LinearInfo], linears: list[LinearInfo]) -> str:
    consumers = ", ".join(dict.fromkeys(info.mlp.consumer for info in linears if info.mlp_role == "consumer"))
    parts, policies = [], set()
    for info in refused:
        rule = next(r for r in recipe.rules if r.matches(info.name, info.component))
        policies.add(rule.non_divisible)
        sizes = dividing_groups(info.in_features, rule.group_size)
        if rule.non_divisible == "pad":
            why = f"pad grows only an MLP's intermediate width ({consumers or 'this model has none'})"
        elif sizes:
            why = f"groups that divide it: {', '.join(map(str, sizes))}"
        else:
            why = "no power-of-two group divides it: use per_channel"
        parts.append(f"{info.name} (in_features {info.in_features}, {rule.describe()} group {rule.group_size}; {why})")
    return (f"recipe {recipe.name}: non_divisible is {' / '.join(repr(p) for p in sorted(policies))} and the group "
            f"size does not divide the input width of {len(refused)} Linear(s): {'; '.join(parts)}")


def _target_refusal(plan: QuantPlan, problems: dict[str, list[tuple[str, str]]]) -> str:
    """One line: per reason, the kinds of layer (and the rule that planned them) a target cannot hold."""
    rules = {rule.index: rule for rule in plan.recipe.rules}
    grouped: dict[str, dict[str, list[str]]] = {}   # why → rule → layer patterns
    for found in problems.values():
        for layer_name, why in found:
            try:
                rule = rules[plan.layer(layer_name).rule].describe()
            except KeyError:   # a fused group, not a layer
                rule = "fused"
            grouped.setdefault(why, {}).setdefault(rule, []).append(layer_pattern(layer_name))
    parts = [why + ": " + ", ".join(f"{', '.join(dict.fromkeys(patterns))} ({rule})"
                                    for rule, patterns in by_rule.items())
             for why, by_rule in grouped.items()]
    targets = ", ".join(plan.targets)
    return (f"recipe {plan.recipe.name} cannot be loaded by its target{'s' if len(plan.targets) > 1 else ''} "
            f"({targets}): {'; '.join(parts)}")
