"""MiniCPM-V 4.6 in vLLM without torchvision: what `mcq.vllm_plugin` registers for this family in every vLLM
process (`register`)."""

from __future__ import annotations

from functools import lru_cache

from mcq.models.vllm_processing import replace_processing_info

# transformers' modules that import torchvision unconditionally → their PIL twins, which define the same names.
_PIL_TWINS = {"transformers.models.qwen2_vl.image_processing_qwen2_vl":
              "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"}


def register() -> None:
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

    replace_processing_info(minicpmv4_6.MiniCPMV4_6ForConditionalGeneration, ProcessingInfo)


@lru_cache(maxsize=None)
def _pil_image_processor(path: str):
    # transformers' top-level AutoImageProcessor is a placeholder without torchvision; this one picks the PIL backend.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    # Tensors, as transformers' processor asks of it (vLLM's 4.6 processing splits them).
    return AutoImageProcessor.from_pretrained(path, return_tensors="pt")
