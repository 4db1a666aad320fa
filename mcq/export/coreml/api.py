"""`export_coreml`: a MiniCPM-V checkpoint (or an `mcq quantize` output of it) → Core ML packages for iOS / macOS.

Layout:

    OUT/
      MiniCPMV-vision.mlpackage   one slice (≤ 1088 patches) + host inputs → image_features [1, 64, hidden]; where
                                  the resampler packs video frames (4.5): the tower alone → vision_features, and
      MiniCPMV-resampler.mlpackage  1-6 frames' vision_features + key terms → image_features [1, 64, hidden]
      MiniCPMV-embed.mlpackage    input_ids → inputs_embeds (a quantized gather)          }
      MiniCPMV-llm-00.mlpackage   decoder layers of chunk 0: hidden states + rotary terms  }
      MiniCPMV-llm-01.mlpackage   + mask → hidden states, their KV cache in two iOS18      } unless --llm none
      ...                         states (key_cache, value_cache)                          }
      MiniCPMV-head.mlpackage     final norm + LM head: hidden states → logits             }
      minicpmv-coreml.json        preprocessing constants, token ids and the packages' I/O, for the Swift app
      README.md, mcq-manifest.json

MiniCPM-V 4.6 (a family with torch programs) has its packages traced from them (`traced.py`): one vision package
for one image of any size (no resampler package), decoder chunks that also hold the Gated DeltaNet states and take
one position per call; the sidecar says which (`family`).

The LLM is converted a chunk of layers at a time (`convert.decoder_chunks`: ≤ 1 GiB of fp16 weights each), each
chunk saved before the next is traced, as Apple's own conversions of large models split them into packages, so
the export's memory does not grow with depth. Every package is read back once saved (`program.load_program`: a
truncated package is refused there) for the op list and the weight sizes the result reports. The output is staged;
a failure leaves nothing behind.
"""

from __future__ import annotations

import gc
import json
import time
from functools import partial

import numpy as np
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from mcq.errors import McqError
from mcq.models.minicpmv.versions import embedding_scale

from .convert import GROUP_FRAMES, MAX_PATCHES, TARGETS, VISION_COMPRESSIONS, check_vision_compression

VISION_PACKAGE = "MiniCPMV-vision.mlpackage"
RESAMPLER_PACKAGE = "MiniCPMV-resampler.mlpackage"
EMBED_PACKAGE = "MiniCPMV-embed.mlpackage"
HEAD_PACKAGE = "MiniCPMV-head.mlpackage"
SIDECAR = "minicpmv-coreml.json"
SIDECAR_FORMAT = "mcq-coreml-2"     # 2: the decoder in chunk packages and a head package (1: one LLM package)


def decoder_package(index: int) -> str:
    return f"MiniCPMV-llm-{index:02d}.mlpackage"


# `--llm none` writes no LLM (the vision package alone); `fp16` an uncompressed one.
LLM_COMPRESSIONS = ("int4-block32", "palettize4", "int8", "fp16", "none")


@dataclass
class CoremlPackage:
    path: str
    compression: str
    bytes: int
    ops: list[str] = field(default_factory=list)
    # The least the weights could take (4 bits + an fp16 scale per block of 32 for int4) and bytes / that.
    physical_min_bytes: int | None = None
    weights_bytes: int | None = None


