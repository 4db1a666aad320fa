"""Run an ONNX export on plain onnxruntime: `OnnxMiniCPMV(path)` is a MiniCPM-V whose three graphs are sessions.

The host does what the graphs cannot: the processor (LLaVA-UHD slicing and placeholders in numpy/PIL, the same
`MiniCPMVProcessor` the torch model uses), the vision graph's data-dependent inputs (`vision_inputs`: navit
position ids, the resampler's 2D sin-cos + temporal key positions, padding masks and the packing of video frames
into temporal groups, from the same functions the torch model calls), writing vision features over the `<unk>`
slots of the text embeddings, and the generation loop with the KV cache (greedy, or the release's sampling).

`path` is the export directory or its `onnx/` folder (the transformers.js layout keeps configs one level up).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mcq.errors import McqError

from ..generation import TokenChooser, stream_text

GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
# transformers.js file-name suffix per dtype (utils/dtypes.js); "int8" here is weight-only MatMulNBits.
DTYPE_SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "q4": "_q4"}


def find_export(path: str | Path) -> tuple[Path, Path]:
    """(root with the configs, folder with the .onnx files) of an export, or a one-line McqError."""
    path = Path(path)
    if not path.is_dir():
        raise McqError(f"{path} is not a directory (expected an `mcq export --format onnx` output)")
    if (path / "onnx").is_dir() and (path / "config.json").is_file():
        return path, path / "onnx"
    if path.name == "onnx" and (path.parent / "config.json").is_file():
        return path.parent, path
    raise McqError(f"{path} is not an ONNX export: expected config.json beside an onnx/ folder")


def is_onnx_export(path: str | Path) -> bool:
    """Whether `path` is an `mcq export --format onnx` output (its root or its onnx/ folder)."""
    try:
        root, _ = find_export(path)
        graph_files(root)
    except McqError:
        return False
    return True


def chat_on_onnxruntime(path: str | Path, request) -> str | Iterator[str]:
    """`mcq chat` on an ONNX export (`request`: a `mcq.models.familyspec.ChatRequest`): the resampler family's chat
    with `OnnxMiniCPMV` in place of the torch model, or for an export traced from a family's programs, its chat
    inputs through `OnnxProgramModel`."""
    from mcq.models.family import family_for
    from mcq.models.minicpmv.chat import chat_with

    root, _ = find_export(path)
    model_type = json.loads((root / "config.json").read_text())["model_type"]
    if family_for(model_type).programs is not None:   # graphs traced from the family's programs (4.6)
        from .program_runtime import chat_on_programs

        return chat_on_programs(path, request)
    if request.dtype != "auto":
        raise McqError(f"--dtype {request.dtype}: an export computes in the precision it was exported with")

    def load() -> tuple[OnnxMiniCPMV, Any, dict[str, Any]]:
        model = OnnxMiniCPMV(path)
        return model, model.processor, {"seed": request.seed}

    return chat_with(request, load)


def graph_files(root: Path) -> dict[str, str]:
    """Graph → file name, from config.json's `transformers.js_config.dtype` (what transformers.js reads too)."""
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise McqError(f"cannot read {root / 'config.json'}: {err}") from None
    from mcq.models.families import FAMILIES

    if not isinstance(config, dict) or config.get("model_type") not in FAMILIES:
        # Another model's transformers.js export has the same layout: say what it is, not what field it lacks.
        found = config.get("model_type") if isinstance(config, dict) else None
        raise McqError(f"{root / 'config.json'}: model_type {found!r}, not an ONNX export of MiniCPM-V")
    dtypes = (config.get("transformers.js_config") or {}).get("dtype")
    if not isinstance(dtypes, dict) or set(dtypes) != set(GRAPHS) or \
            not all(d in DTYPE_SUFFIXES for d in dtypes.values()):
        raise McqError(f"{root / 'config.json'} has no valid transformers.js_config.dtype for {', '.join(GRAPHS)}: "
                       "not an mcq ONNX export")
    return {graph: f"{graph}{DTYPE_SUFFIXES[dtypes[graph]]}.onnx" for graph in GRAPHS}


# -- host-side vision inputs -------------------------------------------------------------------------------------

