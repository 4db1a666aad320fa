"""The questions every model family answers for mcq's tools, as one value per family (`mcq.models.family.FAMILY`
maps a config.json `model_type` to it): how to build its module tree, what its components are, which repeated
blocks the block-by-block quantizer walks in data-flow order, and the few module names the tools look up.

The resampler family (2.6 / 4.0 / 4.5, mcq's own `MiniCPMV`) and 4.6 (transformers' `MiniCPMV4_6*`) each hold one
in their folder; nothing outside `mcq/models/` branches on which it is."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str                                       # config.json model_type, and the package under mcq/models
    config_class: type                              # a transformers config class
    model_class: type                               # the class that holds the official layout
    # Its components in data-flow order: its folder's components.yaml (`mcq.models.families.family_components`),
    # which also says which names belong to which (`mcq.models.family.component_or_other`).
    components: tuple[str, ...]
    blocks: Callable[[nn.Module], Iterator[tuple[str, nn.Module]]]   # the repeated blocks, in data-flow order
    embedding: str          # the LLM's input embedding table (its stored dtype is the checkpoint's)
    lm_head: str            # the output head: never materialized by the block-by-block driver
    # config.json → (release, LLM name), for reports and cards; a McqError for a release the family lacks.
    describe: Callable[[dict[str, Any]], tuple[str, str]]
    # Component → the config.json path of its paddable MLP's intermediate width (`mcq.models.family.PADDABLE_INPUTS`),
    # which a quantized output with padded MLPs rewrites.
    intermediate_keys: Mapping[str, tuple[str, ...]]
    # Whether the block-by-block driver captures calibration inputs through this family's forward (AWQ, GPTQ).
    calibrates: bool
    # The Python that loads a compressed-tensors output of this family (model cards; PATH = the output).
    load_code: str
    # Writes the tiny checkpoint an `mcq.models.tiny.TinySpec` asks for into an empty staging directory (its
    # folder's tiny.py); a McqError for an option the family has no tiny model for.
    write_tiny: Callable[[Path, Any], None]