@dataclass
class CoremlExportResult:
    out: str
    version: str
    target: str
    vision: CoremlPackage
    llm: list[CoremlPackage] | None     # the decoder chunks in order, then the head
    embed: CoremlPackage | None
    weights_from: str
    seconds: float
    # With --from: LLM Linears not written from their stored int4 levels (module → why); the rest are exact.
    llm_fallbacks: dict[str, str] = field(default_factory=dict)
    # With --from and an --llm other than int4-block32: how every LLM Linear was re-rounded instead.
    llm_requantized: str | None = None
    # Where the resampler packs video frames (4.5): its own package, `vision` then being the tower alone.
    resampler: CoremlPackage | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.out}: MiniCPM-V {self.version} → Core ML ({self.target}) in {self.seconds:.1f} s "
                 f"(weights from {self.weights_from})"]
        for role, package in (("vision", self.vision), ("resampler", self.resampler), ("embed", self.embed),
                              *(("llm", p) for p in self.llm or ())):
            if package is not None:
                line = f"  {role:<10}{Path(package.path).name}  {package.compression}  {package.bytes / 2**20:.2f} MiB"
                if package.physical_min_bytes:
                    line += (f"  ({package.bytes / package.physical_min_bytes:.3f}x the physical minimum; "
                             f"weights {package.weights_bytes / package.physical_min_bytes:.3f}x)")
                lines.append(line)
        lines += [f"    requantized: {name} ({why})" for name, why in self.llm_fallbacks.items()]
        if self.llm_requantized:
            lines.append(f"    requantized: every LLM Linear ({self.llm_requantized})")
        return "\n".join(lines)


def check_options(target: str, vision: str, llm: str) -> None:
    """Refuse impossible combinations before any model is read."""
    check_vision_compression(vision, target)
    if llm not in LLM_COMPRESSIONS:
        raise McqError(f"--llm {llm!r}: choose one of {', '.join(LLM_COMPRESSIONS)}")
    if llm != "none" and TARGETS.index(target) < TARGETS.index("iOS18"):
        held = {"int4-block32": "int4 per-block weights", "palettize4": "grouped-channel palettes"}.get(llm)
        raise McqError(f"--llm {llm} needs --target iOS18 (the stateful KV cache{' and ' + held if held else ''} "
                       f"are iOS18 ops; {target} cannot hold them), or --llm none for the vision package alone")


def export_coreml(model: str | Path, out: str | Path, *, target: str = "iOS18", vision: str = "int8",
                  llm: str = "int4-block32", from_dir: str | Path | None = None, force: bool = False,
                  progress: bool = True) -> CoremlExportResult:
    from mcq.export.weights_source import ExportWeights

    from .convert import check_rope

    started = time.perf_counter()
    check_options(target, vision, llm)
    weights = ExportWeights(model, from_dir, every_family=True)
    try:
        if weights.checkpoint.family.programs is None:
            weights.spec   # the resampler family's packages are written for the releases it knows (else a McqError)
        if llm != "none":
            check_rope(weights.config.get_text_config())
        weights.check_output(Path(out), force)
        # Read before any conversion (minutes at 8B), so a checkpoint without its processor files fails at once.
        support = support_files(weights)
        return _export(weights, Path(out), target, vision, llm, from_dir, force, progress, started, support)
    finally:
        weights.close()