def vision_inputs(slices: Sequence, tgt_sizes: np.ndarray, groups: Sequence[Sequence[int]] | None, *, patch: int,
                  patches_per_side: int, embed_dim: int) -> dict[str, np.ndarray]:
    """The vision graph's inputs for `slices` (each `[3, patch, patch * h * w]`, `tgt_sizes` rows (h, w)).

    `groups` (4.5) holds one list of temporal ids per resampler output, covering consecutive slices (frames of a
    video group; `[-1]` for an image slice); None gives one output per slice and no temporal term (2.6 / 4.0).
    """
    import torch

    from mcq.models.minicpmv.resampler import key_term
    from mcq.models.minicpmv.vision import navit_position_ids

    sizes = np.asarray(tgt_sizes, dtype=np.int64).reshape(-1, 2)
    counts = sizes[:, 0] * sizes[:, 1]
    n, longest = len(sizes), int(counts.max())
    pixel_values = np.zeros((n, 3, patch, patch * longest), dtype=np.float32)
    for i, pixels in enumerate(slices):
        pixels = np.asarray(pixels, dtype=np.float32)
        pixel_values[i, :, :, : pixels.shape[-1]] = pixels
    real = np.arange(longest)[None, :] < counts[:, None]
    # navit_position_ids is the torch model's own function (float32 bucketize semantics), not a re-derivation.
    position_ids = navit_position_ids(torch.from_numpy(sizes), patches_per_side, longest).numpy() * real
    flat = [-1] * n if groups is None else [t for group in groups for t in group]
    if len(flat) != n:
        raise McqError(f"temporal ids name {len(flat)} slices but there are {n}")
    key_positions = np.zeros((n, longest, embed_dim), dtype=np.float32)
    for i, ((h, w), temporal_id) in enumerate(zip(sizes.tolist(), flat)):
        key_positions[i, : h * w] = key_term(embed_dim, h, w, temporal_id)
    if groups is None:
        packing = np.arange(n * longest, dtype=np.int64).reshape(n, longest)
        padding = ~real
    else:
        width = max(len(group) for group in groups) * longest
        packing = np.zeros((len(groups), width), dtype=np.int64)
        padding = np.ones((len(groups), width), dtype=bool)
        start = 0
        for g, group in enumerate(groups):
            # The frames of a group, frame-major: one key sequence of len(group) * longest rows.
            rows = np.arange(start * longest, (start + len(group)) * longest, dtype=np.int64)
            packing[g, : len(rows)] = rows
            padding[g, : len(rows)] = ~real[start : start + len(group)].reshape(-1)
            start += len(group)
    return {"pixel_values": pixel_values, "patch_attention_mask": real, "position_ids": position_ids.astype(np.int64),
            "resampler_pos_embed": key_positions, "resampler_packing_index": packing,
            "resampler_key_padding_mask": padding}


def _numpy(value) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


# -- the model -----------------------------------------------------------------------------------------------------

