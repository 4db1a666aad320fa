"""`mcq build` and `mcq matrix`: every variant of a plan from one calibration, validated, in one report."""

from .api import BuildResult, VariantOutcome, build
from .plan import FORMATS, Plan, Variant, load_plan

__all__ = ["FORMATS", "BuildResult", "Plan", "Variant", "VariantOutcome", "build", "load_plan"]