def _export(weights, out: Path, target: str, vision: str, llm: str, from_dir, force: bool, progress: bool,
            started: float, support: dict[str, Any]) -> CoremlExportResult:
    """Convert and save one package at a time (each released before the next is traced)."""
    from mcq.outputs import copy_support_files, staged_output, write_manifest

    from .convert import (convert_embeddings, convert_group_resampler, convert_head, convert_llm, convert_vision,
                          convert_vision_tower, decoder_chunks)
    from .traced import (convert_program_decoder, convert_program_embeddings, convert_program_head,
                         convert_program_vision, program_decoder_chunks)

    # A family with a generic host (4.6) has its packages made from its `Programs`, the resampler family's from its
    # own programs by `convert.py`; both give the same LLM packages' inputs and outputs.
    traced = weights.checkpoint.family.programs
    if traced is not None:
        embed_package = partial(convert_program_embeddings, weights, target)
        decoder_package_of = partial(convert_program_decoder, weights, traced, target)
        head_package = partial(convert_program_head, weights, traced, target)
        chunks_of = partial(program_decoder_chunks, weights, traced)
    else:
        embed_package = partial(convert_embeddings, weights, target)
        decoder_package_of = partial(convert_llm, weights, target)
        head_package = partial(convert_head, weights, target)
        chunks_of = partial(decoder_chunks, weights)

    fallbacks: dict[str, str] = {}
    with staged_output(out, force) as staging:
        packages, programs, chunks, vision_components = {}, {}, [], None

        def package(name: str, make: Callable[[], Any], compression: str) -> Any:
            """Make one package (`make`: its converted model, or the model and what its conversion reports beside
            it), save it and release it; returns what was reported (None where nothing was)."""
            made = make()
            model, reported = made if isinstance(made, tuple) else (made, None)
            del made
            packages[name], program = _save(model, staging / name, out / name, compression)
            # The sidecar needs each program's I/O and states only: its operations go with the model.
            programs[name] = replace(program, operations=[])
            # A conversion leaves its MIL graphs in reference cycles, with their weight arrays, which Python's
            # collector (counting objects, not bytes) left alive through the next conversions. Collected once
            # nothing refers to the model (this function holds the only reference): collected earlier, each
            # package's weights lived through the next one's conversion (fp16 decoder packages of two real-width
            # layers peaked at 3401, 4161, 4121 MiB; now 3426, 3449, 3449).
            del model
            gc.collect()
            return reported

        if traced is not None:
            _say(progress, f"converting the vision program, one image per call ({vision}, {target})")
            vision_components = package(VISION_PACKAGE, partial(convert_program_vision, weights, target, vision),
                                        vision)
        elif weights.spec.temporal:
            # The tower runs per frame (static shapes, as for an image slice); the resampler once per temporal group
            # over the packed keys of its frames, as the torch model's 3D resampler does.
            _say(progress, f"converting the vision tower ({vision}, {target})")
            package(VISION_PACKAGE, partial(convert_vision_tower, weights, target, vision), vision)
            _say(progress, f"converting the resampler of 1 to {GROUP_FRAMES[-1]} frames ({vision}, {target})")
            package(RESAMPLER_PACKAGE, partial(convert_group_resampler, weights, target, vision), vision)
        else:
            _say(progress, f"converting the vision tower + resampler ({vision}, {target})")
            package(VISION_PACKAGE, partial(convert_vision, weights, target, vision), vision)
        if llm != "none":
            compression = "none" if llm == "fp16" else llm
            _say(progress, f"converting the token embeddings ({llm})")
            package(EMBED_PACKAGE, partial(embed_package, compression), llm)
            chunks = chunks_of()
            for index, layers in enumerate(chunks):
                _say(progress, f"converting LLM decoder layers {layers.start}-{layers.stop - 1} of "
                               f"{weights.config.get_text_config().num_hidden_layers} with their states ({llm})")
                fallbacks.update(package(decoder_package(index), partial(decoder_package_of, compression, layers), llm))
            _say(progress, f"converting the LLM head ({llm})")
            fallbacks.update(package(HEAD_PACKAGE, partial(head_package, compression), llm))
        llm_packages = [packages[decoder_package(i)] for i in range(len(chunks))]
        result = CoremlExportResult(
            out=str(out), version=weights.checkpoint.release, target=target, vision=packages[VISION_PACKAGE],
            resampler=packages.get(RESAMPLER_PACKAGE),
            llm=llm_packages + [packages[HEAD_PACKAGE]] if chunks else None, embed=packages.get(EMBED_PACKAGE),
            llm_fallbacks=dict(sorted(fallbacks.items())), llm_requantized=_requantized(from_dir, llm),
            weights_from=str(from_dir) if from_dir else str(weights.model_path), seconds=0.0)
        (staging / SIDECAR).write_text(
            json.dumps(sidecar(weights, programs, support, {"vision": vision, "llm": llm}, chunks, vision_components),
                       indent=2,
                       sort_keys=True) + "\n", encoding="utf-8")
        # The tokenizer, processor and generation files, which an app needs beside the packages (`mcq chat` too).
        copy_support_files(weights.model_path, staging)
        _write_card(staging, weights, result)
        settings = {"format": "coreml", "target": target, "vision": vision, "llm": llm,
                    "from": Path(from_dir).name if from_dir else None, "llm_fallbacks": result.llm_fallbacks,
                    "llm_requantized": result.llm_requantized}
        write_manifest(staging, kind="coreml", source=weights.model_path,
                       recipe=getattr(weights.config, "quantization_config", None), settings=settings)
    result.seconds = round(time.perf_counter() - started, 2)
    return result


