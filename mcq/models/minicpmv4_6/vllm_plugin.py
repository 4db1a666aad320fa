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
      built without its video processor (torchvision): the info gets transformers' PIL image processor of the
      checkpoint directly, the one the processor holds, and a stand-in for the video processor with what vLLM
      reads of it (its keyword arguments and `max_slice_nums`). Videos are then served as embeddings (vLLM's own
      path for a video's frames resizes them with that PIL image processor, not transformers' video processor):
      vLLM builds a video's placeholder from its frames' sizes and that `max_slice_nums`, which is the engine's
      `mm_processor_kwargs` one where given (stock vLLM reads the checkpoint's only: a request cannot change it),
      so a validation's slicing applies to its videos as transformers' processor applies it.
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
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    from .video import video_settings

    class VideoSettings:
        """What vLLM's 4.6 processing reads of transformers' video processor: the keyword arguments it takes and
        how many slices a frame may have."""

        valid_kwargs = MiniCPMV4_6VideoProcessor.valid_kwargs

        def __init__(self, max_slice_nums: int):
            self.max_slice_nums = max_slice_nums

    class ProcessorParts:
        """What vLLM's 4.6 processing reads of transformers' processor: its image processor, its video processor's
        settings and the keyword arguments it takes."""

        valid_processor_kwargs = MiniCPMV4_6Processor.valid_processor_kwargs

        def __init__(self, image_processor, video_processor: VideoSettings):
            self.image_processor, self.video_processor = image_processor, video_processor

    class ProcessingInfo(minicpmv4_6.MiniCPMV4_6ProcessingInfo):
        def get_hf_processor(self, **kwargs: object):
            engine = self.ctx.model_config.get_multimodal_config().mm_processor_kwargs or {}
            slices = engine.get("max_slice_nums") or video_settings(self.ctx.model_config.model)["max_slice_nums"]
            return ProcessorParts(self.get_image_processor(), VideoSettings(int(slices)))

        def get_image_processor(self, **kwargs: object):
            return _pil_image_processor(self.ctx.model_config.model)

    replace_processing_info(minicpmv4_6.MiniCPMV4_6ForConditionalGeneration, ProcessingInfo)


@lru_cache(maxsize=None)
def _pil_image_processor(path: str):
    # transformers' top-level AutoImageProcessor is a placeholder without torchvision; this one picks the PIL backend.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    # Tensors, as transformers' processor asks of it (vLLM's 4.6 processing splits them).
    return AutoImageProcessor.from_pretrained(path, return_tensors="pt")
