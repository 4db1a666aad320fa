"""GGUF exports (`mcq export --format gguf`) served by llama.cpp through llama-cpp-python: libllama for the LLM,
libmtmd (clip.cpp) for the vision tower and resampler.

Scored on the reference's inputs like every runner: the LLM is fed the reference's token ids, with image
positions filled by embeddings (`llama_batch` with `embd`), and each image slice goes through libmtmd as the
exact pixels the reference's processor produced. libmtmd resizes any image to its own slice layout first; a
448x448 slice passes unchanged, other slice shapes are resized by llama.cpp to 448x448, which is what llama.cpp
does to an image of that shape (its slicing differs from the official processor's, see docs/design.md), so the
vision scores of a GGUF variant include that preprocessing. llama.cpp has no 3D resampler: video samples (frames
packed by temporal id) are not served.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcq.errors import McqError
from mcq.export.gguf.writer import quiet_llama_cpp, require_llama_cpp
from mcq.models.minicpmv.versions import VERSIONS

from ..probes import Stopwatch
from .base import MemoryPlan, Runner, grouped_video

CONTEXT = 4096


def gguf_files(path: str | Path) -> tuple[Path, Path] | None:
    """(LLM file, mmproj file) of an export directory, or None when it is not one."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    files = sorted(directory.glob("*.gguf"))
    mmproj = [f for f in files if f.name.startswith("mmproj-")]
    llm = [f for f in files if not f.name.startswith("mmproj-")]
    if len(llm) == 1 and len(mmproj) == 1:
        return llm[0], mmproj[0]
    return None


def _metadata(path: Path) -> dict[str, Any]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.") or name.endswith("_id")}


def _token_count(path: Path) -> int:
    """The vocabulary's size where the file has no `{arch}.vocab_size` (qwen35): llama.cpp's, its token list's."""
    import gguf

    return len(gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].data)


