"""`--from`: the int4 blocks of the LLM package written from an `mcq quantize` output's own integer levels.

An AWQ/GPTQ/RTN output stores each Linear as int4 levels with one scale (and zero point) per group of 128 (or 32,
64) inputs. A group of 128 is four blocks of 32 sharing one scale, so Core ML's `constexpr_blockwise_shift_scale`
with block 32 holds it exactly: levels as they are, the group's scale repeated per block, its zero point as the
offset. No second rounding; the calibrated weights are the package's weights bit for bit (up to the bf16 → fp16
scale conversion, exact for scales in fp16's normal range).

Linears the output stores otherwise (8 bits, a group size 32 does not divide, not quantized at all) keep
coremltools' own int4 quantization of their dequantized values, and are listed as fallbacks.
"""

from __future__ import annotations

import numpy as np

from mcq.errors import McqError

from .convert import INT4_BLOCK, _quiet


def stored_int4_blocks(weights, module_sources: dict[str, str]) -> tuple[dict[str, tuple], dict[str, str]]:
    """MIL weight-name prefix → (levels int8 [out, in], scale fp16 [out, in/32], offset int8 | None), and the
    Linears that cannot be carried (source module → reason)."""
    blocks, fallbacks = {}, {}
    for mil_prefix, source in module_sources.items():
        stored = weights.quantized(source)
        if stored is None:
            fallbacks[source] = "not quantized in the --from output (coremltools int4 of its float weights)"
            continue
        if stored.bits != 4:
            fallbacks[source] = f"stored at {stored.bits} bits (requantized to int4 blocks of 32)"
            continue
        columns = stored.levels.shape[1]
        group = stored.group_size or columns
        if group % INT4_BLOCK or columns % group:
            fallbacks[source] = f"group size {group} is not a multiple of {INT4_BLOCK} (requantized)"
            continue
        repeat = group // INT4_BLOCK
        scale = stored.scale.float().numpy()
        if np.abs(scale).max() > np.finfo(np.float16).max:
            fallbacks[source] = "scales overflow fp16 (requantized)"
            continue
        offset = None
        if stored.zero is not None:
            offset = np.repeat(stored.zero.numpy().astype(np.int8), repeat, axis=1)
        blocks[mil_prefix] = (stored.levels.numpy().astype(np.int8),
                              np.repeat(scale, repeat, axis=1).astype(np.float16), offset)
    return blocks, fallbacks


def replace_with_stored(model, blocks: dict[str, tuple], spec_version: int):
    """Swap the weights feeding `linear` ops whose names match `blocks` for constexpr_blockwise_shift_scale ops
    built from the stored levels. Returns the new MLModel."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass

    replaced: set[str] = set()

    class StoredLevels(AbstractGraphPass):
        def apply(self, prog):
            for function in prog.functions.values():
                with function:
                    for op in list(function.operations):
                        if op.op_type != "linear":
                            continue
                        weight = op.weight
                        prefix = next((p for p in blocks if weight.name.startswith(p + "_to_fp16")), None)
                        if prefix is None:
                            continue
                        levels, scale, offset = blocks[prefix]
                        if tuple(weight.shape) != levels.shape:
                            raise McqError(f"--from: {prefix} has shape {list(levels.shape)} stored, the program "
                                           f"uses {list(weight.shape)}")
                        new = mb.constexpr_blockwise_shift_scale(
                            data=levels.astype(types.np_int4_dtype), scale=scale,
                            offset=None if offset is None else offset.astype(types.np_int4_dtype),
                            before_op=op, name=f"{prefix}_stored_int4")
                        function.replace_uses_of_var_after_op(anchor_op=new.op, old_var=weight, new_var=new,
                                                              no_check_var_types=True, force_replace=True)
                        replaced.add(prefix)

    with _quiet():
        result = _apply_graph_pass(model, StoredLevels(), spec_version=spec_version, skip_model_load=True)
    missing = sorted(set(blocks) - replaced)
    if missing:
        raise McqError(f"--from: no linear op of the LLM program uses {', '.join(missing[:3])}")
    return result
