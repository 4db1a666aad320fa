"""The calibration driver: real forward passes through vision tower → resampler → LLM, one block at a time.

Each block (a SigLIP encoder layer, the resampler, an LLM decoder layer) is materialized from the checkpoint, fed
the inputs its predecessor produced for every calibration sample, quantized, run again to produce the inputs of the
next block (unless the quantizer hands back outputs it already computed), handed to the writer and released. What
the next block sees is the quantizer's choice (it leaves the block's forward as later blocks should see it): GPTQ
blocks propagate their quantized outputs, AWQ blocks their smoothed, unquantized ones — llm-compressor's sequential
pipeline bit for bit in both cases (tests/quantize/test_llmc_parity.py). Nothing but the current block and the
cached activations is in memory, so peak memory does not grow with depth.

Inputs of a block are captured by running the model's own forward (`MiniCPMV.forward(data)`, the vision path
included) with the block swapped for a recorder, and blocks already done swapped for replays of their recorded
outputs. So slicing, packing, `image_bound` merging, rotary tables and attention masks come from the model code
itself, never from a copy of it here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcq.models.family import family_for
from mcq.models.minicpmv import MiniCPMV
from mcq.models.weights import CheckpointReader, named_blocks, release

Call = tuple[tuple[Any, ...], dict[str, Any]]
Origin = tuple[str, int]   # (kind, index) of the calibration sample a batch row comes from


class Calls(list):
    """A block's recorded calls (each `(args, kwargs)`, a list like any other), with `origins[i][row]`: the sample
    (kind, index) each batch row of call i comes from, so that a quantizer can sample tokens across samples and
    their kinds. Encoded samples carry their kind under "kind" (`calibration_samples`); "" when they do not."""

    def __init__(self, calls=(), origins: list[tuple[Origin, ...]] | None = None):
        super().__init__(calls)
        self.origins = origins if origins is not None else [() for _ in self]


class _Stop(Exception):
    """Raised by a recorder to end a forward pass once the block's inputs are captured."""


class _Recorder(nn.Module):
    """Stands in for a block: records each call's (args, kwargs) and the sample it came from; either stops the
    forward or passes input on."""

    def __init__(self, calls: list[Call], stop: bool, origin: Callable[[], Origin] = lambda: ("", -1)):
        super().__init__()
        self.calls, self.stop, self.origin = calls, stop, origin
        self.origins: list[Origin] = []

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        self.origins.append(self.origin())
        if self.stop:
            raise _Stop
        return args[0]


