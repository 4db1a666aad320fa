"""GGUF exports (`mcq export --format gguf`) served by llama.cpp through llama-cpp-python: libllama for the LLM,
libmtmd (clip.cpp) for the vision path (tower and resampler, or 4.6's vit_merger and merger).

Scored on the reference's inputs like every runner: the LLM is fed the reference's token ids, with each image
block's positions (`image_bound`) filled by embeddings (`llama_batch` with `embd`), and each image block (an
overview or slice of the reference's processor, `GgufLayout.image_blocks` of the export's family) goes through
libmtmd as the exact pixels the processor produced. libmtmd has no entry point for preprocessed pixels: it lays
out any image it is given in its own way first, and the block's embeddings are its first image chunk (the
overview; a block larger than the slice size is one libmtmd slices again, and those slices are not the block's).
A block libmtmd takes at its own size is encoded unchanged: a 448x448 slice of the resampler family's, and nearly
every block of the 4.6 processor (an area of about 448², sides multiples of 56; 63 of the 64 in the built-in
held-out set), whose token count is its size's. The rare 4.6 block libmtmd would lay out at another size is
stretched to one libmtmd lays out at the block's (`_libmtmd_size`). Other resampler slices are resized by llama.cpp
to 448x448, as llama.cpp does to an image of that shape (its 64 tokens are the slice's whatever its size), so the
vision scores of a GGUF variant include that preprocessing. The embeddings go in at the positions libmtmd gives
its image chunk when llama.cpp serves it (`mtmd_helper_image_get_decoder_pos`, four per token for an M-RoPE LLM
such as 4.6's qwen35). llama.cpp has no 3D resampler: video samples of the resampler family (frames packed by
temporal id) are not served. 4.6's video frames are image blocks at video tokens (`video_bound`), each encoded by
libmtmd like an image block: how a llama.cpp user serves a video (its frames as images).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from mcq.errors import McqError
from mcq.export.gguf.writer import quiet_llama_cpp, require_llama_cpp
from mcq.models.family import gguf_layout_for
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


def _repacked_bytes(path: Path) -> int:
    """Bytes of the LLM file's quantized matrices, which llama.cpp's CPU backend copies into its repacked layout
    (every block-quantized type mcq writes has one in llama-cpp-python 0.3.36: Q4_0, Q4_K, Q5_K, Q6_K, Q8_0,
    IQ4_NL...) — all but the token embeddings, which it only gathers rows of. An upper bound: a matrix whose rows
    do not fill the kernels' tiles stays mapped."""
    import gguf

    unpacked = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    return sum(int(tensor.n_bytes) for tensor in gguf.GGUFReader(path).tensors
               if tensor.tensor_type not in unpacked and len(tensor.shape) == 2 and tensor.name != "token_embd.weight")


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
        allocates the KV cache and the logits of a batch of CONTEXT tokens. On CPU it also copies the quantized
        matrices into the interleaved layout of its GEMM kernels (its "repack" extra buffer type, on by default:
        what `llama-server` serves with), in anonymous memory: about the LLM file again. When that copy does not
        fit, the LLM is served from the mapped file as `llama-server --no-repack` does, and the runtime column says
        so: other kernels, whose activation rounding differs (`benchmarks/bench_gguf_repack.py`: mean KL 4e-4 to
        1.5e-3 between the two on random real-width weights; on an AVX-512 CPU prefill 1.7x faster without the
        repack, decoding up to 1.24x slower)."""
        llm, mmproj = gguf_files(path)
        meta = _metadata(llm)
        arch = meta["general.architecture"]
        layers, heads = meta[f"{arch}.block_count"], meta[f"{arch}.attention.head_count_kv"]
        head_dim = meta.get(f"{arch}.attention.key_length") or meta[f"{arch}.embedding_length"] // meta[
            f"{arch}.attention.head_count"]
        cache = 2 * layers * heads * head_dim * CONTEXT * 2
        logits = CONTEXT * (meta.get(f"{arch}.vocab_size") or _token_count(llm)) * 4
        mapped = mmproj.stat().st_size + cache + 2 * logits + (1 << 30)
        repacked = _repacked_bytes(llm) if torch.device(device).type == "cpu" else 0
        if repacked and available is not None and mapped + repacked > available >= mapped:
            return MemoryPlan(mapped, f"LLM file mapped, not repacked (--no-repack: its {repacked / 2**30:.1f} GiB "
                                      "repacked copy does not fit)", load={"repack": False})
        return MemoryPlan(mapped + repacked, "LLM file mapped" + (", repacked for the CPU kernels" if repacked else ""))

    def __init__(self, path: str | Path, device: torch.device, dtype: str, repack: bool = True):
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
        model_params.use_extra_bufts = repack   # the memory plan's choice, which the runtime column shows
        self.model = llama_cpp.llama_model_load_from_file(str(llm_path).encode(), model_params)
        if not self.model:
            raise McqError(f"llama.cpp could not load {llm_path}")
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = CONTEXT
        context_params.n_threads = context_params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, context_params)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        mtmd_params = mtmd_cpp.mtmd_context_params_default()
        mtmd_params.use_gpu, mtmd_params.print_timings, mtmd_params.n_threads = gpu, False, threads
        self.vision_ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj_path).encode(), self.model, mtmd_params)
        if not self.vision_ctx:
            raise McqError(f"llama.cpp (libmtmd) could not load {mmproj_path}")
        self.marker = mtmd_cpp.mtmd_default_marker()
        # An M-RoPE LLM (MiniCPM-V 4.6's qwen35) takes 4 positions per embedding, section-major (all tokens' first,
        # then their second, ...); libmtmd tells from the LLM's rope type, as its decode helper does.
        self.mrope = mtmd_cpp.mtmd_decode_use_mrope(self.vision_ctx)
        vision_meta = _metadata(mmproj_path)
        try:
            self.image_blocks = gguf_layout_for(vision_meta["clip.projector_type"]).image_blocks
        except ValueError as err:
            raise McqError(f"{mmproj_path}: {err}") from None
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
    def _block_rgb(self, pixels: torch.Tensor, rows: int, columns: int) -> np.ndarray:
        """A processor block (`[3, p, rows*columns*p]`, NaViT-patched, normalized) back to the RGB bytes it came
        from, `[rows*p, columns*p, 3]`."""
        channels, patch, _ = pixels.shape
        blocks = pixels.float().numpy().reshape(channels, patch, rows, columns, patch).transpose(0, 2, 1, 3, 4)
        image = blocks.reshape(channels, rows * patch, columns * patch).transpose(1, 2, 0)
        return np.ascontiguousarray(np.clip(np.rint((image * self.image_std + self.image_mean) * 255), 0, 255)
                                    .astype(np.uint8))

    @contextmanager
    def _image_chunk(self, width: int, height: int, rgb: np.ndarray | None = None) -> Iterator[Any]:
        """libmtmd's first image chunk of a `width` x `height` image (the overview, however libmtmd slices it):
        of the RGB bytes `rgb` `[height, width, 3]`, or without them a placeholder, which has the chunk's layout
        (token count, positions) and nothing to encode."""
        mtmd = self.mtmd
        data = None if rgb is None else np.ascontiguousarray(rgb)
        pointer = None if data is None else data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = mtmd.mtmd_bitmap_init(width, height, pointer)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = mtmd.mtmd_input_text()
            text.text, text.text_len, text.add_special, text.parse_special = self.marker, len(self.marker), False, True
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self.vision_ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise McqError("libmtmd could not tokenize an image")
            yield next(chunk for chunk in (mtmd.mtmd_input_chunks_get(chunks, i)
                                           for i in range(mtmd.mtmd_input_chunks_size(chunks)))
                       if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def encode_image(self, rgb: np.ndarray) -> np.ndarray:
        """libmtmd's embeddings of one RGB image `[H, W, 3]` uint8 (its first image chunk): `[tokens, n_embd]`."""
        height, width, _ = rgb.shape
        with self._image_chunk(width, height, rgb) as chunk:
            if self.mtmd.mtmd_encode_chunk(self.vision_ctx, chunk) != 0:
                raise McqError("libmtmd failed to encode an image")
            tokens = self.mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            pointer = self.mtmd.mtmd_get_output_embd(self.vision_ctx)
            return np.ctypeslib.as_array(pointer, shape=(tokens * self.n_embd,)).reshape(tokens, self.n_embd).copy()

    def _image_positions(self, width: int, height: int, start: int) -> tuple[np.ndarray, int]:
        """Where llama.cpp's decode helper puts the embeddings of a `width` x `height` image chunk that begins at
        position `start` (`mtmd_helper_decode_image_chunk`): `[sections, tokens]` positions, and how far the
        chunk moves the next position (`mtmd_input_chunk_get_n_pos`). With M-RoPE the helper writes libmtmd's
        (t, x, y, z) of each token to sections 0, 2, 1, 3 (mtmd-helper's `set_position_mrope_2d`). libmtmd gives
        a 2-D grid only to the images of Qwen-VL-style projectors; the chunks of llava-uhd tiling (both MiniCPM-V
        families) are 1-D, the text position start + i in every section, which is what transformers' 4.6 gives
        its image tokens too."""
        with self._image_chunk(width, height) as chunk:
            image = self.mtmd.mtmd_input_chunk_get_tokens_image(chunk)
            count = self.mtmd.mtmd_image_tokens_get_n_tokens(image)
            decoder = (self.mtmd.mtmd_decoder_pos * count)()
            self.mtmd.mtmd_helper_image_get_decoder_pos(image, start, decoder)
            advance = self.mtmd.mtmd_input_chunk_get_n_pos(chunk)
        by_token = np.array([(p.t, p.y, p.x, p.z) for p in decoder], dtype=np.int32).reshape(count, 4)
        return np.ascontiguousarray(by_token.T if self.mrope else by_token.T[:1]), advance

    def _libmtmd_size(self, width: int, height: int, tokens: int) -> tuple[int, int]:
        """The size to give libmtmd a `width` x `height` processor block in, whose placeholder holds `tokens`: its
        own when libmtmd lays it out in that many tokens, else the nearest width that libmtmd lays out in that many.
        libmtmd sizes an image of area over 448² from its aspect ratio alone, and the processor's rounding to whole
        merged patches can move a block's ratio across one of libmtmd's steps: the 784x280 overview of a 960x320
        image is an image libmtmd lays out at 728x280 (65 tokens, not 70), while 798x280 gives 784x280 again."""
        for step in range(width):
            for candidate in dict.fromkeys((width + step, width - step)):
                with self._image_chunk(candidate, height) as chunk:
                    if self.mtmd.mtmd_input_chunk_get_n_tokens(chunk) == tokens:
                        return candidate, height
        raise McqError(f"libmtmd lays out no image {height} pixels high like the reference's {width}x{height} image "
                       f"block ({tokens} tokens)")

    @classmethod
    def unserved(cls, data: dict[str, Any]) -> str | None:
        if grouped_video(data):
            return "video (llama.cpp has no 3D resampler to group frames by temporal id)"
        return None

    @staticmethod
    def _bounds(data: dict[str, Any]) -> list[tuple[int, int]]:
        """The [start, end) of each vision block's tokens, in `GgufLayout.image_blocks` order: the image blocks'
        (`image_bound`), then the video frames' (`video_bound`: 4.6, whose frames are image blocks at video
        tokens)."""
        return [(int(start), int(end)) for key in ("image_bound", "video_bound") if key in data
                for start, end in data[key][0].tolist()]

    def _blocks(self, data: dict[str, Any]) -> list[tuple[tuple[int, int], tuple[torch.Tensor, tuple[int, int]]]]:
        """Each vision block's token bounds beside its pixels and size; a sample whose bounds and blocks do not
        pair up (an encoder that records one and not the other) is refused, not paired short."""
        bounds, blocks = self._bounds(data), self.image_blocks(data)
        if len(bounds) != len(blocks):
            raise McqError(f"the sample records {len(bounds)} vision blocks' token bounds for {len(blocks)} blocks "
                           "of pixels")
        return list(zip(bounds, blocks))

    def vision(self, data: dict[str, Any]) -> torch.Tensor:
        """libmtmd's embeddings of each image block, zero-padded to the longest (4.6's blocks differ in size), as the
        reference's vision output is."""
        reason = self.unserved(data)
        if reason:
            raise McqError(f"GGUF cannot serve this sample: {reason}")
        embeddings = []
        for (start, end), (pixels, (rows, columns)) in self._blocks(data):
            rgb = self._block_rgb(pixels, rows, columns)
            size = self._libmtmd_size(rgb.shape[1], rgb.shape[0], end - start)
            if size != (rgb.shape[1], rgb.shape[0]):
                # libmtmd resizes it back to the block's size (bicubic both ways, as the processor resizes).
                rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))
            embeddings.append(torch.from_numpy(self.encode_image(rgb)) * self.embedding_scale)
        return pad_sequence(embeddings, batch_first=True)

    # -- the LLM -----------------------------------------------------------------------------------------------
    def _pieces(self, data: dict[str, Any], vision: torch.Tensor | None) -> tuple[list[tuple[str, Any, Any]], int]:
        """The sequence as runs of token ids and of embeddings (image blocks), each with its positions
        (`[sections, count]`), and the position after the last."""
        ids = data["input_ids"][0].tolist()
        paired = self._blocks(data)
        if paired and vision is None:
            vision = self.vision(data)
        pieces, index, position = [], 0, 0
        # In the text's order (a prompt may put a video before an image).
        blocks = sorted(((bounds, block, embeddings) for (bounds, block), embeddings in zip(paired, vision)),
                        key=lambda block: block[0][0]) if paired else []
        for (start, end), (pixels, (rows, columns)), block in blocks:
            if start > index:
                pieces.append(("tokens", ids[index:start], np.arange(position, position + start - index)[None]))
                position += start - index
            patch = pixels.shape[1]
            size = self._libmtmd_size(columns * patch, rows * patch, end - start)
            positions, advance = self._image_positions(*size, position)
            embedding = (block[: end - start].float() / self.embedding_scale).numpy()
            pieces.append(("embd", np.ascontiguousarray(embedding, dtype=np.float32), positions))
            index, position = end, position + advance
        if index < len(ids):
            pieces.append(("tokens", ids[index:], np.arange(position, position + len(ids) - index)[None]))
            position += len(ids) - index
        return pieces, position

    def _decode(self, pieces: list[tuple[str, Any, Any]], clear: bool = True, all_logits: bool = True) -> np.ndarray:
        lib = self.lib
        if clear:
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        outputs = []
        for kind, values, positions in pieces:
            count = len(values)
            if int(positions.max()) >= CONTEXT:
                raise McqError(f"the sample needs {int(positions.max()) + 1} positions, more than the runner's "
                               f"{CONTEXT}")
            # llama_batch_init sizes pos (and embd) by its token count: room for every section's positions.
            batch = lib.llama_batch_init(positions.size, self.n_embd if kind == "embd" else 0, 1)
            try:
                for i, position in enumerate(positions.flatten().tolist()):
                    batch.pos[i] = position
                for i in range(count):
                    if kind == "tokens":
                        batch.token[i] = values[i]
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
        return np.concatenate(outputs)

    def _token(self, token: int, position: int) -> np.ndarray:
        """The logits after one more token at `position` (decoding on the cache)."""
        return self._decode([("tokens", [token], np.array([[position]]))], clear=False)[-1]

    def logits(self, data: dict[str, Any], vision: torch.Tensor | None = None) -> torch.Tensor:
        return torch.from_numpy(self._decode(self._pieces(data, vision)[0]))

    def generate(self, data: dict[str, Any], max_new_tokens: int, vision: torch.Tensor | None = None) -> list[int]:
        pieces, position = self._pieces(data, vision)
        logits = self._decode(pieces, all_logits=False)[-1]
        tokens = []
        for step in range(max_new_tokens):
            token = int(np.argmax(logits))
            tokens.append(token)
            if token in self.terminators:
                break
            logits = self._token(token, position + step)
        return tokens

    # -- timings -----------------------------------------------------------------------------------------------
    def time_prefill(self, data: dict[str, Any], vision: torch.Tensor | None) -> float:
        pieces, _ = self._pieces(data, vision)
        with Stopwatch(torch.device("cpu")) as watch:
            self._decode(pieces, all_logits=False)
        return watch.seconds

    def time_decode(self, data: dict[str, Any], tokens: int, vision: torch.Tensor | None) -> float:
        pieces, position = self._pieces(data, vision)
        logits = self._decode(pieces, all_logits=False)[-1]
        with Stopwatch(torch.device("cpu")) as watch:
            for step in range(tokens):
                logits = self._token(int(np.argmax(logits)), position + step)
        return watch.seconds

    def close(self) -> None:
        self.mtmd.mtmd_free(self.vision_ctx)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def _tokens(path: Path) -> list[str]:
    import gguf

    return gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()

