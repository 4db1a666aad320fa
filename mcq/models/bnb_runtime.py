"""Running bitsandbytes-quantized MiniCPM-V models: what loading one needs, whoever quantized it."""

from __future__ import annotations

import logging


def disable_unsupported_cpu_repacking(model) -> list[str]:
    """Keep bitsandbytes' 4-bit layers runnable on CPUs with AVX512-BF16; returns the layers changed.

    On such CPUs bitsandbytes 0.50 repacks a `Linear4bit`'s weight at its first eval-mode forward for its fused
    kernel, which needs the output width to be a multiple of 32 and the input width a multiple of the quantization
    block (64); other layers fail with an assertion or a reshape error. SigLIP's MLP is 1152 -> 4304 -> 1152
    (4304 = 32 x 134.5 = 64 x 67.25), so `fc1` and `fc2` of every MiniCPM-V vision tower would fail (tiny models:
    464). Those layers are switched to bitsandbytes' generic CPU kernel (same quantized weights, same results up
    to rounding); the others keep the fast path. The flag is per module and not saved, so this is needed after
    every load (`MiniCPMV.from_pretrained` calls it).
    """
    changed = []
    for name, module in model.named_modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        quant_state = getattr(module.weight, "quant_state", None)
        block = quant_state.blocksize if quant_state is not None else 64
        if module.out_features % 32 or module.in_features % block:
            module.support_avx512bf16_for_cpu = False
            changed.append(name)
    return changed


class _QuietNotices(logging.Filter):
    """bitsandbytes notices that are noise on every mcq run touching a bitsandbytes model (they go to stderr, but
    they would bury mcq's own messages):
    - its CPU backend tries the optional `kernels` package (which fetches a faster GEMM from the Hugging Face Hub)
      when imported and warns when it is absent; the built-in CPU kernels are used instead and work: dropped;
    - LLM.int8 logs that bf16 inputs are cast to fp16 on *every* forward of every 8-bit layer (a hundred lines per
      answer on a tiny model): shown once, since the fp16 range is worth knowing about."""

    def __init__(self) -> None:
        super().__init__()
        self.cast_notice_shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Failed to load CPU gemm_4bit_forward"):
            return False
        if message.startswith("MatMul8bitLt: inputs will be cast"):
            shown, self.cast_notice_shown = self.cast_notice_shown, True
            return not shown
        return True


_NOTICE_FILTER = _QuietNotices()


def quiet_bnb_notices() -> None:
    """Quiet bitsandbytes' repetitive notices (see `_QuietNotices`); call before bitsandbytes is imported
    (transformers imports it while loading a bitsandbytes checkpoint). Calling it again is harmless."""
    for logger in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logging.getLogger(logger).addFilter(_NOTICE_FILTER)
