"""Run an ONNX export traced from a family's torch programs (`mcq.models.familyspec.Programs`, e.g. MiniCPM-V 4.6)
on plain onnxruntime, on the inputs of the family's `CalibrationEncoder` (what `mcq validate` scores) or of its
chat (`mcq chat`).

The host does what the graphs do not: the vision graph's index tables per image or video frame
(`Programs.vision_inputs`, from the functions transformers' model calls), writing their tokens over their token
slots of the text embeddings, and the generation loop, which threads the decoder's whole state (KV caches of the
full-attention layers, conv and recurrent states of the linear-attention layers: `Programs.state`) from each call
to the next.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mcq.errors import McqError

from ..generation import TokenChooser
from ..program_host import chat_answer, has_visuals, sample_blocks, write_visual_features
from .runtime import open_sessions


class OnnxProgramModel:
    """A traced ONNX export on onnxruntime: vision blocks, embeddings, the decoder with its state, generation."""

    def __init__(self, path: str | Path, providers=("CPUExecutionProvider",), threads: int | None = None):
        from transformers import AutoTokenizer, GenerationConfig

        from mcq.models.family import family_for

        self.root, self.onnx_dir, self.sessions = open_sessions(path, providers, threads)
        model_type = json.loads((self.root / "config.json").read_text())["model_type"]
        family = family_for(model_type)
        if family.programs is None:
            raise McqError(f"{self.root} is an ONNX export of the {model_type} family, whose graphs are not traced "
                           "programs (run it with mcq.export.onnx.OnnxMiniCPMV)")
        self.programs = family.programs
        self.config = family.config_class.from_pretrained(str(self.root))
        self.tokenizer = AutoTokenizer.from_pretrained(self.root)
        ends = GenerationConfig.from_pretrained(self.root).eos_token_id
        self.terminators = set(ends if isinstance(ends, list) else [ends])
        self.state = self.programs.state(self.config)

    # The methods `mcq.validate`'s ONNX runner calls, as `OnnxMiniCPMV` has them; a batch is one encoded sample,
    # `vision` a list with that sample's blocks (another model's, to score them through this LLM) or None.

    # -- vision -------------------------------------------------------------------------------------------------
    def vision_per_sample(self, data: dict[str, Any]) -> list[np.ndarray]:
        """The sample's vision blocks, one per image, then one per video frame, zero-padded to the longest:
        `[[blocks, tokens, hidden]]`."""
        session = self.sessions["vision_encoder"]
        return [sample_blocks(self.programs, self.config, data,
                              lambda inputs: session.run(["image_features"], inputs)[0])]

    # -- text ---------------------------------------------------------------------------------------------------
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed_tokens"].run(["inputs_embeds"],
                                                 {"input_ids": np.asarray(input_ids, dtype=np.int64)})[0]

    def merged_embeddings(self, data: dict[str, Any], vision: list[np.ndarray] | None = None) -> np.ndarray:
        """Text embeddings `[1, length, hidden]` with each image's and video frame's tokens at their slots."""
        ids = np.asarray(data["input_ids"], dtype=np.int64)
        embeds = self.embed(ids)
        if not has_visuals(self.programs, data):
            return embeds
        (blocks,) = self.vision_per_sample(data) if vision is None else vision
        return write_visual_features(self.programs, self.config, embeds, ids, blocks, data)

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """The state before the first token: zeros, and KV caches with no past."""
        return {state.name: np.zeros([batch if axis == 0 else (size or 0) for axis, size in enumerate(state.shape)],
                                     dtype=np.float32) for state in self.state}

    def decoder(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One decoder call: logits `[B, S, vocab]` and the state after it (keyed by the next call's input names)."""
        outputs = self.sessions["decoder_model_merged"].run(
            ["logits", *(s.output for s in self.state)],
            {"inputs_embeds": inputs_embeds, "attention_mask": np.asarray(attention_mask, dtype=np.int64),
             "position_ids": np.asarray(position_ids, dtype=np.int64), **cache})
        return outputs[0], {s.name: value for s, value in zip(self.state, outputs[1:])}

    def forward(self, data: dict[str, Any], vision: list[np.ndarray] | None = None) -> np.ndarray:
        """Teacher-forced logits `[1, length, vocab]` from an empty state."""
        embeds = self.merged_embeddings(data, vision)
        length = embeds.shape[1]
        logits, _ = self.decoder(embeds, np.ones((1, length)), np.arange(length)[None], self.empty_cache(1))
        return logits

    def generate(self, data: dict[str, Any], max_new_tokens: int, vision: list[np.ndarray] | None = None
                 ) -> list[list[int]]:
        """Greedy continuation, up to and including a terminator (one row: the sample's)."""
        return [list(self.generate_tokens(data, max_new_tokens, TokenChooser({}, self.terminators, 0), vision))]

    def generate_tokens(self, data: dict[str, Any], max_new_tokens: int, chooser: TokenChooser,
                        vision: list[np.ndarray] | None = None) -> Iterator[int]:
        """The new tokens one by one as `chooser` picks them, up to and including a terminator."""
        embeds = self.merged_embeddings(data, vision)
        history = np.asarray(data["input_ids"], dtype=np.int64)
        past = embeds.shape[1]
        logits, cache = self.decoder(embeds, np.ones((1, past)), np.arange(past)[None], self.empty_cache(1))
        for step in range(max_new_tokens):
            token = int(chooser(logits[:, -1], history, step)[0])
            yield token
            if token in self.terminators or step + 1 == max_new_tokens:
                return
            history = np.concatenate([history, [[token]]], axis=1)
            logits, cache = self.decoder(self.embed([[token]]), np.ones((1, past + 1)), np.array([[past]]), cache)
            past += 1


def chat_on_programs(path: str | Path, request) -> str | Iterator[str]:
    """`mcq chat` (a `mcq.models.familyspec.ChatRequest`) on a traced ONNX export (`program_host.chat_answer`)."""
    model = OnnxProgramModel(path)
    return chat_answer(model, model.root, model.tokenizer, request)
