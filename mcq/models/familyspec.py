"""The questions every model family answers for mcq's tools, as one value per family (`mcq.models.family.FAMILY`
maps a config.json `model_type` to it): how to build its module tree, what its components are, which repeated
blocks the block-by-block quantizer walks in data-flow order, and the few module names the tools look up.

The resampler family (2.6 / 4.0 / 4.5, mcq's own `MiniCPMV`) and 4.6 (transformers' `MiniCPMV4_6*`) each hold one
in their folder; nothing outside `mcq/models/` branches on which it is."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from torch import nn

from .ggufspec import GgufLayout


@dataclass(frozen=True)
class PaddableMlp:
    """An MLP whose intermediate width can grow with zeros: `consumer`'s inputs are `producers`' outputs through an
    elementwise function that maps 0 to 0 (SigLIP's GELU between fc1 and fc2; SiLU(gate) * up before down_proj),
    so zero rows appended to the producers and zero columns to the consumer leave the block's function exactly
    unchanged. That is what `non_divisible: pad` relies on to give the consumer an input width its group size
    divides. Names are relative to the block; `width_key` is where config.json keeps the width (the path a
    quantized output with padded MLPs rewrites).

    `derived_from`: the component whose MLP width the model computes this one's from, as a multiple of it (4.6's
    vit_merger MLP is vision_config.intermediate_size x the window's 2 x 2 wide): such an MLP has no `width_key`,
    never grows on its own, and grows with that component's MLP, keeping the ratio of their widths."""

    consumer: str
    producers: tuple[str, ...]
    width_key: tuple[str, ...] | None
    derived_from: str | None = None

    def role(self, name: str) -> str | None:
        """"consumer" or "producer" for a Linear (full name) of this MLP, None for any other."""
        if name.endswith("." + self.consumer):
            return "consumer"
        return "producer" if any(name.endswith("." + producer) for producer in self.producers) else None


# An activation-smoothing pair inside a block, for AWQ-style scaling: (smooth layer, balance layers), names relative
# to the block. The smooth layer's output channels are divided by s and the balance layers' input channels
# multiplied by s, which leaves the block's function unchanged only where nothing nonlinear sits between them.
# A third element, PER_HEAD, says the smooth layer is a norm applied head by head with one weight per channel of a
# head, shared by every head, and the balance layers take all heads' channels (head-major): the scales are then one
# per channel of a head, the same for every head.
SmoothingPair = tuple[str, tuple[str, ...]] | tuple[str, tuple[str, ...], str]
PER_HEAD = "per_head"


class CalibrationEncoder(Protocol):
    """Turns calibration and evaluation samples (`mcq.calibration.Sample`: a conversation, its answer included) into
    the inputs of one forward of the family's model (`Calibration.forward` runs it)."""

    video: bool     # whether calibration runs video samples (it leaves them out where not)
    tokenizer: Any

    def __call__(self, sample: Any, max_slice_nums: int | None) -> dict[str, Any]: ...

    def render(self, turns: Any, add_generation_prompt: bool) -> str:
        """The chat-template text of `turns` with one unexpanded image marker per image (an added token, so the
        tokens around it do not depend on its expansion): what evaluation finds the answer's tokens by."""


@dataclass(frozen=True)
class CaptureStage:
    """A run of blocks (from `first_block` to the next stage's first) each of which takes the previous one's output
    as its first argument, untouched by the model's code between them; the block-by-block driver captures a stage's
    inputs with one forward over the calibration samples. Between stages the model's own code (a norm, a merge of
    vision features into the text embeddings) turns one stage's outputs into the next one's inputs.

    `per_vision_call`: the model runs the stage once per vision-tower call (per slice, per run of equal-size
    images), not once per sample. `batches`: calls of equal shapes concatenate along dim 0 (every tensor argument is
    batch-first, nothing else differs between them)."""

    first_block: str
    per_vision_call: bool = False
    batches: bool = False


@dataclass(frozen=True)
class Calibration:
    """How the block-by-block driver (`mcq.quantize.sequential`) captures block inputs through this family's own
    forward, and how calibration samples become that forward's inputs."""

    stages: tuple[CaptureStage, ...]        # in data-flow order; the first starts at the first block
    # The model's own forward on one encoded sample (no cache: one teacher-forced pass).
    forward: Callable[[nn.Module, dict[str, Any]], Any]
    # What the model is set to while the driver captures (how the vision tower is called: see each family).
    capturing: Callable[[nn.Module], AbstractContextManager[None]]
    # The checkpoint's encoder of calibration samples (`CalibrationEncoder`), from its directory.
    open_encoder: Callable[[Path], CalibrationEncoder]


class ServedModel(Protocol):
    """A loaded model of the family as the validator runs it in transformers (`mcq.validate`'s transformers
    runner), on the inputs of the family's `CalibrationEncoder`. Tensors come back on the model's device."""

    tokenizer: Any
    terminators: set[int]   # token ids that end an answer

    def inputs(self, data: dict[str, Any], vision: Any = None) -> dict[str, Any]:
        """The model's inputs of an encoded sample, on its device; `vision` (this family's `vision` output, maybe
        another model's) replaces the features of the sample's images."""

    def vision(self, inputs: dict[str, Any]) -> Any:
        """The vision path's output blocks `[G, tokens, hidden]`: what the LLM gets for each image (slice)."""

    def logits(self, inputs: dict[str, Any]) -> Any:
        """Teacher-forced logits `[length, vocab]`."""

    def generate(self, inputs: dict[str, Any], max_new_tokens: int) -> list[int]:
        """Greedy continuation (the new tokens only; the caller cuts at a terminator)."""

    def prefill(self, inputs: dict[str, Any]) -> tuple[Any, Any]:
        """(cache, last position's logits `[1, vocab]`) of a prefill over the prompt."""

    def step(self, token: Any, cache: Any) -> tuple[Any, Any]:
        """(cache, logits `[1, vocab]`) of one decode step of `token` (`[1, 1]` ids) after `cache`."""


class VllmInputs(Protocol):
    """How vLLM's model of the family takes an encoded sample's images (`mcq.validate`'s vLLM runner): the prompt
    marker its multimodal processor expands into an image's placeholder, the inputs of its vision path, and
    features computed elsewhere as image embeddings. Tensors are the family's `ServedModel` layouts."""

    tokenizer: Any
    terminators: list[int]   # token ids that end an answer
    marker: str              # the prompt text vLLM expands into one image's placeholder
    # ... and into one video's (None: vLLM's model of the family does not take a video as the reference lays it out)
    video_marker: str | None
    # The dtype vLLM's CPU build serves the family in, whatever is asked (None: the one asked).
    cpu_dtype: str | None

    def vision_inputs(self, data: dict[str, Any], dtype: Any) -> dict[str, Any]:
        """The argument of vLLM's `get_vision_hidden_states` for an encoded sample's images."""

    def vision_blocks(self, states: Any) -> Any:
        """vLLM's `get_vision_hidden_states` output → the family's vision blocks `[G, tokens, hidden]`."""

    def image_embeds(self, data: dict[str, Any], slices: list[int], vision: Any) -> dict[str, Any]:
        """vLLM's image-embeddings input for `vision` blocks (another model's), `slices[i]` of them for image i."""

    def video_embeds(self, data: dict[str, Any], vision: Any) -> dict[str, Any]:
        """vLLM's video-embeddings input for the sample's video, from all its `vision` blocks (with `video_marker`)."""


@dataclass(frozen=True)
class ChatRequest:
    """What `mcq chat` asks a model: a question about images (or a video), and how to answer. An option left None was
    not given: each family applies its own default there, and refuses an option that does not apply to it rather
    than ignore it."""

    model: str                          # the model as the user named it (a path, tiny:VERSION), for messages
    question: str
    images: tuple[Image.Image, ...]
    video: str | None = None            # a video file
    frames: str | None = None           # a folder of video frames
    fps: float | None = None            # frames per second of `frames`, sampling rate of `video`
    packing: int | None = None          # video frames per vision block
    max_new_tokens: int = 64
    max_slice_nums: int | None = None
    sampling: bool = False              # the release's sampling settings instead of greedy
    thinking: bool = False              # the chat template's enable_thinking
    stream: bool = False                # the answer as an iterator of text pieces
    seed: int = 0
    dtype: str = "auto"


@dataclass(frozen=True)
class TracedProgram:
    """One graph of an export traced from a torch program (`torch.onnx.export`): the module, example inputs to trace
    it with (no dynamic axis of size 0 or 1: torch.export would fix such an axis to that size), the graph's input
    and output names in the module's order, `dynamic_shapes` as `torch.export` takes them, and the name each dynamic
    axis gets in the graph (`{input or output name: {axis: name}}`)."""

    module: nn.Module
    example: tuple[Any, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_shapes: tuple[Any, ...]
    axes: Mapping[str, Mapping[int, str]]
    # Dynamic axis name → (least, most) it takes, for exporters that bound flexible shapes (Core ML); absent: the
    # axis is unbounded there too.
    bounds: Mapping[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class StateTensor:
    """One state tensor the decoder program takes and returns: its input and output names, and its shape with None
    for a dynamic axis (axis 0 is the batch; a KV cache's axis 2 grows by the new positions)."""

    name: str
    output: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class LayeredProgram:
    """A graph of layers as pieces traced apart and joined, so that tracing costs the same at any depth: `prologue`
    (graph inputs → the values every layer reads, its outputs), one program per kind of layer (`layer(i)`:
    hidden_states, the prologue's outputs and layer i's two state inputs, if any → layer_output and its two state
    outputs), and `head` (hidden_states and graph inputs of its own → the graph's outputs). The first layer reads
    `first_hidden`, a prologue input or output. Layers of one `kind(i)` share one trace: layer i's weights are the
    traced layer's with its checkpoint name prefix, `layer_prefix(i)`, in place of the traced one's. The joined
    graph takes the
    prologue's inputs, `states` (two per layer, in layer order; none for a stateless program) and the head's own
    inputs, and gives the head's outputs and the states' outputs, their dynamic axes named as the pieces name
    them."""

    prologue: TracedProgram
    layer: Callable[[int], TracedProgram]
    kind: Callable[[int], Any]
    layers: int
    layer_prefix: Callable[[int], str]
    head: TracedProgram
    states: tuple[StateTensor, ...]
    first_hidden: str


@dataclass(frozen=True)
class VisualInput:
    """One kind of visual input of an encoded sample (images, video frames): the keys of its pixels and of its
    blocks' sizes, and the config attribute naming the token its features replace in the text."""

    pixels: str
    sizes: str
    token: str


@dataclass(frozen=True)
class Programs:
    """What a host written for any family needs to run the exports of a family's runtime-neutral torch programs
    (vision image → LLM tokens, token embeddings, decoder step with explicit state): the vision program's inputs of
    an image (its data-dependent index tables), the decoder's state, and the programs Core ML converts."""

    # (config, an encoded sample's pixel_values, its target_sizes) → per image, the vision program's inputs by name.
    vision_inputs: Callable[[Any, Any, Any], list[Mapping[str, Any]]]
    # (config, target_sizes) → per image, how many LLM tokens the vision program gives it.
    image_tokens: Callable[[Any, Any], list[int]]
    # config → the decoder's state tensors, in its input order.
    state: Callable[[Any], list[StateTensor]]
    # For exporters whose programs keep their state inside (Core ML): (ExportWeights, a range of decoder layers,
    # positions cached) → those layers for one new position per call, each state a buffer named in the module's
    # `state_names`; and ExportWeights → the final norm and LM head (hidden states → logits).
    stateful_decoder: Callable[[Any, range, int], nn.Module]
    head: Callable[[Any], nn.Module]
    # The checkpoint name prefix of decoder layer i is f"{decoder_layers}{i}." (exporters size packages by it).
    decoder_layers: str
    # The visual inputs an encoded sample may hold, in the order their blocks come in a sample's vision output;
    # each goes through the vision program alike.
    visuals: tuple[VisualInput, ...]
    # (a directory with the checkpoint's tokenizer and processor files, ChatRequest) → the model inputs of that
    # question, as the family's `chat` builds them (`mcq chat` on an export of the programs).
    chat_inputs: Callable[[Path, ChatRequest], dict[str, Any]]
    # ExportWeights → the vision program whole (one image → its LLM tokens), for exporters that trace it as one
    # module (Core ML; the ONNX layout's vision graph is traced in pieces, `Family.graphs`).
    vision: Callable[[Any], TracedProgram]


@dataclass(frozen=True)
class Family:
    name: str                                       # config.json model_type, and the package under mcq/models
    config_class: type                              # a transformers config class
    model_class: type                               # the class that holds the official layout
    # Its components in data-flow order: its folder's components.yaml (`mcq.models.families.family_components`),
    # which also says which names belong to which (`mcq.models.family.component_or_other`).
    components: tuple[str, ...]
    blocks: Callable[[nn.Module], Iterator[tuple[str, nn.Module]]]   # the repeated blocks, in data-flow order
    embedding: str          # the LLM's input embedding table (its stored dtype is the checkpoint's)
    lm_head: str            # the output head: never materialized by the block-by-block driver
    # config.json → (release, LLM name), for reports and cards; a McqError for a release the family lacks.
    describe: Callable[[dict[str, Any]], tuple[str, str]]
    # Component → the MLP of its blocks that `non_divisible: pad` may grow (`PaddableMlp`); a component absent
    # here is never padded (fallback_group goes per channel there, `pad` is refused).
    paddable_mlps: Mapping[str, PaddableMlp]
    # Component → the AWQ smoothing pairs inside each of its blocks (`SmoothingPair`).
    smoothing_pairs: Mapping[str, tuple[SmoothingPair, ...]]
    # Component → the modules inside its blocks whose output at one token depends on the other tokens of its
    # sequence (attention). AWQ's scale search measures its loss on a sample of tokens; a parent that is or holds
    # one of these must run on whole sequences, every other module (Linears, MLPs) maps each token on its own.
    token_mixing: Mapping[str, tuple[str, ...]]
    # What a norm adds to its weight before scaling (1 for a norm that computes x̂ · (1 + weight), as Qwen3.5's
    # RMSNorm does; 0 for x̂ · weight): smoothing such a norm by s divides offset + weight by s.
    norm_offset: Callable[[nn.Module], float]
    # How the block-by-block driver captures calibration inputs through this family's forward (AWQ, GPTQ).
    calibration: Calibration
    # A model loaded from the checkpoint in PATH, as the validator runs it (`ServedModel`): (model, PATH, device).
    serve: Callable[[nn.Module, Path, Any], ServedModel]
    # How vLLM's model takes the family's samples (`VllmInputs`), for the checkpoint in PATH.
    vllm_inputs: Callable[[Path], VllmInputs]
    # Output format ("compressed-tensors", "bitsandbytes") → the Python that loads such an output of this family
    # (model cards; PATH = the output).
    load_code: Mapping[str, str]
    # Writes the tiny checkpoint an `mcq.models.tiny.TinySpec` asks for into an empty staging directory (its
    # folder's tiny.py); a McqError for an option the family has no tiny model for.
    write_tiny: Callable[[Path, Any], None]
    # Its two llama.cpp files (`mcq export --format gguf`): architecture, metadata and tensors (its gguf.py).
    gguf: GgufLayout
    # Whether a compressed-tensors `quantization_config` must name every module plainly (no `re:` patterns over
    # layers): vLLM's model of the family names its modules otherwise than the checkpoint and translates
    # `quantization_config` to its names with its checkpoint-name mapper, which maps plain names only; a pattern
    # stays as written, matches none of vLLM's modules, and the packed weights then meet unquantized layers.
    plain_quantization_names: bool
    # `mcq chat`: the answer of a checkpoint of the family (`mcq.models.loading.Checkpoint`) to a `ChatRequest`, its
    # text, or with `stream` an iterator of its pieces; a McqError for an option the family does not take.
    chat: Callable[[Any, ChatRequest], str | Iterator[str]]
    # The graphs of the ONNX layout (vision_encoder, embed_tokens, decoder_model_merged) as runtime-neutral torch
    # programs, which `mcq export --format onnx` traces: (ExportWeights, or MetaWeights to trace without weights,
    # graph name) → its TracedProgram, or a LayeredProgram for a graph of layers (its `programs.py`).
    graphs: Callable[[Any, str], TracedProgram | LayeredProgram]
    # What hosts written for any family run its exports with (`Programs`: the vision program's inputs, the decoder's
    # state, Core ML's stateful decoder chunks); None: its exports have hosts of their own (the resampler family:
    # `mcq.export.onnx.OnnxMiniCPMV`, `mcq.export.coreml`'s packages and host).
    programs: Programs | None