def open_sessions(path: str | Path, providers: Sequence[str], threads: int | None):
    """An export's root, its graph folder, and an onnxruntime session per graph; a missing graph or one onnxruntime
    cannot load is one line."""
    import onnxruntime as ort

    root, onnx_dir = find_export(path)
    files = graph_files(root)
    missing = [name for name in files.values() if not (onnx_dir / name).is_file()]
    if missing:
        raise McqError(f"{onnx_dir} lacks {', '.join(missing)}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # A memory pattern is planned on a run's shapes and allocated beside the arena on the next run of the same
    # shapes, without retiring what the arena holds: at real widths (4.5, 2 layers, one 448² image) serving peaked
    # 170-265 MiB higher with it and ran no faster (benchmarks/README.md).
    options.enable_mem_pattern = False
    try:
        sessions = {graph: ort.InferenceSession(str(onnx_dir / file), options, providers=list(providers))
                    for graph, file in files.items()}
    except Exception as err:   # onnxruntime raises its own exception types for broken files
        raise McqError(f"onnxruntime cannot load {onnx_dir}: {str(err).splitlines()[0]}") from None
    return root, onnx_dir, sessions


class OnnxMiniCPMV:
    """MiniCPM-V on onnxruntime: `vision`, `embed`, `decoder`, `generate`, `chat` (the official chat API)."""

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        from mcq.models.minicpmv.configuration import MiniCPMVConfig
        from mcq.models.minicpmv.processing import MiniCPMVProcessor
        from mcq.models.minicpmv.tokenization import special_token_ids
        from mcq.models.minicpmv.versions import version_spec

        self.root, self.onnx_dir, self.sessions = open_sessions(path, providers, threads)
        self.config = MiniCPMVConfig.from_pretrained(str(self.root))
        self.spec = version_spec(self.config.version)
        self.processor = MiniCPMVProcessor.from_pretrained(self.root)
        self.tokenizer = self.processor.tokenizer
        self.terminators = special_token_ids(self.tokenizer).terminator_ids(self.spec.terminators)
        decoder_inputs = {i.name: i for i in self.sessions["decoder_model_merged"].get_inputs()}
        self.cache_names = [name for name in decoder_inputs if name.startswith("past_key_values.")]
        key = decoder_inputs["past_key_values.0.key"].shape     # [batch, kv_heads, past, head_dim]
        self.kv_heads, self.head_dim = int(key[1]), int(key[3])
        vision_inputs = {i.name: i for i in self.sessions["vision_encoder"].get_inputs()}
        self.embed_dim = int(vision_inputs["resampler_pos_embed"].shape[2])
        self.patch = self.config.patch_size
        self.patches_per_side = self.config.vision_config.image_size // self.patch
        self.vision_batch_size = max(int(self.config.vision_batch_size), 1)

    # -- vision -------------------------------------------------------------------------------------------------
    def encode_slices(self, slices: Sequence, tgt_sizes, temporal_ids: Sequence[Sequence[int]] | None = None
                      ) -> np.ndarray:
        """Slices → `[G, queries, hidden]`: one block per slice, or per temporal group (4.5 video).

        Run in chunks of whole groups of at most `vision_batch_size` slices (the torch model's chunk), so a long
        video does not put every frame's attention in memory at once.
        """
        sizes = np.asarray(_numpy(tgt_sizes), dtype=np.int64).reshape(-1, 2)
        temporal = temporal_ids is not None and self.spec.temporal
        groups = [list(g) for g in temporal_ids] if temporal else [[-1] for _ in range(len(sizes))]
        chunks, current, count = [], [], 0
        for group in groups:
            if current and count + len(group) > self.vision_batch_size:
                chunks.append(current)
                current, count = [], 0
            current.append(group)
            count += len(group)
        if current:
            chunks.append(current)
        outputs, start = [], 0
        for chunk in chunks:
            n = sum(len(g) for g in chunk)
            inputs = vision_inputs([_numpy(s) for s in slices[start:start + n]], sizes[start:start + n],
                                   chunk if temporal else None, patch=self.patch,
                                   patches_per_side=self.patches_per_side, embed_dim=self.embed_dim)
            outputs.append(self.sessions["vision_encoder"].run(["image_features"], inputs)[0])
            start += n
        return np.concatenate(outputs)

    def vision_per_sample(self, data: dict[str, Any]) -> list[np.ndarray | None]:
        """Per sample of a processor batch, its vision blocks (None for a sample without images)."""
        states = []
        temporal_ids = data.get("temporal_ids") or [None] * len(data["pixel_values"])
        for pixels, sizes, temporal in zip(data["pixel_values"], data["tgt_sizes"], temporal_ids):
            states.append(self.encode_slices(pixels, sizes, temporal) if len(pixels) else None)
        return states

    # -- text ---------------------------------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed_tokens"].run(["inputs_embeds"], {"input_ids": input_ids.astype(np.int64)})[0]

    def merged_embeddings(self, data: dict[str, Any], vision: Sequence[np.ndarray | None] | None = None
                          ) -> np.ndarray:
        """Text embeddings with each sample's vision blocks written over its `<unk>` slots (`image_bound`)."""
        input_ids = _numpy(data["input_ids"])
        embeds = self.embed(input_ids)
        bounds = data.get("image_bound") or [None] * len(input_ids)
        if vision is None and data.get("pixel_values") is not None:
            vision = self.vision_per_sample(data)
        for sample, sample_bounds in enumerate(bounds):
            features = vision[sample] if vision is not None and sample < len(vision) else None
            if sample_bounds is None or len(sample_bounds) == 0 or features is None:
                continue
            positions = np.concatenate([np.arange(s, e) for s, e in _numpy(sample_bounds).tolist()])
            flat = np.asarray(features, dtype=np.float32).reshape(-1, embeds.shape[-1])
            if len(positions) != len(flat):
                raise McqError(f"sample {sample}: {len(positions)} image slots in the text but {len(flat)} vision "
                               "features (placeholders and images disagree)")
            embeds[sample, positions] = flat
        return embeds

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return dict.fromkeys(self.cache_names, empty)

    def decoder(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One decoder call: logits `[B, S, vocab]` and the grown cache (keyed by the next call's input names)."""
        session = self.sessions["decoder_model_merged"]
        outputs = session.run(None, {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask.astype(np.int64),
                                     "position_ids": position_ids.astype(np.int64), **cache})
        names = [o.name for o in session.get_outputs()]
        present = {name.replace("present.", "past_key_values.", 1): value
                   for name, value in zip(names, outputs) if name.startswith("present.")}
        return outputs[names.index("logits")], present

    def forward(self, data: dict[str, Any], vision: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
        """Teacher-forced logits `[B, S, vocab]` of a processor batch (no cache)."""
        embeds = self.merged_embeddings(data, vision)
        mask = _numpy(data.get("attention_mask", np.ones(embeds.shape[:2], dtype=np.int64)))
        logits, _ = self.decoder(embeds, mask, position_ids(mask), self.empty_cache(len(embeds)))
        return logits

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(self, data: dict[str, Any], max_new_tokens: int, vision: Sequence[np.ndarray | None] | None = None,
                 *, settings: dict[str, Any] | None = None, seed: int = 0) -> list[list[int]]:
        """New tokens per sample, each ending at (and including) a terminator when one was produced."""
        steps = self._generate_steps(data, max_new_tokens, vision, settings or {}, seed)
        return self._steps_to_rows(steps, len(data["input_ids"]))

    def _generate_steps(self, data, max_new_tokens: int, vision, settings: dict[str, Any], seed: int
                        ) -> Iterator[np.ndarray]:
        """Yields the batch's next tokens step by step (finished rows get the pad token)."""
        chooser = TokenChooser(settings, self.terminators, seed)
        embeds = self.merged_embeddings(data, vision)
        mask = _numpy(data.get("attention_mask", np.ones(embeds.shape[:2], dtype=np.int64))).astype(np.int64)
        positions = position_ids(mask)
        history = _numpy(data["input_ids"]).astype(np.int64)
        finished = np.zeros(len(embeds), dtype=bool)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        logits, cache = self.decoder(embeds, mask, positions, self.empty_cache(len(embeds)))
        for step in range(max_new_tokens):
            tokens = chooser(logits[:, -1], history, step)
            tokens = np.where(finished, pad, tokens)
            yield tokens
            finished |= np.isin(tokens, self.terminators)
            if finished.all() or step + 1 == max_new_tokens:
                return
            history = np.concatenate([history, tokens[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            logits, cache = self.decoder(self.embed(tokens[:, None]), mask, positions, cache)

    def _steps_to_rows(self, steps: Iterator[np.ndarray], batch: int) -> list[list[int]]:
        rows: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        for tokens in steps:
            for row, token in enumerate(tokens.tolist()):
                if not done[row]:
                    rows[row].append(token)
                    done[row] = token in self.terminators
        return rows

    # -- chat ---------------------------------------------------------------------------------------------------
    def chat(self, image=None, msgs=None, tokenizer=None, processor=None, vision_hidden_states=None,
             max_new_tokens: int = 2048, min_new_tokens: int = 0, sampling: bool = True,
             max_inp_length: int | None = None, system_prompt: str = "", stream: bool = False,
             max_slice_nums: int | None = None, use_image_id: bool | None = None, temporal_ids=None,
             enable_thinking: bool = False, seed: int = 0, **kwargs):
        """The official `chat()` on onnxruntime (same messages, prompt and settings as `MiniCPMV.chat`).

        Greedy (`sampling=False, num_beams=1`) or the release's sampling; beam search is not implemented here.
        """
        from mcq.models.minicpmv.chat import build_chat_inputs, generation_settings

        processor = processor or self.processor
        inputs, batched = build_chat_inputs(
            self, processor, image=image, msgs=msgs, system_prompt=system_prompt,
            max_inp_length=max_inp_length or self.spec.max_inp_length, max_slice_nums=max_slice_nums,
            use_image_id=use_image_id, temporal_ids=temporal_ids, enable_thinking=enable_thinking,
        )
        settings = generation_settings(self.spec, sampling, enable_thinking, min_new_tokens, kwargs)
        vision = None if vision_hidden_states is None else [_numpy(v) for v in vision_hidden_states]
        steps = self._generate_steps(inputs, max_new_tokens, vision, settings, seed)
        if stream:
            if batched:
                raise McqError("stream=True works with one conversation at a time")
            return self._stream(steps)
        texts = [self.decode(row) for row in self._steps_to_rows(steps, len(inputs["input_ids"]))]
        if enable_thinking:
            texts = ["<think>\n" + text for text in texts]
        return texts if batched else texts[0]

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of generated tokens up to the first terminator (special tokens kept, like the torch model)."""
        tokens = list(tokens)
        for end, token in enumerate(tokens):
            if token in self.terminators:
                tokens = tokens[:end]
                break
        return self.tokenizer.decode(tokens)

    def _stream(self, steps: Iterator[np.ndarray]) -> Iterator[str]:
        return stream_text((int(step[0]) for step in steps), self.terminators, self.tokenizer.decode)


def position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding (transformers' generate: cumsum of the mask - 1, padding at 1)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions)
