"""Quantization: recipes (YAML) and the per-layer plan they give on a model (`mcq.quantize.recipe`).

Nothing is imported here, so `mcq recipes` and other light commands never pay for torch or llm-compressor.
"""
