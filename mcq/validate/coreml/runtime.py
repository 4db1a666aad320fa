"""Run an `mcq export --format coreml` output from Python: Core ML itself on macOS, mcq's numpy interpreter elsewhere.

`CoremlMiniCPMV` does on the host what the Swift app of docs/coreml.md does: one vision call per slice (where the
export has a group resampler, 4.5: one tower call per slice or frame, then one resampler call per image slice or
temporal group of frames), the text embedded by the embed package with each block of features written over its
placeholder rows, then, in chunks of at most `max_tokens_per_call` tokens, the decoder packages in order (each on
the stateful KV cache of its layers) and the head package, with the rotary terms and the causal mask of `host`.
Inputs are cast to the dtypes the packages declare, so both backends see what an app passes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mcq.errors import McqError
from mcq.export.coreml.api import SIDECAR, SIDECAR_FORMAT, VISION_PACKAGE
from mcq.export.coreml.host import causal_mask, rotary_inputs, vision_inputs
from mcq.export.coreml.program import load_program
from mcq.export.generation import TokenChooser
from mcq.export.program_host import chat_answer, has_visuals, sample_blocks, write_visual_features
from mcq.models.weights import trim_heap

_DTYPES = {"FLOAT16": np.float16, "FLOAT32": np.float32, "INT32": np.int32}
# MIL const names of the vision packages that belong to the SigLIP tower (coremltools names a weight after its
# torch parameter path in `mcq.models.minicpmv.programs.VisionSlice`: `tower.*`; packages of mcq before the programs
# were shared with ONNX had the tower's parameters at the top level); every other weight there is the resampler's.
_TOWER_PREFIXES = ("tower_", "patch_embedding_", "position_embedding_", "layers_", "post_layernorm_")


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of a Core ML export directory, or None when `path` is not one."""
    file = Path(path) / SIDECAR
    if not file.is_file():
        return None
    try:
        sidecar = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise McqError(f"{file} is not readable JSON ({err})") from None
    if not isinstance(sidecar, dict) or not str(sidecar.get("format", "")).startswith("mcq-coreml-"):
        return None
    if sidecar["format"] != SIDECAR_FORMAT:
        raise McqError(f"{file}: a Core ML export of an earlier layout ({sidecar['format']}: one LLM package); "
                       f"export it again with this mcq ({SIDECAR_FORMAT}: the decoder in chunk packages)")
    return sidecar


def native_available() -> bool:
    """Whether Core ML can predict here: macOS 15 or later (the LLM's states are an iOS18 / macOS 15 feature) with
    coremltools' native extension."""
    if sys.platform != "darwin":
        return False
    from coremltools.models.utils import _macos_version

    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return _macos_version() >= (15, 0)


def component_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of stored weights per model component: the vision packages' by the sidecar's components (the resampler
    family's: tower and resampler), the embed and LLM packages together as the LLM. Read from the programs'
    declared blobs; no weight is read."""
    root = Path(path)
    sidecar = read_sidecar(root)
    # A traced vision package names each weight's component (longest prefix); the resampler family's has two.
    prefixes = sorted((sidecar["vision"].get("components") or {}).items(), key=lambda item: -len(item[0]))

    def component(name: str) -> str:
        if not prefixes:
            return "vision" if name.startswith(_TOWER_PREFIXES) else "resampler"
        return next((part for prefix, part in prefixes if name.startswith(prefix)), "other")

    sizes = dict.fromkeys({part for _, part in prefixes} or ("vision", "resampler"), 0)
    sizes["llm"] = 0
    for package in vision_packages(sidecar):
        for name, stored in load_program(root / package).stored():
            part = component(name)
            sizes[part] = sizes.get(part, 0) + stored.nbytes
    for package in llm_packages(sidecar):
        sizes["llm"] += sum(stored.nbytes for _, stored in load_program(root / package).stored())
    return sizes


def vision_packages(sidecar: dict[str, Any] | None) -> list[str]:
    """The vision packages of an export: the vision package, and the group resampler's where it has one (4.5)."""
    resampler = (sidecar or {}).get("resampler")
    return [VISION_PACKAGE, *([resampler["package"]] if resampler else [])]


def llm_packages(sidecar: dict[str, Any] | None) -> list[str]:
    """The LLM's packages of an export, in calling order: embed, the decoder chunks, the head (none for --llm none)."""
    llm = (sidecar or {}).get("llm")
    if not llm:
        return []
    return [llm["embed_package"], *(chunk["package"] for chunk in llm["decoder"]), llm["head_package"]]


class _Package:
    """One package, called with numpy inputs: through Core ML (`native`) or the interpreter. `reset` empties its
    state (the LLM's KV cache)."""

    def __init__(self, path: Path, native: bool):
        from .interpreter import Interpreter

        if not path.is_dir():
            raise McqError(f"{path} is missing")
        self.program = load_program(path)
        if native:
            import coremltools as ct

            self.model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.ALL)
            self.interpreter = None
        else:
            self.model, self.interpreter = None, Interpreter(self.program)
        self.state = None
        self.reset()

    def reset(self) -> None:
        if self.interpreter is not None:
            self.interpreter.reset_state()
        elif self.program.states:
            self.state = self.model.make_state()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        declared = {name: np.asarray(value).astype(_DTYPES[self.program.inputs[name][0]])
                    for name, value in inputs.items()}
        if self.interpreter is not None:
            outputs = self.interpreter.predict(declared)
            # A call frees pieces of up to 32 MiB, which glibc keeps in its heap: without the trim what it kept grew
            # with the packages run (743 / 813 / 842 MiB after three 2-layer decoder packages, real widths), and a
            # later call's allocations came on top (benchmarks/bench_coreml_interpreter.py).
            trim_heap()
            return outputs
        if self.state is not None:
            return self.model.predict(declared, state=self.state)
        return self.model.predict(declared)


