"""`MiniCPMVProcessor`: prompt text with `(<image>./</image>)` markers + PIL images → model inputs.

It expands each marker into the official placeholder string (`<image_id>`, `<image>`, 64 x `<unk>`, `<slice>` rows),
tokenizes with the checkpoint's own tokenizer (loaded without remote code), and records `image_bound`: the
[start, end) token span of every run of `<unk>` feature slots, which is where the model writes vision features.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mcq.errors import McqError

from .image_processing import MiniCPMVImageProcessor
from .tokenization import load_tokenizer, special_token_ids
from .versions import normalize_version, version_spec

IMAGE_MARKER = "(<image>./</image>)"


class MiniCPMVProcessor:
    def __init__(self, image_processor: MiniCPMVImageProcessor, tokenizer, version: str):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.version = normalize_version(version)
        self.spec = version_spec(self.version)
        self.tokens = special_token_ids(tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, tokenizer=None) -> MiniCPMVProcessor:
        directory = Path(directory)
        config_path = directory / "config.json"
        try:
            version = json.loads(config_path.read_text()).get("version")
        except (OSError, json.JSONDecodeError) as err:
            raise McqError(f"cannot read {config_path}: {err}") from None
        version = version_spec(version).version
        return cls(MiniCPMVImageProcessor.from_pretrained(directory), tokenizer or load_tokenizer(directory, version),
                   version)

    def save_pretrained(self, directory: str | Path) -> None:
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(str(directory))

    def __call__(
        self,
        text: str | list[str],
        images: list[list[Any]] | None = None,
        max_length: int | None = None,
        max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
        temporal_ids: list | None = None,
    ) -> dict[str, Any]:
        """A batch: `text[i]` holds one `(<image>./</image>)` marker per image of `images[i]`.

        `temporal_ids[i]` groups the frames of sample i (4.5 video); the placeholders of all but the first frame
        of a group are dropped, since the group shares one block of features, and as in the official processor the
        text before each dropped marker is stripped of surrounding whitespace. Returns left-padded `input_ids`,
        `attention_mask` (from the padding added here), per-sample `pixel_values`, `tgt_sizes`, `image_bound`,
        `temporal_ids` and `image_sizes`.
        """
        texts = [text] if isinstance(text, str) else list(text)
        images = images if images is not None else [[] for _ in texts]
        temporal_ids = temporal_ids if temporal_ids is not None else [None] * len(texts)
        if len(images) != len(texts) or len(temporal_ids) != len(texts):
            raise McqError(f"{len(texts)} prompts but {len(images)} image lists and {len(temporal_ids)} temporal lists")
        samples = [self._encode(t, imgs, tids, max_length, max_slice_nums, use_image_id)
                   for t, imgs, tids in zip(texts, images, temporal_ids)]
        return self._pad(samples)

    def _encode(self, text, images, temporal_ids, max_length, max_slice_nums, use_image_id) -> dict[str, Any]:
        if temporal_ids is not None and not self.spec.temporal:
            raise McqError(f"video temporal ids need MiniCPM-V 4.5; this checkpoint is {self.version}")
        if text.count(IMAGE_MARKER) != len(images):
            raise McqError(f"the prompt has {text.count(IMAGE_MARKER)} image markers but {len(images)} images")
        if use_image_id is None:
            use_image_id = self.image_processor.use_image_id
        vision = self.image_processor.preprocess(images, max_slice_nums=max_slice_nums, temporal_ids=temporal_ids) \
            if images else {"pixel_values": [], "tgt_sizes": torch.zeros(0, 2, dtype=torch.long), "image_sizes": [],
                            "temporal_ids": [], "skip_image_idx": []}
        chunks = text.split(IMAGE_MARKER)
        parts = []
        for i, chunk in enumerate(chunks[:-1]):
            if i in vision["skip_image_idx"]:
                # A frame that shares its temporal group's features: the official processor drops its marker and
                # strips the text before it (the "\n" between frames), so a group reads as one image.
                parts.append(chunk.strip())
            else:
                parts.append(chunk)
                parts.append(self.image_processor.get_slice_image_placeholder(
                    vision["image_sizes"][i], i, max_slice_nums=max_slice_nums, use_image_id=use_image_id))
        parts.append(chunks[-1])
        # Versions after 2.5 add no BOS; the chat template already starts the turn.
        ids = self.tokenizer.encode("".join(parts), add_special_tokens=False)
        if max_length is not None and len(ids) > max_length:
            if self.tokens.unk_id in ids[max_length:]:
                raise McqError(f"the prompt is {len(ids)} tokens and max_inp_length {max_length} would cut an image "
                               "placeholder; raise max_inp_length or send fewer/smaller images")
            ids = ids[:max_length]
        ids = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": ids, "image_bound": self.image_bound(ids), **vision}

    def image_bound(self, input_ids: torch.Tensor) -> torch.Tensor:
        """`[k, 2]` spans (index after each `<image>`/`<slice>`, index of the matching `</image>`/`</slice>`)."""
        t = self.tokens
        starts = torch.where((input_ids == t.im_start_id) | (input_ids == t.slice_start_id))[0] + 1
        ends = torch.where((input_ids == t.im_end_id) | (input_ids == t.slice_end_id))[0]
        if len(starts) != len(ends):
            raise McqError(f"unbalanced image tokens in the prompt: {len(starts)} openings, {len(ends)} closings")
        return torch.stack([starts, ends], dim=-1)

    def _pad(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(s["input_ids"]) for s in samples)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        image_bound = []
        for row, sample in enumerate(samples):
            offset = longest - len(sample["input_ids"])
            input_ids[row, offset:] = sample["input_ids"]
            attention_mask[row, offset:] = 1
            image_bound.append(sample["image_bound"] + offset)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": [s["pixel_values"] for s in samples],
            "tgt_sizes": [s["tgt_sizes"] for s in samples],
            "image_bound": image_bound,
            "temporal_ids": [s["temporal_ids"] for s in samples],
            "image_sizes": [s["image_sizes"] for s in samples],
        }
