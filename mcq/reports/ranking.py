"""Which variant to ship, derived from the numbers: the smallest variant that passes every threshold, and the
Pareto front of size against mean KL (the variants no other variant beats on both)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ranking:
    expressions: tuple[str, ...]   # every threshold expression given, in order of first appearance
    # Variants by name: one checkpoint served by two runtimes is two variants (`Q (transformers)`, `Q (vllm)`).
    eligible: tuple[str, ...]      # names of the ok variants checked against all of them and passing all
    pick: str | None               # name of the smallest eligible variant (None: no thresholds, or none passes)
    front: tuple[str, ...]         # names on the size / mean-KL Pareto front, smallest first
    dominated_by: dict[str, str]   # name of each variant off the front → name of one front variant that beats it


def rank(variants: list[dict]) -> Ranking:
    expressions = tuple(dict.fromkeys(t["expression"] for v in variants for t in v.get("thresholds", [])))
    measured = [v for v in variants if v["status"] == "ok" and _size(v) is not None]
    eligible = [v for v in measured if expressions and _passes_all(v, expressions)]
    # Ties on size go to the lower KL, then to the input order (min keeps the first of equals).
    pick = min(eligible, key=lambda v: (_size(v), _kl_or_inf(v)), default=None)

    on_axes = [v for v in measured if _kl(v) is not None]
    front = [v for v in on_axes if not any(_dominates(w, v) for w in on_axes)]
    # Dominance is a strict order on finitely many points, so whatever is off the front is beaten by a front variant.
    dominated_by = {v["name"]: next(w["name"] for w in front if _dominates(w, v)) for v in on_axes if v not in front}
    front.sort(key=lambda v: (_size(v), _kl(v)))
    return Ranking(expressions=expressions, eligible=tuple(v["name"] for v in eligible),
                   pick=None if pick is None else pick["name"], front=tuple(v["name"] for v in front),
                   dominated_by=dominated_by)


def _passes_all(variant: dict, expressions: tuple[str, ...]) -> bool:
    # `passed` None: the metric does not apply to this run, which neither passes nor fails the variant. A variant
    # not checked at all (the reference: mcq validate checks only the variants) has not shown that it passes.
    passed = {t["expression"]: t["passed"] for t in variant.get("thresholds", [])}
    return all(e in passed and passed[e] is not False for e in expressions)


def _dominates(w: dict, v: dict) -> bool:
    return (_size(w) <= _size(v) and _kl(w) <= _kl(v)) and (_size(w) < _size(v) or _kl(w) < _kl(v))


def _size(variant: dict) -> float | None:
    return variant.get("metrics", {}).get("bytes")


def _kl(variant: dict) -> float | None:
    return variant.get("metrics", {}).get("kl_mean")


def _kl_or_inf(variant: dict) -> float:
    kl = _kl(variant)
    return float("inf") if kl is None else kl