class CoremlMiniCPMV:
    """MiniCPM-V from its Core ML packages: `encode_slices`, `embed`, `forward` (teacher-forced logits), `generate`.
    One sequence at a time, as the packages take a batch of one."""

    def __init__(self, path: str | Path, native: bool | None = None):
        root = Path(path)
        sidecar = read_sidecar(root)
        if sidecar is None:
            raise McqError(f"{root} is not an `mcq export --format coreml` output (no {SIDECAR})")
        self.native = native_available() if native is None else native
        self.sidecar, self.llm_info = sidecar, sidecar["llm"]
        self.vision_info = sidecar["vision"]
        self.vision_package = _Package(root / VISION_PACKAGE, self.native)
        # Exports made before the group resampler have no "resampler" entry: their vision package is one slice.
        self.resampler_info = sidecar.get("resampler")
        self.resampler_package = (_Package(root / self.resampler_info["package"], self.native)
                                  if self.resampler_info else None)
        self.embed_package, self.decoder_packages, self.head_package = None, [], None
        if self.llm_info is not None:
            self.embed_package = _Package(root / self.llm_info["embed_package"], self.native)
            self.decoder_packages = [_Package(root / chunk["package"], self.native)
                                     for chunk in self.llm_info["decoder"]]
            self.head_package = _Package(root / self.llm_info["head_package"], self.native)
        self.terminators = set(sidecar["tokens"]["terminators"])
        self.root = root

    # -- vision -------------------------------------------------------------------------------------------------
    def encode_slices(self, slices: Sequence, tgt_sizes, temporal_ids: Sequence[Sequence[int]] | None = None
                      ) -> np.ndarray:
        """Slices (each `[3, patch, patch * h * w]`, `tgt_sizes` rows (h, w)) → `[G, queries, hidden]` float32: one
        block per slice, or per temporal group where `temporal_ids` (4.5 video, as the processor returns them: one
        list of frame ids per resampler item, covering consecutive slices; `[-1]` an image slice) group them."""
        info = self.vision_info
        sizes = np.asarray(tgt_sizes).reshape(-1, 2).tolist()
        groups = [[-1]] * len(sizes) if temporal_ids is None else [list(group) for group in temporal_ids]
        if sum(len(group) for group in groups) != len(sizes):
            raise McqError(f"temporal ids name {sum(len(g) for g in groups)} slices but there are {len(sizes)}")
        for group in groups:
            if self.resampler_info is None and (len(group) > 1 or group[0] >= 0):
                raise McqError(f"video frames grouped by temporal id ({group}) need a group resampler package, which "
                               f"this export lacks (MiniCPM-V {self.sidecar['version']} has no 3D resampler, or the "
                               "export predates it: export it again)")
            if self.resampler_info is not None and len(group) not in self.resampler_info["frames"]:
                raise McqError(f"a temporal group of {len(group)} frames: the resampler package takes "
                               f"{', '.join(map(str, self.resampler_info['frames']))}")

        def inputs_of(index: int, temporal_id: int) -> dict[str, np.ndarray]:
            height, width = sizes[index]
            return vision_inputs(slices[index], height, width, patch=info["patch_size"],
                                 patches_per_side=info["patches_per_side"], hidden=info["hidden_size"],
                                 max_patches=info["max_patches"], temporal_id=temporal_id)

        outputs, start = [], 0
        for group in groups:
            frame_inputs = [inputs_of(start + offset, temporal_id) for offset, temporal_id in enumerate(group)]
            start += len(group)
            if self.resampler_package is None:
                features = self.vision_package(frame_inputs[0])["image_features"]
            else:
                tower = [self.vision_package({name: inputs[name] for name in self.vision_package.program.inputs})
                         ["vision_features"] for inputs in frame_inputs]
                features = self.resampler_package({
                    "vision_features": np.concatenate(tower),
                    "key_positions": np.concatenate([inputs["key_positions"] for inputs in frame_inputs]),
                    "patch_mask": np.concatenate([inputs["patch_mask"] for inputs in frame_inputs])})["image_features"]
            outputs.append(features[0].astype(np.float32))
        return np.stack(outputs)

    # -- an encoded sample (`mcq.validate`'s calibration encoder) -------------------------------------------------
    def sample_vision(self, data: dict[str, Any]) -> np.ndarray:
        """The vision blocks of a batch of one encoded sample: `[slices or groups, queries, hidden]`."""
        temporal_ids = (data.get("temporal_ids") or [None])[0]
        return self.encode_slices(data["pixel_values"][0], data["tgt_sizes"][0], temporal_ids)

    def sample_embeddings(self, data: dict[str, Any], vision: np.ndarray | None) -> np.ndarray:
        """The sample's LLM input embeddings, vision blocks (`sample_vision`'s, or another model's) merged."""
        bounds = data.get("image_bound")
        bounds = bounds[0].tolist() if bounds is not None and len(bounds[0]) else []
        if bounds and vision is None:
            vision = self.sample_vision(data)
        return self.merged_embeddings(data["input_ids"][0].tolist(), bounds, vision)

    # -- the LLM ------------------------------------------------------------------------------------------------
    def _require_llm(self) -> None:
        if self.llm_info is None:
            raise McqError("this Core ML export has no LLM package (exported with --llm none)")

    def _chunks(self, count: int) -> list[tuple[int, int]]:
        step = self.llm_info["max_tokens_per_call"]
        return [(start, min(start + step, count)) for start in range(0, count, step)]

    def embed(self, input_ids: Sequence[int]) -> np.ndarray:
        """Token ids → `[len, hidden]` float32 through the embed package."""
        self._require_llm()
        ids = np.asarray(input_ids, dtype=np.int32).reshape(-1)
        return np.concatenate([self.embed_package({"input_ids": ids[None, start:end]})["inputs_embeds"][0]
                               for start, end in self._chunks(len(ids))]).astype(np.float32)

    def merged_embeddings(self, input_ids: Sequence[int], image_bound: Sequence[Sequence[int]],
                          vision: np.ndarray | None) -> np.ndarray:
        """Text embeddings with vision block i written over the placeholder rows `image_bound[i]` ([start, end))."""
        embeds = self.embed(input_ids)
        bounds = [tuple(int(v) for v in bound) for bound in image_bound]
        if bounds and (vision is None or len(vision) != len(bounds)):
            raise McqError(f"{len(bounds)} image placeholders in the text but "
                           f"{0 if vision is None else len(vision)} vision blocks")
        for (start, end), block in zip(bounds, vision if bounds else []):
            if end - start != len(block):
                raise McqError(f"image placeholder rows {start}:{end} do not hold the {len(block)} vision features")
            embeds[start:end] = block
        return embeds

    def decode(self, embeds: np.ndarray, past: int) -> np.ndarray:
        """Logits `[len, vocab]` float32 of `embeds` ([len, hidden]) at positions past.. on the cache as it is."""
        self._require_llm()
        info = self.llm_info
        if past + len(embeds) > info["context"]:
            raise McqError(f"the sequence needs {past + len(embeds)} positions; the LLM package caches "
                           f"{info['context']}")
        logits = []
        for start, end in self._chunks(len(embeds)):
            cos, sin = rotary_inputs(np.arange(past + start, past + end), info.get("rotary_dim", info["head_dim"]),
                                     info["rope_theta"])
            mask = causal_mask(past + start, end - start, info["masked_score"])
            hidden = embeds[None, start:end]
            for package in self.decoder_packages:
                hidden = package({"hidden_states": hidden, "position_cos": cos, "position_sin": sin,
                                  "causal_mask": mask})["output_hidden_states"]
            logits.append(self.head_package({"hidden_states": hidden})["logits"][0])
        return np.concatenate(logits).astype(np.float32)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        """Teacher-forced logits of a whole sequence, from an empty cache."""
        self._require_llm()
        for package in self.decoder_packages:
            package.reset()
        return self.decode(embeds, 0)

    def generate(self, embeds: np.ndarray, max_new_tokens: int) -> list[int]:
        """Greedy continuation of a prompt, up to and including a terminator."""
        return list(self.continuation(embeds, max_new_tokens, TokenChooser({}, self.terminators, 0)))

    def continuation(self, embeds: np.ndarray, max_new_tokens: int, chooser: TokenChooser,
                     prompt_ids: Sequence[int] = ()) -> Iterator[int]:
        """The new tokens after a prompt's embeddings one by one, as `chooser` picks them, up to and including a
        terminator; `prompt_ids` (the prompt's token ids) count for a repetition penalty, as in transformers."""
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
        logits = self.forward(embeds)[-1]
        position = len(embeds)
        for step in range(max_new_tokens):
            token = int(chooser(logits[None], ids, step)[0])
            yield token
            if token in self.terminators or step + 1 == max_new_tokens:
                return
            ids = np.concatenate([ids, [[token]]], axis=1)
            logits = self.decode(self.embed([token]), position)[-1]
            position += 1


