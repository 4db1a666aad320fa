"""ONNX graphs traced from a family's runtime-neutral torch programs (`Family.graphs`, its `programs.py`) with
`torch.onnx.export` (torch.export, then onnxscript's translation and optimizer).

A program is built on `MetaWeights` and traced on the meta device: the graph is traced without a weight in memory,
and its weights are written afterwards from the checkpoint, one tensor (a large one a block of rows) at a time
(`store.TensorStore`, `store.save_graph`, `quantize.WeightWriter`): memory does not grow with the model. Each
traced graph's initializers are named after the checkpoint tensors they hold (each program parameter remembers its
`mcq_source`), its dynamic axes get the program's names (`batch_size`, `past_sequence_length`, ...) instead of
torch.export's symbols, fp16 stores the large float weights in float16 with a Cast (computed in float32), and the
MatMul on each planned Linear's weight becomes MatMulNBits.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper
from torch import nn

from mcq.errors import McqError
from mcq.models.familyspec import LayeredProgram, TracedProgram

from .store import MS_DOMAIN, TensorStore, save_graph
from .quantize import precision_dtype
from .runtime import DTYPE_SUFFIXES, GRAPHS

# opset of the traced graphs: torch.onnx's default for torch 2.13.
OPSET = 20
# Float initializers of at least this many elements are stored in float16 by an fp16 export; smaller ones (norm
# weights, biases, rotary frequencies) stay float32.
FP16_MIN_ELEMENTS = 1024


@dataclass(frozen=True)
class ProgramWeight:
    """Where one initializer of a traced graph gets its data, written after tracing (the program is traced on the
    meta device, without its weights): the checkpoint tensor `source`, as stored or transposed (a
    `TransposedLinear`'s `[in, out]`), in `shape`; or `value`, a small tensor the program computed (rotary
    frequencies)."""

    shape: tuple[int, ...]
    source: str | None = None
    transposed: bool = False
    value: np.ndarray | None = None


class _Bundle(nn.Module):
    """Several programs as one module: its inputs are theirs one after the other, and so are its outputs."""

    def __init__(self, programs: Sequence[TracedProgram]):
        super().__init__()
        self.pieces = nn.ModuleList(program.module for program in programs)
        self.arity = [len(program.inputs) for program in programs]

    def forward(self, *inputs):
        outputs, start = [], 0
        for piece, count in zip(self.pieces, self.arity):
            result = piece(*inputs[start:start + count])
            start += count
            outputs.extend(result if isinstance(result, tuple) else (result,))
        return tuple(outputs)


def trace_graphs(programs: Sequence[TracedProgram]) -> list[tuple[onnx.ModelProto, dict[str, ProgramWeight]]]:
    """The ONNX graph of each `TracedProgram`, initializers and axes named (see the module doc), without its
    weights: they are the returned `ProgramWeight`s by initializer name, written by `write_traced_graph`.

    The programs are traced together, by one `torch.onnx.export` of a module that runs each (`_Bundle`), and the
    graph split apart again: each export pays a fixed cost whatever it traces (its op registry, torch.export's
    setup, a decomposition pass: about 0.6 s), and an ONNX export's seven programs took 12.3 s traced apart against
    8.7 s together (real-width 4.5, 2 layers). Each program is built on `MetaWeights` (every checkpoint tensor a
    meta tensor) and traced on the meta device, so tracing holds no weight whatever the model's size; what a
    program computed itself is kept aside first."""
    import torch

    bundle = _Bundle(programs)
    names = ", ".join(type(program.module).__name__ for program in programs)
    weights = _weights_aside(bundle)
    example = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x
                    for program in programs for x in program.example)
    # The exporter reports its steps on stdout, logs the torchvision ops it skips and (through onnx_ir, once
    # something has configured logging: onnxruntime's quantizer does) each initializer its optimizer merges or
    # finds without a value (the weights, written afterwards); none of it concerns mcq's users, and an error still
    # raises.
    loggers = [logging.getLogger(name) for name in ("torch.onnx._internal.exporter._registration", "onnx_ir",
                                                    "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            exported = torch.onnx.export(
                bundle, example, dynamo=True, opset_version=OPSET, optimize=False, verbose=False,
                dynamic_shapes=(tuple(shape for program in programs for shape in program.dynamic_shapes),),
                input_names=[f"{index}/{name}" for index, program in enumerate(programs) for name in program.inputs],
                output_names=[f"{index}/{name}" for index, program in enumerate(programs) for name in program.outputs])
            # The weights have no values to fold: the optimizer leaves what reads them as it is.
            for name, value in exported.model.graph.initializers.items():
                if name not in weights:
                    raise McqError(f"the traced {names} hold a tensor {name} that is neither a program weight nor "
                                   "computed by one")
                value.const_value = None
            exported.optimize()
            model = exported.model_proto
        except McqError:
            raise
        except Exception as err:   # torch.export's errors are many classes, all with a multi-line report
            raise McqError(f"torch.onnx.export failed on {names}: {str(err).strip().splitlines()[0]}") from None
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
    _drop_trace_records(model.graph)
    producers = {output: index for index, node in enumerate(model.graph.node) for output in node.output}
    traced = []
    for index, program in enumerate(programs):
        piece = _piece(model, producers, f"{index}/", program)
        # The weights have no values yet, so the graph lists them as no initializer: a piece's are those its nodes
        # read. A computed value keeps its path in its program (the bundle's, less `pieces.{index}.`).
        used = {name for node in piece.graph.node for name in _inputs(node)} & set(weights)
        renames = {name: name.split(".", 2)[2] for name in used}
        _rename_values(piece.graph, lambda name: renames.get(name, name))
        piece_weights = _named_weights(piece, {renames[name]: weights[name] for name in weights if name in used})
        _name_axes(piece, program.axes)
        traced.append((piece, piece_weights))
    return traced


def _piece(model: onnx.ModelProto, producers: dict[str, int], prefix: str,
           program: TracedProgram) -> onnx.ModelProto:
    """The graph of one program of a traced bundle (its inputs and outputs named `prefix` + the program's names):
    the nodes its outputs depend on (`producers`: the index of the bundle's node computing each value), in the
    bundle's order, and the initializers they read; its inputs and outputs named as the program names them."""
    graph = model.graph
    taken, pending = set(), [prefix + name for name in program.outputs]
    while pending:
        index = producers.get(pending.pop())
        if index is not None and index not in taken:
            taken.add(index)
            pending.extend(_inputs(graph.node[index]))
    nodes = [graph.node[index] for index in sorted(taken)]
    read = {name for node in nodes for name in _inputs(node)}
    values = {value.name: value for value in [*graph.input, *graph.output]}
    piece = helper.make_graph(nodes, graph.name, [values[prefix + name] for name in program.inputs],
                              [values[prefix + name] for name in program.outputs],
                              [tensor for tensor in graph.initializer if tensor.name in read])
    own = {prefix + name: name for name in [*program.inputs, *program.outputs]}
    _rename_values(piece, lambda name: own.get(name, name))
    result = helper.make_model(piece, opset_imports=list(model.opset_import), producer_name=model.producer_name,
                               producer_version=model.producer_version)
    result.ir_version = model.ir_version
    return result


def program_pieces(program: TracedProgram | LayeredProgram) -> list[TracedProgram]:
    """What tracing a graph's program traces: the program itself, or a `LayeredProgram`'s prologue, head and first
    layer of each kind (`_kind_sources`), in that order."""
    if not isinstance(program, LayeredProgram):
        return [program]
    return [program.prologue, program.head, *(program.layer(index) for index in _kind_sources(program).values())]


def _kind_sources(program: LayeredProgram) -> dict[Any, int]:
    """Each kind of layer of `program` → its first layer, the one traced."""
    sources: dict[Any, int] = {}
    for index in range(program.layers):
        sources.setdefault(program.kind(index), index)
    return sources


def join_layers(program: LayeredProgram, pieces: list[tuple[onnx.ModelProto, dict[str, ProgramWeight]]]
                ) -> tuple[onnx.ModelProto, dict[str, ProgramWeight]]:
    """The graph of a `LayeredProgram` from its traced `pieces` (`program_pieces`' programs traced): prologue, one
    layer of each kind and head joined into one graph, layer by layer, each layer a copy of its kind's trace with its
    own names. Tracing then costs the same at any depth (torch.export and its ONNX translation take about 2.4 s per
    real-width 4.5 LLM layer, 0.5 s per vision layer)."""
    (prologue, prologue_weights), (head, head_weights), *layers = pieces
    nodes, initializers, weights = [], [], {}
    shared = {value.name: value.name for value in [*prologue.graph.input, *prologue.graph.output]}
    inputs = {value.name: value for value in
              _add_piece(prologue, "prologue/", shared, prologue_weights, None, nodes, initializers, weights).input}
    outputs = {}
    traced = {kind: (index, *layer) for (kind, index), layer in zip(_kind_sources(program).items(), layers)}
    hidden = program.first_hidden
    for index in range(program.layers):
        source, layer, layer_weights = traced[program.kind(index)]
        own, theirs = program.states[2 * index: 2 * index + 2], program.states[2 * source: 2 * source + 2]
        output = f"layers.{index}/layer_output"
        names = {**shared, "hidden_states": hidden, "layer_output": output,
                 **{a.name: b.name for a, b in zip(theirs, own)}, **{a.output: b.output for a, b in zip(theirs, own)}}
        layer_names = (program.layer_prefix(source), program.layer_prefix(index))
        joined = _add_piece(layer, f"layers.{index}/", names, layer_weights, layer_names, nodes, initializers, weights)
        state_inputs, state_outputs = {state.name for state in own}, {state.output for state in own}
        inputs.update((value.name, value) for value in joined.input if value.name in state_inputs)
        outputs.update((value.name, value) for value in joined.output if value.name in state_outputs)
        hidden = output
    head_inputs = [value.name for value in head.graph.input
                   if value.name not in shared and value.name != "hidden_states"]
    head_outputs = [value.name for value in head.graph.output]
    names = {**shared, "hidden_states": hidden, **{name: name for name in head_inputs + head_outputs}}
    joined = _add_piece(head, "head/", names, head_weights, None, nodes, initializers, weights)
    inputs.update((value.name, value) for value in joined.input if value.name in head_inputs)
    outputs.update((value.name, value) for value in joined.output)
    order_in = [*(value.name for value in prologue.graph.input), *(state.name for state in program.states),
                *head_inputs]
    order_out = [*head_outputs, *(state.output for state in program.states)]
    graph = helper.make_graph(nodes, "main_graph", [inputs[name] for name in order_in],
                              [outputs[name] for name in order_out], initializers)
    model = helper.make_model(graph, opset_imports=list(prologue.opset_import), producer_name=prologue.producer_name,
                              producer_version=prologue.producer_version)
    model.ir_version = prologue.ir_version
    return model, weights


def _add_piece(piece: onnx.ModelProto, prefix: str, names: dict[str, str], piece_weights: dict[str, ProgramWeight],
               layer_names: tuple[str, str] | None, nodes: list, initializers: list,
               weights: dict[str, ProgramWeight]) -> onnx.GraphProto:
    """Append a traced piece's nodes, constants and weights, its values renamed: those in `names` as it says, its
    weights with `layer_names` (the traced layer's checkpoint prefix, this layer's) swapped in, the rest prefixed;
    returns the piece's graph so renamed (its inputs and outputs as the joined graph names them)."""
    def weight_name(name: str) -> str:
        if layer_names and name.startswith(layer_names[0]):
            return layer_names[1] + name[len(layer_names[0]):]
        return name if piece_weights[name].source is not None else prefix + name

    def rename(name: str) -> str:
        if not name:
            return name         # an omitted optional input
        if name in names:
            return names[name]
        return weight_name(name) if name in piece_weights else prefix + name

    for name, weight in piece_weights.items():
        source = weight.source and weight_name(weight.source)
        weights[weight_name(name)] = ProgramWeight(weight.shape, source, weight.transposed, weight.value)
    graph = onnx.GraphProto()
    graph.CopyFrom(piece.graph)
    _rename_values(graph, rename, prefix)
    initializers.extend(graph.initializer)
    nodes.extend(graph.node)
    return graph


def _drop_trace_records(graph: onnx.GraphProto) -> None:
    """Remove what the exporter records of the tracing: each node's Python stack trace, with the absolute path of
    the file that traced it, and torch.export's symbol names (so the same model gives the same bytes on any
    machine), and the shapes of intermediate values (`value_info`, in torch.export's symbol expressions such as
    `(s4//14)`). Given those shapes, onnxruntime's allocation planner held about one attention-score tensor more at
    once: the real-width 4.5 vision encoder at 1024 patches peaked 73 MiB higher than with none (onnxruntime infers
    the shapes itself)."""
    del graph.metadata_props[:]
    del graph.value_info[:]
    for node in graph.node:
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _drop_trace_records(attribute.g)


def _weights_aside(module: _Bundle) -> dict[str, ProgramWeight]:
    """Each parameter and buffer of `module` by its path (the name torch.export gives its initializer) → where its
    data comes from; those the programs computed (not on the meta device) are moved there, their values kept."""
    weights = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        shape = tuple(tensor.shape)
        source = getattr(tensor, "mcq_source", None)
        if source is not None:
            weights[name] = ProgramWeight(shape, source, getattr(tensor, "mcq_transposed", False))
            continue
        if tensor.is_meta:
            _, piece, path = name.split(".", 2)
            raise McqError(f"{type(module.pieces[int(piece)]).__name__} tensor {path} holds checkpoint data but names "
                           "no source (mcq_source)")
        weights[name] = ProgramWeight(shape, value=tensor.detach().float().numpy().copy())
        owner, _, attribute = name.rpartition(".")
        holder = module.get_submodule(owner)
        meta = tensor.detach().to("meta")
        if attribute in holder._parameters:
            holder._parameters[attribute] = type(tensor)(meta, requires_grad=False)
        else:
            holder._buffers[attribute] = meta
    return weights


def _named_weights(model: onnx.ModelProto, weights: dict[str, ProgramWeight]) -> dict[str, ProgramWeight]:
    """Rename each weight read by the graph's nodes to the checkpoint tensor it holds (a computed one keeps its
    path); returns the weights by their new names, in the program's order."""
    renames = {name: weight.source for name, weight in weights.items() if weight.source is not None}
    clashes = [source for source, count in Counter(renames.values()).items() if count > 1]
    if clashes:
        raise McqError(f"checkpoint tensors {sorted(clashes)[:3]} are held by two parameters of one program")
    # The exporter's own initializers (folded constants) are named `val_12` and the like; one that bore a checkpoint
    # tensor's name would be shadowed by the rename.
    taken = {tensor.name for tensor in model.graph.initializer} & set(renames.values())
    if taken:
        raise McqError(f"initializer names {sorted(taken)[:3]} are taken twice in the traced graph")
    _rename_values(model.graph, lambda name: renames.get(name, name))
    return {renames.get(name, name): weight for name, weight in weights.items()}


def _rename_values(graph: onnx.GraphProto, rename: Callable[[str], str], node_prefix: str = "") -> None:
    """Rename every value of `graph` by `rename` (its initializers, inputs and outputs, its nodes' inputs and
    outputs, and the same in each node's body: a Scan's, which may read outer values by name), and put
    `node_prefix` before its nodes' names. A traced graph has no value infos left to rename (`_drop_trace_records`)."""
    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for value in [*graph.input, *graph.output]:
        value.name = rename(value.name)
    for node in graph.node:
        node.name = node_prefix + node.name
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _rename_values(attribute.g, rename, node_prefix)


def _name_axes(model: onnx.ModelProto, axes) -> None:
    """Give the dynamic axes of inputs and outputs the program's names instead of torch.export's symbols."""
    symbols: dict[str, str] = {}
    for value in [*model.graph.input, *model.graph.output]:
        for axis, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param:
                symbols.setdefault(dim.dim_param, name)
    for value in [*model.graph.input, *model.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = symbols[dim.dim_param]


def write_traced_graph(graph: str, onnx_dir: Path, precision: str, graphs, weights, writer) -> tuple[str, bool]:
    """Trace one graph of the layout (the family's `graphs` on `weights`, a `MetaWeights`), then write its weights
    from the checkpoint one tensor at a time (a large one a block of rows at a time) into the graph's data file,
    quantized or halved as `precision` asks, and save it; returns (dtype, external)."""
    model, program_weights = _traced(graph, graphs, weights)
    quantized = _planned_matmuls(model, program_weights, writer)
    bits = {writer.plans[module].bits for module in quantized.values()}
    dtype = precision_dtype(bits, precision)
    path = onnx_dir / f"{graph}{DTYPE_SUFFIXES[dtype]}.onnx"
    store = TensorStore(onnx_dir / f"{path.name}_data")
    try:
        _write_weights(model, program_weights, quantized, writer, store, precision)
    finally:
        store.close()
    return dtype, save_graph(model, path, store)


# Traced graphs by what they are traced from: (graph, the model's structure) → the graph without its weights,
# serialized, and its weights. A program is traced on the meta device, so its graph is a function of the model's
# config and tensor shapes alone; tracing takes seconds, so the variants of one model in a process (`mcq build`:
# fp32, int4, --from) trace each layout once. The few most recent graphs are kept (a real-size decoder without
# weights is about a megabyte).
_TRACED: dict[tuple, tuple[bytes, dict[str, ProgramWeight]]] = {}
_TRACED_KEPT = 12


def _traced(graph: str, graphs, weights) -> tuple[onnx.ModelProto, dict[str, ProgramWeight]]:
    structure = weights.structure()
    if (graph, structure) not in _TRACED:
        for name, (model, program_weights) in trace_layout(graphs, weights).items():
            while len(_TRACED) >= _TRACED_KEPT:
                _TRACED.pop(next(iter(_TRACED)))
            _TRACED[name, structure] = (model.SerializeToString(), program_weights)
    data, program_weights = _TRACED[graph, structure]
    return onnx.load_from_string(data), dict(program_weights)


def trace_layout(graphs, weights) -> dict[str, tuple[onnx.ModelProto, dict[str, ProgramWeight]]]:
    """Every graph of the layout (`GRAPHS`) of a family's `graphs` on `weights` (a `MetaWeights`), without weights
    (`trace_graphs`): each graph's pieces (`program_pieces`) traced by one torch.onnx.export for all, then joined."""
    programs = {name: graphs(weights, name) for name in GRAPHS}
    pieces = {name: program_pieces(program) for name, program in programs.items()}
    traced = iter(trace_graphs([piece for name in GRAPHS for piece in pieces[name]]))
    layout = {}
    for name, program in programs.items():
        own = [next(traced) for _ in pieces[name]]
        layout[name] = join_layers(program, own) if isinstance(program, LayeredProgram) else own[0]
    return layout


def _planned_matmuls(model: onnx.ModelProto, weights: dict[str, ProgramWeight], writer) -> dict[int, str]:
    """Node index → Linear, for each MatMul on a Linear's weight that `writer`'s plans quantize (MatMulNBits)."""
    planned = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in weights:
            continue
        weight = weights[node.input[1]]
        module = node.input[1].removesuffix(".weight")
        plan = writer.plans.get(module)
        if weight.transposed and plan is not None and plan.source is not None:
            planned[index] = module
    return planned


def _write_weights(model: onnx.ModelProto, weights: dict[str, ProgramWeight], quantized: dict[int, str], writer,
                   store: TensorStore, precision: str) -> None:
    """Write the graph's weights into `store` and the graph: each planned MatMul made MatMulNBits with the tensors
    its Linear's plan gives (`WeightWriter.nbits_tensors`: an `mcq quantize` output's levels, or
    onnxruntime's quantizer), then every other weight; in fp16, float weights of at least FP16_MIN_ELEMENTS stored
    in float16, each read through a Cast to float32 (computed in float32: CPU kernels do)."""
    graph = model.graph
    initializers, casts, nodes = [], [], list(graph.node)
    for index, module in quantized.items():
        node, plan = nodes[index], writer.plans[module]
        packed, scales, zeros, (n, k) = writer.nbits_tensors(module)
        names = [f"{module}.weight_q{plan.bits}", f"{module}.weight_scales"]
        initializers += [store.tensor(names[0], packed), store.tensor(names[1], scales)]
        if zeros is not None:
            names.append(f"{module}.weight_zero_points")
            initializers.append(store.tensor(names[2], zeros))
        attributes = {"K": k, "N": n, "bits": plan.bits, "block_size": plan.block}
        if writer.accuracy_level:
            attributes["accuracy_level"] = writer.accuracy_level
        nodes[index] = helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output),
                                        name=f"{module}/MatMulNBits", domain=MS_DOMAIN, **attributes)
    read = {name for node in nodes for name in _inputs(node)}
    for name, weight in weights.items():
        if name not in read:
            continue            # a quantized Linear's float weight
        if weight.value is not None:
            initializers.append(store.tensor(name, weight.value))
            continue
        half = precision == "fp16" and math.prod(weight.shape) >= FP16_MIN_ELEMENTS
        rows = writer.float_rows(weight.source, transpose=weight.transposed, shape=weight.shape,
                                 dtype=np.float16 if half else np.float32)
        if half:
            initializers.append(store.tensor(f"{name}_fp16", rows))
            casts.append(helper.make_node("Cast", [f"{name}_fp16"], [name], to=onnx.TensorProto.FLOAT,
                                          name=f"{name}/cast"))
        else:
            initializers.append(store.tensor(name, rows))
    del graph.node[:]
    graph.node.extend(casts + nodes)
    graph.initializer.extend(initializers)
    if quantized and not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _inputs(node: onnx.NodeProto) -> Iterator[str]:
    """The values `node` reads, those of its subgraphs (a Scan's body) included."""
    yield from node.input
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            for inner in attribute.g.node:
                yield from _inputs(inner)
