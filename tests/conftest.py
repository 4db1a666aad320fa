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
def awq_recipe_on():
    """`awq_recipe_on(engine, **method_args)`: the built-in awq-w4g128 with its scale search on `engine` (mcq's
    own, or llm-compressor's AWQModifier), other method arguments changed as given."""
    from mcq.quantize.recipe import AWQ_ENGINE_ARGS, load_recipe, parse_recipe

    def recipe(engine: str, **method_args):
        data = load_recipe("awq-w4g128").to_dict()
        data["method_args"].update(engine=engine, **method_args)
        for key, owner in AWQ_ENGINE_ARGS.items():   # loss_tokens, weight_clip: mcq's engine only
            if owner != engine:
                del data["method_args"][key]
        return parse_recipe(data, f"awq-w4g128 on {engine}")

    return recipe


@pytest.fixture(scope="session")
def llmc_awq_recipe(tmp_path_factory, awq_recipe_on) -> Path:
    """A recipe file: the built-in awq-w4g128 on llm-compressor's AWQ engine."""
    import yaml

    path = tmp_path_factory.mktemp("recipes") / "awq-llm-compressor.yaml"
    path.write_text(yaml.safe_dump(awq_recipe_on("llm-compressor").to_dict(), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def outlier_variants(tmp_path_factory, llmc_awq_recipe):
    """RTN, AWQ and GPTQ W4 g128 (LLM, vision tower and resampler kv_proj) of the tiny 4.5 model with activation
    outliers, each with its built-in recipe as shipped: 64 calibration samples, planned for the recipe's vLLM
    target (the resampler's attention and proj dense, the vision MLP padded to 512 for group 128), and AWQ on
    llm-compressor's engine (`awq-llm-compressor`), the reference for mcq's own. Measured before targets (resampler
    whole, fc2 at group 16): with 24 samples AWQ's KL was 1.95x below RTN's, with 64 2.16x."""
    from mcq.quantize.api import quantize

    root = tmp_path_factory.mktemp("outliers")
    variants = {method: quantize("tiny:4.5-outliers", root / method, method=method, progress=False)
                for method in ("rtn", "awq", "gptq")}
    variants["awq-llm-compressor"] = quantize("tiny:4.5-outliers", root / "awq-llm-compressor",
                                              recipe=str(llmc_awq_recipe), progress=False)
    return {method: Path(result.out) for method, result in variants.items()}