def _requantized(from_dir, llm: str) -> str | None:
    """What an --llm other than int4-block32 does to a --from output's calibrated int4 weights (None: nothing)."""
    if not from_dir or llm in ("int4-block32", "none"):
        return None
    if llm == "fp16":
        return "--llm fp16 stores the --from output's dequantized weights at fp16, not its int4 levels"
    return f"--llm {llm} rounds the --from output's dequantized weights again; only int4-block32 keeps its int4 levels"


def _save(model, staged: Path, final: Path, compression: str):
    from mcq.outputs import directory_bytes

    from .convert import save_package
    from .program import load_program

    save_package(model, staged)
    program = load_program(staged)
    weight_file = staged / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    minimum = physical_minimum(program, compression)
    return CoremlPackage(path=str(final), compression=compression, bytes=directory_bytes(staged),
                         ops=sorted(program.op_types()), physical_min_bytes=minimum,
                         weights_bytes=weight_file.stat().st_size if weight_file.is_file() else 0), program


def physical_minimum(program, compression: str) -> int | None:
    """Bytes the package's weights need at least: for int4 per-block, 4 bits per quantized weight plus one fp16
    scale per block of 32; every other stored weight at fp16. None for other compressions.

    Counted from the shapes the program declares, reading no weight (an 8B model's would be ~16 GB at fp16)."""
    if compression != "int4-block32":
        return None
    from .program import StoredTensor

    constants = {op.outputs[0][0]: op.attributes["val"] for op in program.operations if op.type == "const"}
    blockwise = [op for op in program.operations if op.type == "constexpr_blockwise_shift_scale"]
    # The ints, scales and offsets feeding the blocks are counted through the weight they make, at 4.5 bits.
    parts = {ref for op in blockwise for bound in op.inputs.values() for kind, ref in bound if kind == "var"}
    total = 0
    for op in blockwise:
        kind, data = op.inputs["data"][0]
        count = (constants[data] if kind == "var" else data).size
        total += count * 4 // 8 + count // 32 * 2
    for name, value in constants.items():
        if name not in parts and isinstance(value, (np.ndarray, StoredTensor)) and value.dtype == np.float16 \
                and value.size > 1:
            total += value.size * 2
    return total


def _say(progress: bool, text: str) -> None:
    if progress:
        import sys

        print(f"[coreml] {text}", file=sys.stderr, flush=True)


def support_files(weights) -> dict[str, Any]:
    """What the sidecar takes from the checkpoint besides weights: its config.json, its preprocessor settings and
    its special token ids. A missing or unreadable file is a one-line McqError naming it."""
    from mcq.models.minicpmv.tokenization import load_tokenizer, special_token_ids

    files = {}
    for name in ("config.json", "preprocessor_config.json"):
        path = weights.path / name
        try:
            files[name] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise McqError(f"{path} is missing: the Core ML sidecar needs it (normalization, slicing, model "
                           "identity)") from None
        except (OSError, json.JSONDecodeError) as err:
            raise McqError(f"{path} is not readable JSON ({err})") from None
    if weights.checkpoint.family.programs is not None:
        return {"config": files["config.json"], "preprocessor": files["preprocessor_config.json"],
                "tokens": _program_tokens(weights)}
    tokens = special_token_ids(load_tokenizer(weights.path, weights.spec.version))
    return {"config": files["config.json"], "preprocessor": files["preprocessor_config.json"], "tokens": tokens}


def _program_tokens(weights) -> dict[str, Any]:
    """A traced family's token ids the host needs: its image and video slots (config.json) and the ends of an
    answer (generation_config.json)."""
    from transformers import GenerationConfig

    try:
        ends = GenerationConfig.from_pretrained(weights.path).eos_token_id
    except OSError:
        raise McqError(f"{weights.path / 'generation_config.json'} is missing: the Core ML sidecar needs its "
                       "eos_token_id (where an answer ends)") from None
    config = weights.config
    return {"image": config.image_token_id, "video": getattr(config, "video_token_id", None),
            "terminators": ends if isinstance(ends, list) else [ends]}


