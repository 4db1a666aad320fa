"""ONNX graphs traced from a family's runtime-neutral torch programs (`mcq.models.familyspec.Programs`) with
`torch.onnx.export` (torch.export, then onnxscript's translation and optimizer), for families whose exporters do not
write graphs op by op.

Each traced graph is then made to read like the hand-written ones: its initializers are named after the checkpoint
tensors they hold (each program parameter remembers its `mcq_source`), its dynamic axes get the program's names
(`batch_size`, `past_sequence_length`, ...) instead of torch.export's symbols, and fp16 stores the large float
weights in float16 with a Cast (computed in float32, as the hand-written graphs do).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from mcq.errors import McqError

from .builder import INLINE_WEIGHTS_LIMIT, MS_DOMAIN
from .quantize import graph_dtype
from .runtime import DTYPE_SUFFIXES

# opset of the traced graphs: torch.onnx's default for torch 2.13 (the hand-written graphs use 21; onnxruntime runs
# both).
OPSET = 20
# Float initializers of at least this many elements are stored in float16 by an fp16 export; smaller ones (norm
# weights, biases, rotary frequencies) stay float32.
FP16_MIN_ELEMENTS = 1024


def trace_graph(program) -> onnx.ModelProto:
    """The ONNX model of one `TracedProgram`, initializers and axes named (see the module doc)."""
    import torch

    # The exporter reports its steps on stdout, logs the torchvision ops it skips and (through onnx_ir, once
    # something has configured logging: onnxruntime's quantizer does) each initializer its optimizer merges; none of
    # it concerns mcq's users, and an error still raises.
    loggers = [logging.getLogger(name) for name in ("torch.onnx._internal.exporter._registration", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            exported = torch.onnx.export(program.module, program.example, dynamo=True, opset_version=OPSET,
                                         dynamic_shapes=program.dynamic_shapes, input_names=list(program.inputs),
                                         output_names=list(program.outputs), optimize=True, verbose=False)
        except Exception as err:   # torch.export's errors are many classes, all with a multi-line report
            raise McqError(f"torch.onnx.export failed on {type(program.module).__name__}: "
                           f"{str(err).strip().splitlines()[0]}") from None
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
    model = exported.model_proto
    _name_initializers(model, program.module)
    _name_axes(model, program.axes)
    return model


def _name_initializers(model: onnx.ModelProto, module) -> None:
    """Rename each initializer that holds a program parameter to the checkpoint tensor it came from."""
    sources = {name: parameter.mcq_source for name, parameter in module.named_parameters()
               if hasattr(parameter, "mcq_source")}
    renames = {tensor.name: sources[tensor.name] for tensor in model.graph.initializer if tensor.name in sources}
    taken = {tensor.name for tensor in model.graph.initializer} - set(renames)
    # The exporter's own initializers (folded constants) are named `val_12` and the like; one that bore a checkpoint
    # tensor's name would be shadowed by the rename.
    clashes = set(renames.values()) & taken
    if clashes:
        raise McqError(f"initializer names {sorted(clashes)[:3]} are taken twice in the traced graph")
    _rename_values(model.graph, renames)


def _rename_values(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        for attribute in node.attribute:   # Scan / Loop bodies may read outer initializers by name
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_values(attribute.g, renames)


def _name_axes(model: onnx.ModelProto, axes) -> None:
    """Give the dynamic axes of inputs and outputs the program's names, everywhere torch.export's symbol occurs."""
    symbols: dict[str, str] = {}
    for value in [*model.graph.input, *model.graph.output]:
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param:
                symbols.setdefault(dim.dim_param, name)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = symbols[dim.dim_param]


def store_float16(model: onnx.ModelProto) -> None:
    """Store float initializers of at least FP16_MIN_ELEMENTS in float16, each read through a Cast to float32."""
    graph = model.graph
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or int(np.prod(tensor.dims)) < FP16_MIN_ELEMENTS:
            continue
        array = numpy_helper.to_array(tensor)
        if np.abs(array).max(initial=0.0) > np.finfo(np.float16).max:
            raise McqError(f"{tensor.name} holds values beyond float16's range; export it as fp32")
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float16), f"{name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=onnx.TensorProto.FLOAT,
                                      name=f"{name}/cast"))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)


def quantize_matmuls(model: onnx.ModelProto, writer) -> None:
    """Replace each MatMul on a Linear's weight that `writer`'s plans quantize by MatMulNBits, with the tensors the
    hand-written graphs get for it (`WeightWriter.nbits_tensors`: an `mcq quantize` output's levels, or
    onnxruntime's quantizer)."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    replaced = set()
    nodes = []
    for node in graph.node:
        module = node.input[1].removesuffix(".weight") if node.op_type == "MatMul" and len(node.input) == 2 else None
        plan = writer.plans.get(module) if module and node.input[1] in initializers else None
        if plan is None or plan.source is None:
            nodes.append(node)
            continue
        packed, scales, zeros, (n, k) = writer.nbits_tensors(module)
        tensors = [numpy_helper.from_array(packed, f"{module}.weight_q{plan.bits}"),
                   numpy_helper.from_array(scales, f"{module}.weight_scales")]
        if zeros is not None:
            tensors.append(numpy_helper.from_array(zeros, f"{module}.weight_zero_points"))
        graph.initializer.extend(tensors)
        attributes = {"K": k, "N": n, "bits": plan.bits, "block_size": plan.block}
        if writer.accuracy_level:
            attributes["accuracy_level"] = writer.accuracy_level
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *(t.name for t in tensors)], list(node.output),
                                      name=f"{module}/MatMulNBits", domain=MS_DOMAIN, **attributes))
        replaced.add(node.input[1])
    if not replaced:
        return
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [tensor for tensor in graph.initializer if tensor.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def save_traced(model: onnx.ModelProto, path: Path) -> bool:
    """Write `model` to `path`, its weights in `<file>_data` beside it when they exceed what one .onnx file holds
    (INLINE_WEIGHTS_LIMIT, as the hand-written graphs); returns whether they do."""
    weights = sum(len(tensor.raw_data) for tensor in model.graph.initializer)
    external = weights > INLINE_WEIGHTS_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}_data", size_threshold=0)
    return external


def write_traced_graph(graph: str, onnx_dir: Path, precision: str, build, writer) -> tuple[str, bool]:
    """Build (`build(graph)`) and trace one graph of the layout, quantize or halve its weights as `precision` asks,
    and save it; returns (dtype, external)."""
    model = trace_graph(build(graph))
    quantize_matmuls(model, writer)
    if precision == "fp16":
        store_float16(model)
    dtype = graph_dtype(model, precision)
    return dtype, save_traced(model, onnx_dir / f"{graph}{DTYPE_SUFFIXES[dtype]}.onnx")