class _Replay(nn.Module):
    """Stands in for a finished block: returns its recorded outputs in call order."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs, self.position = outputs, 0

    def forward(self, *args, **kwargs):
        output = self.outputs[self.position]
        self.position += 1
        return output


@contextmanager
def _swapped(parent: nn.Module, attribute: str, replacement: nn.Module) -> Iterator[None]:
    original = getattr(parent, attribute)
    setattr(parent, attribute, replacement)
    try:
        yield
    finally:
        setattr(parent, attribute, original)


@contextmanager
def _replaying(module: nn.Module, outputs: list[torch.Tensor] | None) -> Iterator[None]:
    """`module` hands back `outputs` in call order instead of computing them (its attributes stay as they are,
    for the code around it that reads them); with None, it computes as usual."""
    if outputs is None:
        yield
        return
    module.forward = _Replay(outputs).forward
    try:
        yield
    finally:
        del module.forward


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass
class BlockHandler:
    """What the driver calls for every block; the quantization method and the writer live behind it."""

    # Calibrate on the calls and quantize in place; may return the block's outputs on the calls as the next block
    # should see them, when it computed them anyway (else None, and the driver runs the block).
    quantize: Callable[[str, nn.Module, list[Call]], list[torch.Tensor] | None]
    emit: Callable[[str, nn.Module], None]                    # hand the quantized block to the writer


class SequentialDriver:
    def __init__(self, model: MiniCPMV, reader: CheckpointReader, samples: Sequence[dict[str, Any]],
                 dtype: torch.dtype, device: torch.device | str):
        self.model, self.reader, self.samples = model, reader, list(samples)
        # One slice per vision-tower call while capturing: slices of a batch are padded to the longest, and padded
        # patches would enter the calibration statistics (AWQ's activation means, GPTQ's Hessians) as if they were
        # image content. `_batch_equal_shapes` then regroups slices of equal length, which need no padding.
        model.config.vision_batch_size = 1
        self.dtype, self.device = dtype, torch.device(device)
        self._sample = -1   # the sample the forward in progress runs

    def _origin(self) -> Origin:
        return str(self.samples[self._sample].get("kind", "")), self._sample

    # -- running the model's own forward with blocks swapped out ----------------------------------------------------
    def _forward_all(self) -> None:
        for self._sample, data in enumerate(self.samples):
            try:
                with torch.no_grad():
                    self.model(data, use_cache=False)
            except _Stop:
                pass

    def _on_device(self, data: dict[str, Any]) -> dict[str, Any]:
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(self.device)
            if isinstance(value, list):
                return [move(v) for v in value]
            return value
        return {key: move(value) for key, value in data.items()}

    def _capture(self, vision_layers: nn.Module, resampler: nn.Module, llm_layers: nn.Module,
                 embedded: list[torch.Tensor] | None = None) -> None:
        """One forward over all samples with the encoder layers, the resampler and the decoder layers swapped, and
        the patch embeddings replayed from `embedded` when given."""
        with _swapped(self.model.vpm.encoder, "layers", vision_layers), \
                _replaying(self.model.vpm.embeddings, embedded), \
                _swapped(self.model, "resampler", resampler), \
                _swapped(self.model.llm.model, "layers", llm_layers):
            self._forward_all()

    def _capture_vision_layer_inputs(self) -> Calls:
        recorder = _Recorder([], stop=False, origin=self._origin)
        stop = _Recorder([], stop=True)  # text-only samples never reach the resampler; stop them at the LLM
        self._capture(nn.ModuleList([recorder]), stop, nn.ModuleList([stop]))
        return Calls(recorder.calls, [(origin,) for origin in recorder.origins])

    # The later passes run the vision tower's forward again (its packing and masks feed what follows) but replay
    # its patch embeddings, `embedded`: the first layer's recorded inputs, one per slice in call order.
    def _capture_resampler_inputs(self, vision_outputs: list[torch.Tensor], embedded: list[torch.Tensor]) -> Calls:
        recorder = _Recorder([], stop=True, origin=self._origin)
        self._capture(nn.ModuleList([_Replay(vision_outputs)]), recorder, nn.ModuleList([_Recorder([], stop=True)]),
                      embedded)
        return Calls(recorder.calls, [(origin,) for origin in recorder.origins])

    def _capture_llm_layer_inputs(self, resampler_outputs: list[torch.Tensor], embedded: list[torch.Tensor]) -> Calls:
        recorder = _Recorder([], stop=True, origin=self._origin)
        self._capture(nn.ModuleList(), _Replay(resampler_outputs), nn.ModuleList([recorder]), embedded)
        return Calls(recorder.calls, [(origin,) for origin in recorder.origins])

    # -- the walk ----------------------------------------------------------------------------------------------------
    def _materialize_shell(self) -> None:
        """Everything outside the blocks that a forward needs (embeddings, norms); the LM head is never needed.

        Embedding tables keep their stored dtype and, on CPU, stay in the memory-mapped shard (a lookup reads its
        rows; the 151,748 x 4096 table of an 8B model would be 2.5 GB in float32 for the whole run); their output
        is cast to the compute dtype, which is exactly the lookup in a cast table."""
        blocks = {name for name, _ in named_blocks(self.model)}
        head = family_for(self.model.config.model_type).lm_head
        for name, module in self.model.named_modules():
            if name in blocks or name == head or any(name.startswith(b + ".") for b in blocks):
                continue
            own = [n for n, p in module.named_parameters(recurse=False)]
            if not own:
                continue
            tensors = self.reader.read_params([f"{name}.{n}" if name else n for n in own])
            table = isinstance(module, nn.Embedding)
            for n, full in zip(own, tensors):
                tensor = tensors[full].to(self.device, None if table else self.dtype)
                setattr(module, n, nn.Parameter(tensor, requires_grad=False))
            if table:
                module.register_forward_hook(lambda _module, _args, output: output.to(self.dtype))

    def run(self, handler: BlockHandler, progress: Callable[[str], None] | None = None) -> None:
        self.samples = [self._on_device(s) for s in self.samples]
        self._materialize_shell()
        calibrating = bool(self.samples)
        slices = self._capture_vision_layer_inputs() if calibrating else Calls()
        calls, placement = _batch_equal_shapes(slices)
        embedded = [args[0] for args, _ in slices]
        del slices
        outputs: list[torch.Tensor] = []
        stage = "vision"
        for name, block in named_blocks(self.model):
            if name == "resampler":
                per_slice = [outputs[batch][row: row + 1] for batch, row in placement]
                calls = self._capture_resampler_inputs(per_slice, embedded) if calibrating else Calls()
            elif name.startswith("llm.") and stage != "llm":
                calls = self._capture_llm_layer_inputs(outputs, embedded) if calibrating else Calls()
                stage, embedded = "llm", []
            if progress:
                progress(name)
            self.reader.materialize(block, name, self.dtype, self.device)
            known = handler.quantize(name, block, calls)
            if known is not None:
                outputs = known
            else:
                with torch.no_grad():
                    outputs = [_output_tensor(block(*args, **kwargs)) for args, kwargs in calls]
            handler.emit(name, block)
            release(block)
            # The shards are memory-mapped, and every page a block was read from stays resident (and counts in the
            # process's RSS) while its mapping is open: kept open, the whole checkpoint would end up in memory by
            # the last block. Closing the handles unmaps them; the next block reopens what it needs.
            self.reader.close()
            if name.startswith("vpm.") or name.startswith("llm."):
                calls = Calls([((out, *args[1:]), kwargs) for out, (args, kwargs) in zip(outputs, calls)],
                              calls.origins)


def _batch_equal_shapes(calls: Calls) -> tuple[Calls, list[tuple[int, int]]]:
    """Concatenate single-slice vision calls of equal length into batches (no padding needed between equals).

    Per-slice calls keep padding out of the statistics but make every calibration forward tiny, and
    llm-compressor's per-batch overhead (AWQ runs each parent module once per batch and grid point) then dominates.
    Slices of a resolution share a length, so a few batches cover them all. Every tensor argument is batch-first
    (hidden states, attention masks), so calls whose tensors agree in shape past dim 0 and whose other arguments
    are equal concatenate along dim 0. Returns the batched calls and, per original call, (batch index, row).
    """
    def signature(value):
        return ("tensor", tuple(value.shape[1:])) if isinstance(value, torch.Tensor) else ("value", repr(value))

    def join(values):
        return torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0]

    groups: dict[tuple, list[int]] = {}
    for index, (args, kwargs) in enumerate(calls):
        key = (tuple(signature(a) for a in args), tuple((k, signature(v)) for k, v in sorted(kwargs.items())))
        groups.setdefault(key, []).append(index)
    batched, placement = Calls(), [(0, 0)] * len(calls)
    for batch, members in enumerate(groups.values()):
        args = tuple(join([calls[i][0][position] for i in members]) for position in range(len(calls[members[0]][0])))
        kwargs = {k: join([calls[i][1][k] for i in members]) for k in calls[members[0]][1]}
        batched.append((args, kwargs))
        batched.origins.append(tuple(origin for i in members for origin in calls.origins[i]))
        for row, index in enumerate(members):
            placement[index] = (batch, row)
    return batched, placement
