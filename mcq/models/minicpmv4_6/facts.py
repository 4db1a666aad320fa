"""MiniCPM-V 4.6 facts as data (importable without torch): the tokenizer's named tokens (its components are in
`components.yaml`).

`MiniCPMV4_6Processor` reads its placeholder strings from the tokenizer's named special tokens
(`tokenizer_config.json` `extra_special_tokens`): `tokenizer.image_token`, `tokenizer.image_token_id`, ... The names
are transformers'; the strings are the ones vLLM 0.32's `minicpmv4_6.py` falls back to when a tokenizer lacks them,
i.e. the official ones."""

from __future__ import annotations

RELEASE = "4.6"

PROCESSOR_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
