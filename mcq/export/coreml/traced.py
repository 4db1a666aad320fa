"""Core ML packages traced from a family's runtime-neutral torch programs (`Family.graphs`, `Family.programs`:
MiniCPM-V 4.6), the ones `mcq export --format onnx` traces too.

- The vision package is the family's vision program (one image → its LLM tokens) with flexible shapes: each
  dynamic axis a `RangeDim` bounded as the program says (`TracedProgram.bounds`), the host's index tables as int32
  inputs.
- The LLM is the embed package (the program's), decoder chunk packages (`Programs.stateful_decoder`: one new
  position per call, every state of its layers an iOS18 state: KV caches, the linear attention's conv and
  recurrent states) and the head package (`Programs.head`), with the same inputs and outputs as the resampler
  family's, so one host loop (`runtime.CoremlMiniCPMV.decode`) drives both.

Each program's Linears are made `linear` ops before tracing (`as_linear_ops`), so the LLM and vision compressions
(and `--from`'s stored int4 levels) apply to them as to the resampler family's.
"""

from __future__ import annotations

import numpy as np
import torch

from mcq.models.traceable import as_linear_ops

from .convert import (LLM_CONTEXT, LLM_MAX_CHUNK, LLM_PACKAGE_BYTES, _convert, _with_stored_levels, compress_llm,
                      compress_vision, import_coremltools, linear_sources)

# Positions one decoder call adds: the linear attention's recurrence over several positions is a loop, which a
# traced program cannot hold on a dynamic length (`Programs.stateful_decoder`).
PROGRAM_TOKENS_PER_CALL = 1


def _flexible_inputs(ct, program) -> tuple[list, tuple]:
    """Core ML input types of a traced program (a `RangeDim` per dynamic axis, integer inputs as int32) and the
    example to trace it on (with int32 indices, as the package takes them)."""
    inputs, example, ranges = [], [], {}
    for name, value in zip(program.inputs, program.example):
        dims = []
        for axis, size in enumerate(value.shape):
            symbol = program.axes.get(name, {}).get(axis)
            if symbol is None:
                dims.append(int(size))
            else:
                # One RangeDim per name: inputs sharing an axis name share its length.
                if symbol not in ranges:
                    low, high = program.bounds[symbol]
                    ranges[symbol] = ct.RangeDim(lower_bound=low, upper_bound=high, default=int(size), symbol=symbol)
                dims.append(ranges[symbol])
        floating = value.is_floating_point()
        inputs.append(ct.TensorType(name, shape=tuple(dims), dtype=np.float16 if floating else np.int32))
        example.append(value if floating else value.to(torch.int32))
    return inputs, tuple(example)


def convert_program_vision(weights, target: str, compression: str):
    """The vision package: the family's vision program on one image, flexible in its number of patches; and the
    model component of each of its weights (`weight_components`)."""
    ct = import_coremltools()
    program = weights.checkpoint.family.programs.vision(weights)
    components = weight_components(program.module)
    inputs, example = _flexible_inputs(ct, program)
    outputs = [ct.TensorType(name, dtype=np.float16) for name in program.outputs]
    model = _convert(ct, as_linear_ops(program.module), example, inputs, outputs, target)
    low, high = program.bounds["patches"]
    model.short_description = (f"MiniCPM-V {weights.checkpoint.release} vision: one image of {low} to {high} "
                               "patches → its LLM tokens")
    return compress_vision(ct, model, compression, target), components


def weight_components(module) -> dict[str, str]:
    """MIL weight-name prefix → the model component its checkpoint tensor belongs to (coremltools names a weight
    after its torch module path, dots as underscores), for sizes per component (`runtime.component_bytes`)."""
    from mcq.models.family import component_or_other

    components = {}
    for path, parameter in module.named_parameters():
        source = getattr(parameter, "mcq_source", None)
        if source is not None:
            components[path.rpartition(".")[0].replace(".", "_") or path] = component_or_other(source)
    return components


