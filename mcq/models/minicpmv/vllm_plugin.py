"""MiniCPM-V 2.6 / 4.0 / 4.5 in vLLM without remote code: what `mcq.vllm_plugin` registers for this family in every
vLLM process (`register`).

- `MiniCPMVConfig` for `model_type` "minicpmv" (`AutoConfig`); vLLM picks `MiniCPMV2_6` / `MiniCPMV4_0` /
  `MiniCPMV4_5` from its `version` as it does for the official config;
- `MiniCPMVImageProcessor` below (`AutoImageProcessor`, by the class name official `preprocessor_config.json`
  files give): mcq's slicing and normalization (`mcq.models.minicpmv.image_processing`, the official arithmetic)
  behind the interface vLLM calls;
- vLLM's MiniCPM-V processing info resolves that image processor when `trust_remote_code` is off (with it on,
  vLLM's own behaviour is kept: the checkpoint's code).
"""

from __future__ import annotations

import inspect
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

from mcq.models.vllm_processing import replace_processing_info

logger = logging.getLogger(__name__)

# Keyword arguments the Hub/Auto machinery passes to `from_pretrained` (they say where the files are, not how to
# process images).
_LOADING_KWARGS = frozenset({"revision", "trust_remote_code", "token", "cache_dir", "local_files_only",
                             "force_download", "proxies", "subfolder", "code_revision", "_from_auto",
                             "_from_pipeline", "use_auth_token", "user_agent"})


def register() -> None:
    """mcq's config and image processor for transformers' Auto classes, and vLLM's MiniCPM-V processing info
    finding that image processor without remote code."""
    register_transformers()
    _register_vllm_processing()


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

    replace_processing_info(model, ProcessingInfo)


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
