"""Helpers shared by the ONNX export tests (pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from mcq.models.minicpmv.chat import build_chat_inputs


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy())


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def digests(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def chat_inputs(model, processor, msgs, **kwargs):
    options = {"max_slice_nums": None, "use_image_id": None, "temporal_ids": None, **kwargs}
    inputs, _ = build_chat_inputs(model, processor, image=None, msgs=msgs, system_prompt="", max_inp_length=8192,
                                  enable_thinking=False, **options)
    return inputs


def quantize_with_onnxruntime(model, plans, *, symmetric: bool, accuracy_level: int):
    """onnxruntime's own `MatMulNBitsQuantizer` over a whole float graph (what `mcq export` ran before it quantized
    weight by weight): the oracle the streamed tensors are compared with. The MatMuls the plans give to onnxruntime
    are quantized, one pass per (algorithm, bits, block size), each pass excluding all the others."""
    import contextlib
    import io

    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        KQuantWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
        RTNWeightOnlyQuantConfig,
    )
    from onnxruntime.quantization.quant_utils import QuantFormat

    matmuls = [node.name for node in model.graph.node if node.op_type == "MatMul"]
    # A Linear's MatMul is the one on its weight (the graph's initializer named after it).
    on_weight = {node.input[1]: node.name for node in model.graph.node if node.op_type == "MatMul"}
    passes = {}
    for plan in plans.values():
        if plan.source == "onnxruntime" and f"{plan.name}.weight" in on_weight:
            passes.setdefault((plan.algorithm or "default", plan.bits, plan.block), set()).add(
                on_weight[f"{plan.name}.weight"])
    for (algorithm, bits, block), nodes in sorted(passes.items()):
        level = accuracy_level or None
        config = {"rtn": RTNWeightOnlyQuantConfig, "k_quant": KQuantWeightOnlyQuantConfig}.get(algorithm)
        config = config() if config else DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=symmetric, accuracy_level=level, quant_format=QuantFormat.QOperator,
            op_types_to_quantize=("MatMul",), bits=bits)
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric,
                                         accuracy_level=level, nodes_to_exclude=[n for n in matmuls if n not in nodes],
                                         op_types_to_quantize=("MatMul",), algo_config=config)
        with contextlib.redirect_stdout(io.StringIO()):
            quantizer.process()
        model = quantizer.model.model
        matmuls = [node.name for node in model.graph.node if node.op_type == "MatMul"]
    return model