def convert_program_embeddings(weights, target: str, compression: str, max_chunk: int = LLM_MAX_CHUNK):
    ct = import_coremltools()
    module = weights.checkpoint.family.graphs(weights, "embed_tokens").module
    length = ct.RangeDim(lower_bound=1, upper_bound=max_chunk, default=1, symbol="length")
    model = _convert(ct, module, (torch.zeros(1, 2, dtype=torch.int32),),
                     [ct.TensorType("input_ids", shape=(1, length), dtype=np.int32)],
                     [ct.TensorType("inputs_embeds", dtype=np.float16)], target)
    model.short_description = f"MiniCPM-V {weights.checkpoint.release} token embeddings (input_ids → inputs_embeds)"
    return compress_llm(ct, model, compression)


def program_decoder_chunks(weights, programs) -> list[range]:
    """The decoder layers in consecutive ranges of at most LLM_PACKAGE_BYTES of fp16 weights (the largest layer
    kind sizing every range)."""
    text = weights.config.get_text_config()
    names = weights.names()
    first_of_kind = {kind: text.layer_types.index(kind) for kind in set(text.layer_types)}
    layer_bytes = max(2 * sum(weights.tensor(name).numel() for name in names
                              if name.startswith(f"{programs.decoder_layers}{index}."))
                      for index in first_of_kind.values())
    step = max(1, LLM_PACKAGE_BYTES // max(layer_bytes, 1))
    layers = text.num_hidden_layers
    return [range(start, min(start + step, layers)) for start in range(0, layers, step)]


def convert_program_decoder(weights, programs, target: str, compression: str, layers: range,
                            context: int = LLM_CONTEXT):
    """Decoder layers `layers` with their states, one position per call; and the `--from` fallbacks."""
    ct = import_coremltools()
    module = as_linear_ops(programs.stateful_decoder(weights, layers, context))
    text = weights.config.get_text_config()
    hidden, rotary = text.hidden_size, module.rotary
    end = ct.RangeDim(lower_bound=1, upper_bound=context, default=1, symbol="end")
    inputs = [ct.TensorType("hidden_states", shape=(1, 1, hidden), dtype=np.float16),
              ct.TensorType("position_cos", shape=(1, 1, 1, rotary), dtype=np.float16),
              ct.TensorType("position_sin", shape=(1, 1, 1, rotary), dtype=np.float16),
              ct.TensorType("causal_mask", shape=(1, 1, 1, end), dtype=np.float16)]
    example = (torch.zeros(1, 1, hidden), torch.ones(1, 1, 1, rotary), torch.zeros(1, 1, 1, rotary),
               torch.zeros(1, 1, 1, 5))
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(getattr(module, name).shape), dtype=np.float16),
                           name=name) for name in module.state_names]
    sources = linear_sources(module)
    model = _convert(ct, module, example, inputs, [ct.TensorType("output_hidden_states", dtype=np.float16)], target,
                     states)
    kinds = sorted({text.layer_types[i] for i in layers})
    del module   # its float32 weights, not needed to compress (twice the package's fp16 bytes)
    model.short_description = (f"MiniCPM-V {weights.checkpoint.release} LLM decoder layers {layers.start}-"
                               f"{layers.stop - 1} ({', '.join(kinds)}) with their states ({context} cached "
                               "positions); one new position per call")
    return _with_stored_levels(weights, compress_llm(ct, model, compression), compression, sources)


def convert_program_head(weights, programs, target: str, compression: str, max_chunk: int = LLM_MAX_CHUNK):
    ct = import_coremltools()
    module = as_linear_ops(programs.head(weights))
    hidden = weights.config.get_text_config().hidden_size
    length = ct.RangeDim(lower_bound=1, upper_bound=max_chunk, default=1, symbol="length")
    sources = linear_sources(module)
    model = _convert(ct, module, (torch.zeros(1, 2, hidden),),
                     [ct.TensorType("hidden_states", shape=(1, length, hidden), dtype=np.float16)],
                     [ct.TensorType("logits", dtype=np.float16)], target)
    del module   # its float32 weights, not needed to compress (2.3 GiB for the real-vocabulary LM head)
    model.short_description = (f"MiniCPM-V {weights.checkpoint.release} LLM final norm and LM head (hidden states → "
                               "logits)")
    return _with_stored_levels(weights, compress_llm(ct, model, compression), compression, sources)