def sidecar(weights, programs: dict, support: dict[str, Any], compression: dict[str, str],
            chunks: list[range], vision_components: dict[str, str] | None = None) -> dict[str, Any]:
    """What a Swift app needs beside the packages: preprocessing constants, token ids, package I/O; and for
    tools (`mcq validate`), the compression choices and the checkpoint's config.json (and for a traced vision
    package, the model component of each weight-name prefix)."""
    if weights.checkpoint.family.programs is not None:
        return _program_sidecar(weights, programs, support, compression, chunks, vision_components)
    config, version = weights.config, weights.spec.version
    preprocessor, tokens = support["preprocessor"], support["tokens"]
    vision = config.vision_config
    vision_program = programs[VISION_PACKAGE]
    key_positions = ("2D sin-cos table [h*w, hidden] (first half: column, second half: row; omega_i = "
                     "10000^(-i/(hidden/4))), zero on padding")
    host = {
        "pixel_values": "the slice's normalized pixels [3, P, P*h*w] in patch-row layout, zero-padded to "
                        "P*max_patches columns",
        "position_ids": "navit bucketing: for i < h, w: bucket(i/h) * patches_per_side + bucket(j/w), "
                        "bucket(x) = number of k/patches_per_side (k = 1..patches_per_side-1) <= x, in "
                        "float32; 0 on padding",
        "patch_mask": "1 on the h*w real patches, 0 on padding",
        "key_positions": key_positions,
    }
    return {
        "format": SIDECAR_FORMAT,
        "version": version,
        "compression": compression,
        "model_config": support["config"],
        "vision": {
            "package": VISION_PACKAGE,
            "inputs": {name: {"dtype": dtype.lower(), "shape": shape}
                       for name, (dtype, shape) in vision_program.inputs.items()},
            "outputs": list(vision_program.outputs),
            "max_patches": MAX_PATCHES,
            "patch_size": vision.patch_size,
            "patches_per_side": vision.image_size // vision.patch_size,
            "hidden_size": config.hidden_size,
            "query_num": config.query_num,
            "host": {name: text for name, text in host.items() if name in vision_program.inputs},
        },
        "resampler": _resampler_sidecar(programs[RESAMPLER_PACKAGE], key_positions)
        if RESAMPLER_PACKAGE in programs else None,
        "preprocessing": {key: preprocessor[key] for key in (
            "norm_mean", "norm_std", "scale_resolution", "max_slice_nums", "slice_mode", "use_image_id",
            "image_feature_size", "patch_size") if key in preprocessor},
        "tokens": {
            "im_start": tokens.im_start_id, "im_end": tokens.im_end_id, "slice_start": tokens.slice_start_id,
            "slice_end": tokens.slice_end_id, "im_id_start": tokens.im_id_start_id,
            "im_id_end": tokens.im_id_end_id, "image_placeholder": tokens.unk_id, "newline": tokens.newline_id,
            "bos": tokens.bos_id, "eos": tokens.eos_id, "pad": tokens.pad_id,
            "terminators": tokens.terminator_ids(weights.spec.terminators),
        },
        "embedding_scale": embedding_scale(config),
        "llm": _llm_sidecar(weights, programs, chunks) if chunks else None,
    }


def _io(program) -> dict[str, Any]:
    return {"inputs": {name: {"dtype": dtype.lower(), "shape": dims} for name, (dtype, dims) in program.inputs.items()},
            "outputs": list(program.outputs)}


