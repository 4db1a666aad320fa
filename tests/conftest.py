"""Shared fixtures: tiny checkpoints are generated once per session into a temp cache (never the user's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Published files of the official releases (config, tokenizer config, weight maps): see data/official/README.md.
OFFICIAL = Path(__file__).resolve().parent / "data" / "official"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    previous = os.environ.get("MCQ_CACHE")
    os.environ["MCQ_CACHE"] = str(tmp_path_factory.mktemp("mcq-cache"))
    yield
    if previous is None:
        os.environ.pop("MCQ_CACHE", None)
    else:
        os.environ["MCQ_CACHE"] = previous


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official MiniCPM-V 4.5 config, tokenizer config and weight index."""
    return OFFICIAL / "minicpm-v-4_5"


@pytest.fixture(scope="session", params=["4.5", "2.6", "4.0"])
def tiny_path(request) -> Path:
    from mcq.models.tiny import resolve_tiny

    return resolve_tiny(f"tiny:{request.param}")


@pytest.fixture(scope="session")
def tiny45() -> Path:
    from mcq.models.tiny import resolve_tiny

    return resolve_tiny("tiny:4.5")


@pytest.fixture(scope="session")
def outlier_variants(tmp_path_factory):
    """RTN, AWQ and GPTQ W4 g128 (LLM, vision tower and resampler kv_proj) of the tiny 4.5 model with activation
    outliers, each with its built-in recipe as shipped: 64 calibration samples, planned for the recipe's vLLM
    target (the resampler's attention and proj dense, the vision MLP padded to 512 for group 128). Measured before
    targets (resampler whole, fc2 at group 16): with 24 samples AWQ's KL was 1.95x below RTN's, with 64 2.16x."""
    from mcq.quantize.api import quantize

    root = tmp_path_factory.mktemp("outliers")
    variants = {method: quantize("tiny:4.5-outliers", root / method, method=method, progress=False)
                for method in ("rtn", "awq", "gptq")}
    return {method: Path(result.out) for method, result in variants.items()}
