"""What a family's vLLM registration (`mcq.models.<family>.vllm_plugin`, called by `mcq.vllm_plugin` in every
vLLM process) shares: putting mcq's processing info in the place of vLLM's own for one of its models."""

from __future__ import annotations


def replace_processing_info(model: type, info: type) -> None:
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