def _program_sidecar(weights, programs: dict, support: dict[str, Any], compression: dict[str, str],
                     chunks: list[range], vision_components: dict[str, str]) -> dict[str, Any]:
    """The sidecar of packages traced from a family's programs: the vision package takes one image (its index
    tables computed on the host as the family's `vision_inputs` does, from transformers' functions), and its
    tokens replace the text's image-token slots."""
    family = weights.checkpoint.family
    return {
        "format": SIDECAR_FORMAT,
        "version": weights.checkpoint.release,
        "family": family.name,
        "compression": compression,
        "model_config": support["config"],
        "vision": {"package": VISION_PACKAGE, **_io(programs[VISION_PACKAGE]),
                   "host": f"one call per image (an overview or a slice); the index inputs are what "
                           f"mcq.models.{family.name}.programs.vision_inputs computes for its size in patches; "
                           "image_features replace the image's image-token slots, in order",
                   "components": vision_components},
        "resampler": None,
        "preprocessing": support["preprocessor"],
        "tokens": support["tokens"],
        "embedding_scale": 1.0,
        "llm": _llm_sidecar(weights, programs, chunks) if chunks else None,
    }


def _resampler_sidecar(program, key_positions: str) -> dict[str, Any]:
    return {
        "package": RESAMPLER_PACKAGE,
        "inputs": {name: {"dtype": dtype.lower(), "shape": shape} for name, (dtype, shape) in program.inputs.items()},
        "outputs": list(program.outputs),
        "frames": list(GROUP_FRAMES),
        "host": {
            "calls": "one call per resampler item: the F frames of a temporal group (a video), or one image slice "
                     "(F = 1); F is one of `frames`, the first dimension of every input",
            "vision_features": "the vision package's vision_features of the F frames, in order, stacked",
            "patch_mask": "each frame's patch_mask (as the vision package's), stacked",
            "key_positions": f"per frame: {key_positions}, plus for a video frame the temporal term of its id t "
                             "(timestamp / 0.1 s): [sin(t w_i), cos(t w_i)], w_i = 10000^(-i/(hidden/2)), "
                             "i < hidden/2 (an image slice: none); stacked",
        },
    }


