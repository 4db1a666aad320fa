"""mcq's optional parts: what each needs installed, and the one-line error when it is not.

mcq's core (the model, processors, calibration data, exports to GGUF and ONNX, validation, reports) installs beside
any runtime, vLLM's environment included. The quantization engine is the `quantize` extra: llm-compressor pins
transformers (<= 5.17 for llm-compressor 0.14) and compressed-tensors exactly, which vLLM's environment cannot take,
and bitsandbytes is only needed to write or run bitsandbytes variants.
"""

from __future__ import annotations

from importlib.util import find_spec

from mcq.errors import McqError

#: extra → the modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {
    "quantize": ("llmcompressor", "bitsandbytes"),
}


def require(extra: str, module: str, purpose: str) -> None:
    """A one-line McqError naming the pip command when `module` (part of `extra`) is not installed."""
    if module not in EXTRAS[extra]:
        raise ValueError(f"{module} is not part of the {extra} extra")
    if find_spec(module) is None:
        raise McqError(f"{purpose} needs {module}, which is not installed here: pip install "
                       f"'minicpm-quant[{extra}]'")


def require_method(method: str) -> None:
    """What quantizing with `method` (awq, gptq, rtn, bnb) needs."""
    if method == "bnb":
        require("quantize", "bitsandbytes", "bitsandbytes quantization")
    else:
        require("quantize", "llmcompressor", f"{method} quantization")
