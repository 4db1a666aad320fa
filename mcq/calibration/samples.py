"""`Sample`: one calibration or evaluation conversation in the official MiniCPM-V chat format.

A sample is what `model.chat(msgs=...)` takes, plus the answer: `messages` alternate user and assistant turns, a
turn's content is a string or a list of PIL RGB images and strings, and the last turn is normally the assistant's
answer, so that calibration runs the whole exchange through the model (teacher forcing) and held-out evaluation
can score the answer tokens. A sample whose last turn is the user's (a folder of images with no conversations) is
prompt-only: encoding adds the assistant's opening instead and there is nothing to score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

# "user" is every sample read from user data; the others are the kinds of the built-in synthetic set.
KINDS = ("document", "table", "chart", "scene", "multi_image", "video", "text", "user")
SPLITS = ("calibration", "heldout")


@dataclass(frozen=True)
class Sample:
    # Stable id: "builtin/<split>/<variant>/<index>", or for user data "user/<jsonl file>:<line>",
    # "user/<image path>" or "user/<datasets folder>[<row>]".
    name: str
    kind: str  # one of KINDS
    messages: tuple[dict[str, Any], ...]  # {"role": "user"|"assistant", "content": str | list[Image | str]}
    # Video only: the frames' temporal ids grouped as mcq.models.minicpmv.video.temporal_ids returns them. The
    # frames are the images of the sample, in order.
    temporal_ids: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        # Samples are built by this package; a violation here is a bug in the builder, not bad user input.
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")
        if not self.messages or self.messages[0].get("role") != "user":
            raise ValueError(f"{self.name}: a sample starts with a user turn")
        if self.temporal_ids is not None:
            grouped = sum(len(group) for group in self.temporal_ids)
            if grouped != len(self.images):
                raise ValueError(f"{self.name}: {grouped} temporal ids for {len(self.images)} frames")

    @property
    def images(self) -> list[Image.Image]:
        """Every image of the conversation in order (the frames, for a video sample)."""
        return [item for turn in self.messages if not isinstance(turn["content"], str)
                for item in turn["content"] if isinstance(item, Image.Image)]

    @property
    def texts(self) -> list[str]:
        """Every text piece of the conversation in order."""
        return [item for turn in self.messages
                for item in ([turn["content"]] if isinstance(turn["content"], str) else turn["content"])
                if isinstance(item, str)]

    @property
    def has_answer(self) -> bool:
        """False for prompt-only samples: encoding then adds the generation prompt and no token is scored."""
        return self.messages[-1]["role"] == "assistant"

    @property
    def is_video(self) -> bool:
        return self.temporal_ids is not None