class GgufRunner(Runner):
    name = "llama.cpp"
    formats = ("gguf",)

    @classmethod
    def detect(cls, path: str | Path) -> str | None:
        return "gguf" if not str(path).startswith("tiny:") and gguf_files(path) else None

    @classmethod
    def runtime(cls, format_name: str) -> str:
        from importlib.metadata import version

        return f"llama.cpp (llama-cpp-python {version('llama-cpp-python')}, libmtmd)"

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        llm, mmproj = gguf_files(path)
        meta, vision = _metadata(llm), _metadata(mmproj)
        arch = meta["general.architecture"]
        versions = {spec.gguf_projector_version: version for version, spec in VERSIONS.items()}
        identity = {"version": versions.get(vision.get("clip.minicpmv_version")),
                    "hidden_size": meta[f"{arch}.embedding_length"], "num_hidden_layers": meta[f"{arch}.block_count"],
                    "vocab_size": meta.get(f"{arch}.vocab_size") or _token_count(llm),
                    "vision_hidden_size": vision["clip.vision.embedding_length"],
                    "vision_layers": vision["clip.vision.block_count"],
                    "query_num": vision.get("clip.minicpmv_query_num")}
        # What the files do not say (a projector without a MiniCPM-V version or a resampler: 4.6) is not compared.
        return {key: value for key, value in identity.items() if value is not None}

    @classmethod
    def weight_bytes(cls, path: str | Path) -> dict[str, int]:
        llm, mmproj = gguf_files(path)
        import gguf

        sizes = {"llm": 0, "vision": 0, "resampler": 0}
        sizes["llm"] = sum(int(t.n_bytes) for t in gguf.GGUFReader(llm).tensors)
        for tensor in gguf.GGUFReader(mmproj).tensors:
            sizes["resampler" if tensor.name.startswith("resampler.") else "vision"] += int(tensor.n_bytes)
        return sizes

    @classmethod
    def memory_plan(cls, path, device, dtype, available, tokens) -> MemoryPlan:
        """llama.cpp maps the LLM file (file-backed pages, which the kernel reclaims), loads the mmproj, and
        allocates the KV cache and the logits of a batch of CONTEXT tokens."""
        llm, mmproj = gguf_files(path)
        meta = _metadata(llm)
        arch = meta["general.architecture"]
        layers, heads = meta[f"{arch}.block_count"], meta[f"{arch}.attention.head_count_kv"]
        head_dim = meta.get(f"{arch}.attention.key_length") or meta[f"{arch}.embedding_length"] // meta[
            f"{arch}.attention.head_count"]
        cache = 2 * layers * heads * head_dim * CONTEXT * 2
        logits = CONTEXT * (meta.get(f"{arch}.vocab_size") or _token_count(llm)) * 4
        return MemoryPlan(mmproj.stat().st_size + cache + 2 * logits + (1 << 30), "LLM file mapped")

    def __init__(self, path: str | Path, device: torch.device, dtype: str):
        require_llama_cpp()
        import llama_cpp
        from llama_cpp import mtmd_cpp

        files = gguf_files(path)
        if files is None:
            raise McqError(f"{path} is not a GGUF export (one <name>.gguf and one mmproj-<name>.gguf)")
        llm_path, mmproj_path = files
        self.lib, self.mtmd = llama_cpp, mtmd_cpp
        quiet_llama_cpp()
        gpu = torch.device(device).type == "cuda"
        threads = max(1, len(os.sched_getaffinity(0)))
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 999 if gpu else 0
        self.model = llama_cpp.llama_model_load_from_file(str(llm_path).encode(), model_params)
        if not self.model:
            raise McqError(f"llama.cpp could not load {llm_path}")
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = CONTEXT
        context_params.n_threads = context_params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, context_params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        # An M-RoPE LLM (MiniCPM-V 4.6's qwen35) takes 4 positions per embedding (section-major: all tokens' first,
        # then their second, ...); the reference's positions are 1-D, i.e. the same in every section.
        rope = llama_cpp.llama_model_rope_type(self.model)
        multi_section = rope in (llama_cpp.LLAMA_ROPE_TYPE_MROPE, llama_cpp.LLAMA_ROPE_TYPE_IMROPE)
        self.positions_per_embd = 4 if multi_section else 1
        mtmd_params = mtmd_cpp.mtmd_context_params_default()
        mtmd_params.use_gpu, mtmd_params.print_timings, mtmd_params.n_threads = gpu, False, threads
        self.vision_ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.model, mtmd_params)
        if not self.vision_ctx:
            raise McqError(f"llama.cpp (libmtmd) could not load {mmproj_path}")
        self.marker = mtmd_cpp.mtmd_default_marker()
        vision_meta = _metadata(mmproj_path)
        # The resampler's tokens per slice (libmtmd adds slices of its own to a wide one); None for a projector
        # without one (MiniCPM-V 4.6), whose image's tokens are all of its chunk's.
        query_num = vision_meta.get("clip.minicpmv_query_num")
        self.query_num = int(query_num) if query_num is not None else None
        # The normalization the processor applied (and libmtmd applies again to the bytes it is given).
        self.image_mean = np.asarray(vision_meta["clip.vision.image_mean"], dtype=np.float32)
        self.image_std = np.asarray(vision_meta["clip.vision.image_std"], dtype=np.float32)
        meta = _metadata(llm_path)
        arch = meta["general.architecture"]
        # llama.cpp multiplies every input embedding by this (the mmproj's projection was divided by it).
        self.embedding_scale = float(meta.get(f"{arch}.embedding_scale", 1.0))
        self.terminators = {int(meta["tokenizer.ggml.eos_token_id"])}
        vocab = _tokens(llm_path)
        self.terminators |= {i for i, token in enumerate(vocab) if token in ("<|im_end|>", "<|endoftext|>", "</s>")}

    # -- vision ------------------------------------------------------------------------------------------------
    def _slice_pixels(self, pixel_values: torch.Tensor, size: torch.Tensor) -> np.ndarray:
        """A processor slice (`[3, p, N*p]`, normalized) back to the RGB bytes it came from."""
        rows, cols = (int(v) for v in size)
        channels, patch, _ = pixel_values.shape
        blocks = pixel_values.float().numpy().reshape(channels, patch, rows, cols, patch).transpose(0, 2, 1, 3, 4)
        image = blocks.reshape(channels, rows * patch, cols * patch).transpose(1, 2, 0)
        return np.ascontiguousarray(np.clip(np.rint((image * self.image_std + self.image_mean) * 255), 0, 255)
                                    .astype(np.uint8))

    def encode_image(self, rgb: np.ndarray) -> np.ndarray:
        """libmtmd's embeddings of one RGB image `[H, W, 3]` uint8: `[tokens, n_embd]` per image chunk, joined."""
        mtmd = self.mtmd
        height, width, _ = rgb.shape
        data = np.ascontiguousarray(rgb)
        bitmap = mtmd.mtmd_bitmap_init(width, height, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = mtmd.mtmd_input_text()
            text.text, text.text_len, text.add_special, text.parse_special = self.marker, len(self.marker), False, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self.vision_ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise McqError("libmtmd could not tokenize an image")
            outputs = []
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                if mtmd.mtmd_encode_chunk(self.vision_ctx, chunk) != 0:
                    raise McqError("libmtmd failed to encode an image")
                tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                pointer = mtmd.mtmd_get_output_embd(self.vision_ctx)
                outputs.append(np.ctypeslib.as_array(pointer, shape=(tokens * self.n_embd,))
                               .reshape(tokens, self.n_embd).copy())
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
        return np.concatenate(outputs)

    @classmethod
    def unserved(cls, data: dict[str, Any]) -> str | None:
        if grouped_video(data):
            return "video (llama.cpp has no 3D resampler to group frames by temporal id)"
        if "pixel_values" in data and "tgt_sizes" not in data:
            return "images without resampler slices (MiniCPM-V 4.6): this runner does not feed them to libmtmd yet"
        return None

    def vision(self, data: dict[str, Any]) -> torch.Tensor:
        reason = self.unserved(data)
        if reason:
            raise McqError(f"GGUF cannot serve this sample: {reason}")
        blocks = []
        for pixels, size in zip(data["pixel_values"][0], data["tgt_sizes"][0]):
            # A slice wider or taller than 448 is one libmtmd slices again: its overview (first block) is the
            # whole slice, resized by llama.cpp.
            embedding = self.encode_image(self._slice_pixels(pixels, size))[: self.query_num]
            blocks.append(torch.from_numpy(embedding) * self.embedding_scale)
        return torch.stack(blocks)

    # -- the LLM -----------------------------------------------------------------------------------------------
    def _pieces(self, data: dict[str, Any], vision: torch.Tensor | None) -> list[tuple[str, Any]]:
        """The sequence as runs of token ids and of embeddings (image positions)."""
        ids = data["input_ids"][0].tolist()
        bounds = data.get("image_bound")
        bounds = bounds[0].tolist() if bounds is not None and len(bounds[0]) else []
        if bounds and vision is None:
            vision = self.vision(data)
        pieces, position = [], 0
        for index, (start, end) in enumerate(bounds):
            if start > position:
                pieces.append(("tokens", ids[position:start]))
            embedding = (vision[index].float() / self.embedding_scale).numpy()
            pieces.append(("embd", np.ascontiguousarray(embedding[: end - start], dtype=np.float32)))
            position = end
        if position < len(ids):
            pieces.append(("tokens", ids[position:]))
        return pieces

    def _decode(self, pieces: list[tuple[str, Any]], start: int = 0, clear: bool = True,
                all_logits: bool = True) -> np.ndarray:
        lib = self.lib
        if clear:
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        outputs, position = [], start
        for kind, values in pieces:
            count = len(values)
            if position + count > CONTEXT:
                raise McqError(f"the sample needs {position + count} positions, more than the runner's {CONTEXT}")
            sections = self.positions_per_embd if kind == "embd" else 1
            # llama_batch_init sizes pos (and embd) by its token count: room for every section's positions.
            batch = lib.llama_batch_init(count * sections, self.n_embd if kind == "embd" else 0, 1)
            try:
                for i in range(count):
                    if kind == "tokens":
                        batch.token[i] = values[i]
                    for section in range(sections):
                        batch.pos[section * count + i] = position + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = all_logits or i == count - 1
                if kind == "embd":
                    ctypes.memmove(batch.embd, values.ctypes.data, values.nbytes)
                batch.n_tokens = count
                if lib.llama_decode(self.ctx, batch) != 0:
                    raise McqError("llama_decode failed")
                rows = count if all_logits else 1
                logits = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(rows * self.n_vocab,))
                outputs.append(logits.reshape(rows, self.n_vocab).copy())
            finally:
                lib.llama_batch_free(batch)
            position += count
        return np.concatenate(outputs)

    def logits(self, data: dict[str, Any], vision: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(self._decode(self._pieces(data, vision)))

    def generate(self, data: dict[str, Any], max_new_tokens: int, vision: torch.Tensor | None = None) -> list[int]:
        pieces = self._pieces(data, vision)
        logits = self._decode(pieces, all_logits=False)[-1]
        position = sum(len(values) for _, values in pieces)
        tokens = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits))
            tokens.append(token)
            if token in self.terminators:
                break
            logits = self._decode([("tokens", [token])], start=position, clear=False)[-1]
            position += 1
        return tokens

    # -- timings -----------------------------------------------------------------------------------------------
    def time_prefill(self, data: dict[str, Any], vision: torch.Tensor | None) -> float:
        pieces = self._pieces(data, vision)
        with Stopwatch(torch.device("cpu")) as watch:
            self._decode(pieces, all_logits=False)
        return watch.seconds

    def time_decode(self, data: dict[str, Any], tokens: int, vision: torch.Tensor | None) -> float:
        pieces = self._pieces(data, vision)
        logits = self._decode(pieces, all_logits=False)[-1]
        position = sum(len(values) for _, values in pieces)
        with Stopwatch(torch.device("cpu")) as watch:
            for step in range(tokens):
                logits = self._decode([("tokens", [int(np.argmax(logits))])], start=position + step, clear=False)[-1]
        return watch.seconds

    def close(self) -> None:
        self.mtmd.mtmd_free(self.vision_ctx)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _tokens(path: Path) -> list[str]:
    import gguf

    return gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()