class CoremlProgramModel(CoremlMiniCPMV):
    """An export traced from a family's programs (`traced.py`, MiniCPM-V 4.6): its vision package takes one image
    with the index tables the family's host code computes (`Programs.vision_inputs`), and the tokens of each image
    and video frame replace their slots in the text; the LLM packages run as the resampler family's."""

    def __init__(self, path: str | Path, native: bool | None = None):
        from mcq.models.family import family_for

        super().__init__(path, native)
        family = family_for(self.sidecar["model_config"]["model_type"])
        self.programs = family.programs
        self.config = family.config_class(**self.sidecar["model_config"])

    def sample_vision(self, data: dict[str, Any]) -> np.ndarray:
        """The sample's images, then its video frames, each through the vision package: `[blocks, tokens,
        hidden]`, zero-padded to the longest."""
        return sample_blocks(self.programs, self.config, data,
                             lambda inputs: self.vision_package(inputs)["image_features"])

    def sample_embeddings(self, data: dict[str, Any], vision: np.ndarray | None) -> np.ndarray:
        ids = np.asarray(data["input_ids"][0], dtype=np.int64)
        embeds = self.embed(ids)
        if not has_visuals(self.programs, data):
            return embeds
        blocks = self.sample_vision(data) if vision is None else vision
        return write_visual_features(self.programs, self.config, embeds, ids, blocks, data)

    def generate_tokens(self, data: dict[str, Any], max_new_tokens: int, chooser: TokenChooser) -> Iterator[int]:
        """The new tokens after an encoded prompt (the family's chat inputs), as `chooser` picks them."""
        return self.continuation(self.sample_embeddings(data, None), max_new_tokens, chooser,
                                 data["input_ids"][0].tolist())


