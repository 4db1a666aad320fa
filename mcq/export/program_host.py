"""Host code shared by the exports traced from a family's programs (`mcq.models.familyspec.Programs`: ONNX and Core
ML runtimes of MiniCPM-V 4.6): a sample's vision blocks, writing them over the text's image (and video) token
slots, and `mcq chat` on them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mcq.errors import McqError

from .generation import TokenChooser, stream_text


def sample_blocks(programs, config, data: Mapping[str, Any],
                  run_vision: Callable[[dict[str, np.ndarray]], np.ndarray]) -> np.ndarray:
    """The vision blocks of an encoded sample: each image, then each video frame (`programs.visuals` in order),
    through `run_vision` (the vision program's inputs by name → `[tokens, hidden]`), zero-padded to the longest."""
    import torch

    blocks = [run_vision({name: np.asarray(value) for name, value in inputs.items()})
              for visual in programs.visuals if visual.pixels in data
              for inputs in programs.vision_inputs(config, torch.as_tensor(data[visual.pixels]).float(),
                                                   data[visual.sizes])]
    return _padded(blocks)


def has_visuals(programs, data: Mapping[str, Any]) -> bool:
    return any(visual.pixels in data for visual in programs.visuals)


def write_visual_features(programs, config, embeds: np.ndarray, ids: np.ndarray, blocks: np.ndarray,
                          data: Mapping[str, Any]) -> np.ndarray:
    """`embeds` with the sample's vision blocks (`sample_blocks`' order) written over each kind's token slots."""
    start = 0
    for visual in programs.visuals:
        if visual.pixels in data:
            counts = programs.image_tokens(config, data[visual.sizes])
            _write_features(embeds, ids, blocks[start:start + len(counts)], counts, getattr(config, visual.token),
                            visual.token.removesuffix("_token_id"))
            start += len(counts)
    return embeds


def _padded(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """One vision block per image (`[tokens, hidden]`, tokens varying) → `[images, longest, hidden]` float32, each
    zero-padded at the end."""
    padded = np.zeros((len(blocks), max(len(b) for b in blocks), blocks[0].shape[-1]), dtype=np.float32)
    for index, block in enumerate(blocks):
        padded[index, :len(block)] = block
    return padded


def _write_features(embeds: np.ndarray, ids: np.ndarray, blocks: np.ndarray, counts: Sequence[int], token_id: int,
                    kind: str) -> None:
    """Block i's first `counts[i]` tokens, in order, over the slots of `token_id` in `ids` (`embeds` is shaped as
    `ids` plus hidden); a McqError when the slots and the features disagree in number."""
    features = np.concatenate([block[:count] for block, count in zip(blocks, counts)])
    slots = np.asarray(ids) == token_id
    if int(slots.sum()) != len(features):
        raise McqError(f"{int(slots.sum())} {kind} tokens in the text but {len(features)} {kind} features")
    embeds[slots] = features


def chat_answer(model, root: Path, tokenizer, request) -> str | Iterator[str]:
    """`mcq chat` (a `mcq.models.familyspec.ChatRequest`) on an export traced from a family's programs, whose
    `root` carries the checkpoint's tokenizer, processor and generation files: the family's chat inputs
    (`Programs.chat_inputs`), the tokens `model.generate_tokens` picks (greedy, or with `--sampling` the
    generation_config.json settings, seeded, as transformers' `generate` samples by default), decoded with special
    tokens skipped as the family's own chat decodes them."""
    from transformers import GenerationConfig

    if request.dtype != "auto":
        raise McqError(f"--dtype {request.dtype}: an export computes in the precision it was exported with")
    inputs = model.programs.chat_inputs(root, request)
    settings = {}
    if request.sampling:
        config = GenerationConfig.from_pretrained(root)
        settings = {"do_sample": True, "temperature": config.temperature, "top_k": config.top_k,
                    "top_p": config.top_p, "repetition_penalty": config.repetition_penalty}
    chooser = TokenChooser({key: value for key, value in settings.items() if value is not None}, model.terminators,
                           request.seed)
    pieces = stream_text(model.generate_tokens(inputs, request.max_new_tokens, chooser), model.terminators,
                         lambda kept: tokenizer.decode(kept, skip_special_tokens=True))
    return pieces if request.stream else "".join(pieces)