def _llm_sidecar(weights, programs: dict, chunks: list[range]) -> dict[str, Any]:
    from .convert import LLM_CONTEXT, LLM_MAX_CHUNK, rope_theta
    from mcq.models.minicpmv.programs import DecoderShape
    from mcq.models.traceable import MASKED_SCORE
    from .traced import PROGRAM_TOKENS_PER_CALL

    text = weights.config.get_text_config()
    shape = DecoderShape(text, LLM_CONTEXT)
    partial = (getattr(text, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    traced = weights.checkpoint.family.programs is not None
    decoder = [{"package": decoder_package(i), "layers": [layers.start, layers.stop],
                "states": {name: {"dtype": dtype.lower(), "shape": dims}
                           for name, (dtype, dims) in programs[decoder_package(i)].states.items()}}
               for i, layers in enumerate(chunks)]
    return {
        "embed_package": EMBED_PACKAGE, "decoder": decoder, "head_package": HEAD_PACKAGE,
        "embed": _io(programs[EMBED_PACKAGE]), "decoder_io": _io(programs[decoder_package(0)]),
        "head": _io(programs[HEAD_PACKAGE]),
        "context": LLM_CONTEXT, "max_tokens_per_call": PROGRAM_TOKENS_PER_CALL if traced else LLM_MAX_CHUNK,
        "layers": shape.layers, "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
        "rotary_dim": int(shape.head_dim * partial), "rope_theta": rope_theta(text), "masked_score": MASKED_SCORE,
        "host": {
            "decoder": "call the decoder packages in order, each on its own states (those its entry names: the KV "
                       "cache of its layers, and the conv and recurrent states of linear-attention layers): the "
                       "first takes the embeddings as hidden_states, each next one the previous one's "
                       "output_hidden_states; the head package turns the last one's into logits. Each call adds "
                       "S <= max_tokens_per_call positions",
            "position_cos/position_sin": "[1, 1, S, rotary_dim]: cos/sin(p * theta^(-2i/rotary_dim)) for the S "
                                         "new positions p, i < rotary_dim/2, the halves repeated; computed in "
                                         "float32",
            "causal_mask": "[1, 1, S, past + S]: 0 where key position <= query position, masked_score elsewhere; "
                           "its last dimension tells the package where the S new entries go in the cache",
        },
    }


def _write_card(staging: Path, weights, result: CoremlExportResult) -> None:
    from mcq.outputs import write_model_card

    package_rows = "".join(f"| `{Path(p.path).name}` | {p.compression} | {p.bytes:,} |\n"
                           for p in (result.vision, result.resampler, result.embed, *(result.llm or ()))
                           if p is not None)
    config = weights.config
    traced = weights.checkpoint.family.programs is not None
    if traced:
        vision_text = ("One image (an overview or a slice) per call, its number of patches flexible, fp16 compute: "
                       "the vision tower with its window-attention merger and the downsampling merger. Inputs: "
                       "`pixel_values` and the index tables the host computes for the image's size (see the JSON "
                       "sidecar). Output `image_features` [tokens, hidden] replaces the image's image-token slots.")
    elif result.resampler is None:
        vision_text = (f"One slice of up to {MAX_PATCHES} patches per call, vision tower and resampler together, "
                       "fp16 compute. Inputs computed on the host: `pixel_values`, `position_ids`, `patch_mask`, "
                       f"`key_positions` (see the JSON sidecar). Output `image_features` [1, {config.query_num}, "
                       f"{config.hidden_size}] replaces the image placeholder tokens of the slice.")
    else:
        vision_text = (f"`{VISION_PACKAGE}`: the vision tower, one slice or video frame of up to {MAX_PATCHES} "
                       "patches per call (`pixel_values`, `position_ids`, `patch_mask`) → `vision_features`. "
                       f"`{RESAMPLER_PACKAGE}`: the resampler, one call per image slice or per temporal group of 1 "
                       f"to {GROUP_FRAMES[-1]} video frames (their `vision_features`, `patch_mask` and "
                       "`key_positions`, the 2D and temporal sin-cos terms) → `image_features` "
                       f"[1, {config.query_num}, {config.hidden_size}], which replaces the placeholder tokens of "
                       "the slice or group. fp16 compute; see the JSON sidecar for the host inputs.")
    write_model_card(
        staging, title=f"{weights.model_path.name} — Core ML ({result.target})", base_model=weights.model_path.name,
        variant={"library": None, "method": "coreml", "format": result.vision.compression,
                 "tags": ["coreml", "ios", "macos"]},
        source=weights.model_path,
        sections=[
            ("Files", f"| file | compression | size |\n| --- | --- | ---: |\n"
                      f"{package_rows}"
                      f"| `{SIDECAR}` | preprocessing constants, token ids, package I/O | |"),
            ("Vision packages" if result.resampler else "Vision package", vision_text),
            ("LLM packages", (f"The decoder in {len(result.llm) - 1} package(s) of consecutive layers, called in "
                              "order, each with its layers' state in iOS18 states (`key_cache`, `value_cache` of "
                              "full-attention layers"
                              + (", `conv_state`, `recurrent_state` of the Gated DeltaNet layers" if traced else "")
                              + "), then the head package (final norm, LM head) for the logits; "
                              + ("each call adds one position (the DeltaNet recurrence is a loop a traced package "
                                 "cannot hold on a dynamic length: a prefill is one call per token). " if traced else
                                 "each call adds up to 512 tokens (prefill in chunks, then one at a time). ")
                              + "Grouped-query attention without copies of the cache. See the JSON sidecar for the "
                              "host inputs.") if result.llm else "not exported (`--llm none`)"),
            ("Weights", f"from `{Path(result.weights_from).name}`"),
            ("Model", f"MiniCPM-V {result.version}, exported by mcq."
                      + (" Video frames are grouped by temporal id, as the 3D resampler does." if result.resampler
                         else "")),
        ])


__all__ = ["EMBED_PACKAGE", "HEAD_PACKAGE", "LLM_COMPRESSIONS", "RESAMPLER_PACKAGE", "SIDECAR", "TARGETS",
           "VISION_COMPRESSIONS", "VISION_PACKAGE", "CoremlExportResult", "CoremlPackage", "check_options",
           "decoder_package", "export_coreml"]
