"""Generation on the runtimes mcq drives itself (onnxruntime, Core ML or its interpreter): the next token chosen
greedily or sampled as transformers' `generate` samples, and the answer's text as it grows."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import numpy as np

from mcq.errors import McqError


def stream_text(tokens: Iterator[int], terminators: Collection[int], decode: Callable[[list[int]], str]
                ) -> Iterator[str]:
    """The text of generated `tokens` piece by piece, up to the first terminator, as `decode` gives the whole: a
    piece is held back while the text ends inside a multi-byte character."""
    kept: list[int] = []
    shown = ""
    for token in tokens:
        if token in terminators:
            break
        kept.append(token)
        text = decode(kept)
        if text.endswith("\ufffd"):   # half of a multi-byte character: wait for the rest
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
            shown = text
    text = decode(kept)   # what is left when generation ends inside a character
    if len(text) > len(shown):
        yield text[len(shown):]


class TokenChooser:
    """Greedy or sampled next tokens, with the settings `chat()` passes (transformers' processing order:
    repetition penalty, min_new_tokens, then temperature, top-k, top-p before sampling)."""

    SUPPORTED = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "min_new_tokens", "num_beams"}

    def __init__(self, settings: dict[str, Any], terminators: Sequence[int], seed: int):
        unknown = set(settings) - self.SUPPORTED
        if unknown:
            raise McqError(f"generation settings {', '.join(sorted(unknown))} are not supported by the ONNX runtime")
        if int(settings.get("num_beams", 1)) != 1:
            raise McqError("beam search is not implemented by the ONNX runtime; use greedy decoding (num_beams=1) "
                           "or sampling")
        self.sample = bool(settings.get("do_sample", False))
        self.temperature = float(settings.get("temperature", 1.0))
        self.top_k = int(settings.get("top_k", 0) or 0)
        self.top_p = float(settings.get("top_p", 1.0))
        self.penalty = float(settings.get("repetition_penalty", 1.0))
        self.min_new_tokens = int(settings.get("min_new_tokens", 0))
        if self.sample and not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            # Out of these ranges the sampling distribution is NaN or empty.
            raise McqError(f"sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0; got temperature "
                           f"{self.temperature}, top_p {self.top_p}, top_k {self.top_k}")
        self.terminators = list(terminators)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, history: np.ndarray, step: int) -> np.ndarray:
        scores = logits.astype(np.float32).copy()
        if self.penalty != 1.0:
            rows = np.arange(len(scores))[:, None]
            seen = scores[rows, history]
            scores[rows, history] = np.where(seen < 0, seen * self.penalty, seen / self.penalty)
        if step < self.min_new_tokens:
            scores[:, self.terminators] = -np.inf
        if not self.sample:
            return scores.argmax(-1)
        scores = scores / self.temperature
        if self.top_k:
            kth = np.sort(scores, axis=-1)[:, -min(self.top_k, scores.shape[-1])][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        if self.top_p < 1.0:
            order = np.argsort(scores, axis=-1)          # ascending, as transformers' TopPLogitsWarper
            sorted_scores = np.take_along_axis(scores, order, axis=-1)
            probs = np.exp(sorted_scores - sorted_scores.max(-1, keepdims=True))
            cumulative = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
            remove = cumulative <= 1 - self.top_p
            remove[:, -1] = False                          # always keep the most likely token
            removed = np.zeros_like(remove)
            np.put_along_axis(removed, order, remove, axis=-1)
            scores = np.where(removed, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return np.array([self.rng.choice(len(p), p=p) for p in probs])