def chat_on_coreml(path: str | Path, request) -> str | Iterator[str]:
    """`mcq chat` (a `mcq.models.familyspec.ChatRequest`) on a Core ML export traced from a family's programs
    (`program_host.chat_answer`), through Core ML on macOS 15+, the interpreter elsewhere."""
    from transformers import AutoTokenizer

    model = open_coreml(path)
    if not isinstance(model, CoremlProgramModel):
        raise McqError(f"mcq chat runs Core ML exports traced from a family's programs (MiniCPM-V 4.6); {path} holds "
                       "the resampler family's packages, which `mcq validate --variant` scores")
    if model.llm_info is None:
        raise McqError(f"{path} has no LLM package (exported with --llm none), so it cannot answer")
    if not (model.root / "tokenizer_config.json").is_file():
        raise McqError(f"{path} has no tokenizer files (exported by an older mcq): export it again to chat with it")
    return chat_answer(model, model.root, AutoTokenizer.from_pretrained(model.root), request)


def open_coreml(path: str | Path, native: bool | None = None) -> CoremlMiniCPMV:
    """The model of a Core ML export, whichever way its packages were made."""
    from mcq.models.family import family_for

    sidecar = read_sidecar(path)
    if sidecar is None:
        raise McqError(f"{path} is not an `mcq export --format coreml` output (no {SIDECAR})")
    traced = family_for(sidecar["model_config"]["model_type"]).programs is not None
    return (CoremlProgramModel if traced else CoremlMiniCPMV)(path, native)
