"""The calibration driver: real forward passes through the model (vision tower → resampler or mergers → LLM), one
block at a time.

Each block (a SigLIP encoder layer, the resampler, 4.6's vit_merger and merger, an LLM decoder layer) is
materialized from the checkpoint, fed the inputs its predecessor produced for every calibration sample, quantized,
run again to produce the inputs of the next block (unless the quantizer hands back outputs it already computed),
handed to the writer and released. What the next block sees is the quantizer's choice (it leaves the block's forward
as later blocks should see it): GPTQ blocks propagate their quantized outputs, AWQ blocks their smoothed,
unquantized ones — llm-compressor's sequential pipeline bit for bit in both cases (tests/quantize/test_llmc_parity.py).
Nothing but the current block and the cached activations is in memory, so peak memory does not grow with depth.

Inputs of a block are captured by running the model's own forward (`Family.calibration.forward`, the vision path
included) with blocks swapped for recorders, and the last block already done swapped for a replay of its outputs.
The family splits its blocks into stages (`CaptureStage`): within a stage each block's first argument is the
previous block's output, and one forward per stage records every block's call (its other arguments: masks, rotary
tables, window indices, which may differ per block, as between 4.6's linear- and full-attention layers, or before
and after its vit_merger). So slicing, packing, merging vision features into the text, rotary tables and attention
masks come from the model code itself, never from a copy of it here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mcq.models.family import family_for
from mcq.models.familyspec import CaptureStage
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

    def __init__(self, outputs: list[Any]):
        super().__init__()
        self.outputs, self.position = outputs, 0

    def forward(self, *args, **kwargs):
        output = self.outputs[self.position]
        self.position += 1
        return output


@contextmanager
def _swapped(model: nn.Module, name: str, replacement: nn.Module) -> Iterator[None]:
    """The module `name` of `model` (a ModuleList entry too: `layers.3`) is `replacement` for the duration."""
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    original = getattr(parent, attribute)
    setattr(parent, attribute, replacement)
    try:
        yield
    finally:
        setattr(parent, attribute, original)


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
    def __init__(self, model: nn.Module, reader: CheckpointReader, samples: Sequence[dict[str, Any]],
                 dtype: torch.dtype, device: torch.device | str):
        self.model, self.reader, self.samples = model, reader, list(samples)
        self.family = family_for(model.config.model_type)
        self.dtype, self.device = dtype, torch.device(device)
        self._sample = -1   # the sample the forward in progress runs

    def _origin(self) -> Origin:
        return str(self.samples[self._sample].get("kind", "")), self._sample

    # -- running the model's own forward with blocks swapped out ----------------------------------------------------
    def _forward_all(self) -> None:
        for self._sample, data in enumerate(self.samples):
            try:
                with torch.no_grad():
                    self.family.calibration.forward(self.model, data)
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

    def _capture(self, stages: list[_Stage], current: int, replayed: list[Any]) -> dict[str, Calls]:
        """One forward over all samples that records the calls of every block of stage `current`: the blocks of
        earlier stages pass their input on, except the previous stage's last, which replays its outputs `replayed`
        (so the model's code between the stages computes this stage's inputs from them); later blocks stop the
        forward. Within the stage every block but the last passes its input on (its recorded first argument is
        then not its real input: the driver gives it its predecessor's outputs); the last stops the forward too,
        unless the stage runs once per vision call (then the next stage's first block stops it)."""
        stage = stages[current]
        recorders: dict[str, _Recorder] = {}
        replacements: dict[str, nn.Module] = {}
        for index, other in enumerate(stages):
            for position, (name, _) in enumerate(other.blocks):
                last = position == len(other.blocks) - 1
                if index < current:
                    replay = index == current - 1 and last
                    replacements[name] = _Replay(replayed) if replay else _Recorder([], stop=False)
                elif index == current:
                    recorders[name] = _Recorder([], stop=last and not stage.spec.per_vision_call, origin=self._origin)
                    replacements[name] = recorders[name]
                else:
                    replacements[name] = _Recorder([], stop=True)
        with contextlib.ExitStack() as stack:
            for name, replacement in replacements.items():
                stack.enter_context(_swapped(self.model, name, replacement))
            self._forward_all()
        first = stage.blocks[0][0]
        # The first argument a later block of the stage recorded is the stage's input passed on: dropped here, so
        # that the stage's inputs are not held while its blocks run.
        return {name: Calls([(args if name == first else (None, *args[1:]), kwargs) for args, kwargs in recorder.calls],
                            [(origin,) for origin in recorder.origins])
                for name, recorder in recorders.items()}

    # -- the walk ----------------------------------------------------------------------------------------------------
    def _materialize_shell(self) -> None:
        """Everything outside the blocks that a forward needs (embeddings, norms); the LM head is never needed.

        Embedding tables keep their stored dtype and, on CPU, stay in the memory-mapped shard (a lookup reads its
        rows; the 151,748 x 4096 table of an 8B model would be 2.5 GB in float32 for the whole run); their output
        is cast to the compute dtype, which is exactly the lookup in a cast table."""
        blocks = {name for name, _ in named_blocks(self.model)}
        head = self.family.lm_head
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

    def _stages(self) -> list[_Stage]:
        specs = {spec.first_block: spec for spec in self.family.calibration.stages}
        stages: list[_Stage] = []
        for name, block in named_blocks(self.model):   # the first block starts the first stage
            if name in specs:
                stages.append(_Stage(specs[name], []))
            stages[-1].blocks.append((name, block))
        return stages

    def run(self, handler: BlockHandler, progress: Callable[[str], None] | None = None) -> None:
        self.samples = [self._on_device(s) for s in self.samples]
        self._materialize_shell()
        calibrating = bool(self.samples)
        stages = self._stages()
        replayed: list[Any] = []   # the outputs of the previous stage's last block, one per call of the forward
        with self.family.calibration.capturing(self.model):
            for current, stage in enumerate(stages):
                recorded = self._capture(stages, current, replayed) if calibrating else {}
                replayed = []   # the capture was the last forward to replay them
                first = recorded.get(stage.blocks[0][0], Calls())
                groups = _equal_shape_groups(first) if stage.spec.batches else [[i] for i in range(len(first))]
                del first
                outputs: list[Any] = []
                for position, (name, block) in enumerate(stage.blocks):
                    own = recorded.pop(name, Calls())
                    if stage.spec.batches:
                        own = _batched(own, groups)
                    calls = own if position == 0 else Calls(
                        [((out, *args[1:]), kwargs) for out, (args, kwargs) in zip(outputs, own)], own.origins)
                    del own
                    if progress:
                        progress(name)
                    outputs = self._block(handler, name, block, calls)
                    del calls
                # The next stage's capture replays them one per call of the forward: unbatched.
                replayed = [None] * sum(len(members) for members in groups)
                for batch, members in enumerate(groups):
                    for row, index in enumerate(members):
                        replayed[index] = outputs[batch][row: row + 1] if stage.spec.batches else outputs[batch]
                del outputs

    def _block(self, handler: BlockHandler, name: str, block: nn.Module, calls: Calls) -> list[Any]:
        """Materialize, quantize and emit one block; returns its outputs on `calls` as the next block sees them."""
        self.reader.materialize(block, name, self.dtype, self.device)
        outputs = handler.quantize(name, block, calls)
        if outputs is None:
            with torch.no_grad():
                outputs = [_output_tensor(block(*args, **kwargs)) for args, kwargs in calls]
        handler.emit(name, block)
        release(block)
        # The shards are memory-mapped, and every page a block was read from stays resident (and counts in the
        # process's RSS) while its mapping is open: kept open, the whole checkpoint would end up in memory by the
        # last block. Closing the handles unmaps them; the next block reopens what it needs.
        self.reader.close()
        return outputs


@dataclass
class _Stage:
    spec: CaptureStage
    blocks: list[tuple[str, nn.Module]]


def _equal_shape_groups(calls: Calls) -> list[list[int]]:
    """The calls (indices) that concatenate into one batch: single-slice vision calls of equal length (no padding
    needed between equals).

    Per-slice calls keep padding out of the statistics but make every calibration forward tiny, and
    llm-compressor's per-batch overhead (AWQ runs each parent module once per batch and grid point) then dominates.
    Slices of a resolution share a length, so a few batches cover them all. Every tensor argument is batch-first
    (hidden states, attention masks), so calls whose tensors agree in shape past dim 0 and whose other arguments
    are equal concatenate along dim 0 (`_batched`).
    """
    def signature(value):
        return ("tensor", tuple(value.shape[1:])) if isinstance(value, torch.Tensor) else ("value", repr(value))

    groups: dict[tuple, list[int]] = {}
    for index, (args, kwargs) in enumerate(calls):
        key = (tuple(signature(a) for a in args), tuple((k, signature(v)) for k, v in sorted(kwargs.items())))
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _batched(calls: Calls, groups: list[list[int]]) -> Calls:
    """`calls` concatenated along dim 0 by `groups` (`_equal_shape_groups` of the stage's first block, whose
    grouping every block of the stage shares: their other arguments are the first block's)."""
    def join(values):
        return torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0]

    batched = Calls()
    for members in groups:
        args = tuple(join([calls[i][0][position] for i in members]) for position in range(len(calls[members[0]][0])))
        kwargs = {k: join([calls[i][1][k] for i in members]) for k in calls[members[0]][1]}
        batched.append((args, kwargs))
        batched.origins.append(tuple(origin for i in members for origin in calls.origins[i]))
    return batched
