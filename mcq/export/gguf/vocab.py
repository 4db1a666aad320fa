"""The tokenizer as llama.cpp reads it from GGUF metadata: tokens, types, merges or scores, special ids, template.

Read from the checkpoint's own `tokenizer.json` through mcq's tokenizer loader (no remote code). gguf-py's vocab
classes are not used for the tokens: its `LlamaHfVocab` loads through `AutoTokenizer` (MiniCPM-V tokenizers name a
remote-code class) and gives every token the same placeholder score, and llama.cpp's converter picks the
pre-tokenizer by hashing a sample tokenization, a hash MiniCPM-V's tokenizers are missing from; the Qwen-based
releases use Qwen2's pre-tokenizer, so that is written directly. The special token ids are gguf-py's
`SpecialVocab`, the class llama.cpp's converter calls, which reads JSON only: each `<type>_token` of
tokenizer_config.json looked up among tokenizer.json's added tokens, and for a type still unset (a null
`bos_token`, as Qwen2's) config.json's `<type>_token_id`. On 4.5 that makes BOS `<|im_start|>` (151644), not
config.json's `<|endoftext|>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcq.errors import McqError

# gguf.TokenType values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GgufVocab:
    model: str                      # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None                 # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)   # GGUF key (tokenizer.ggml.bos_token_id...) → id
    add_bos: bool = False
    add_space_prefix: bool | None = None   # SentencePiece-style only
    chat_template: str | None = None

    def metadata(self) -> dict[str, tuple[str, object]]:
        keys: dict[str, tuple[str, object]] = {
            "tokenizer.ggml.model": ("str", self.model),
            "tokenizer.ggml.tokens": ("strs", self.tokens),
            "tokenizer.ggml.token_type": ("i32s", self.types),
        }
        if self.pre:
            keys["tokenizer.ggml.pre"] = ("str", self.pre)
        if self.scores is not None:
            keys["tokenizer.ggml.scores"] = ("f32s", self.scores)
        if self.merges:
            keys["tokenizer.ggml.merges"] = ("strs", self.merges)
        for key, token_id in self.special.items():
            keys[key] = ("u32", token_id)
        keys["tokenizer.ggml.add_bos_token"] = ("bool", self.add_bos)
        if self.add_space_prefix is not None:
            keys["tokenizer.ggml.add_space_prefix"] = ("bool", self.add_space_prefix)
        keys["tokenizer.ggml.add_eos_token"] = ("bool", False)
        if self.chat_template:
            keys["tokenizer.chat_template"] = ("str", self.chat_template)
        return keys


def read_vocab(path: Path, load_tokenizer: Callable[[Path], Any], vocab_size: int) -> GgufVocab:
    """`load_tokenizer`: the family's loader (no remote code)."""
    file = path / "tokenizer.json"
    if not file.is_file():
        raise McqError(f"{path} has no tokenizer.json; the GGUF tokenizer metadata (tokens, merges) is read from it")
    tokenizer = load_tokenizer(path)
    spec = json.loads(file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise McqError(f"{file}: tokenizer model {model.get('type')!r} is not BPE; mcq writes GGUF vocabularies of "
                       "BPE tokenizers")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if not merges:
        raise McqError(f"{file} has no BPE merges; llama.cpp cannot tokenize without them")
    byte_level = not model.get("byte_fallback", False)
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise McqError(f"{path}: the tokenizer has token id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.added_tokens_decoder

    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            # Rows of the embedding table no token maps to (the official vocabularies have such holes).
            tokens.append(f"[PAD{token_id}]")
            types.append(UNUSED)
            continue
        tokens.append(token)
        if token_id in added:
            special = added[token_id].special or re.fullmatch(r"<\|.*\|>", token) is not None
            types.append(CONTROL if special else USER_DEFINED)
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(BYTE)
        else:
            types.append(NORMAL)

    special = special_token_ids(path, vocab_size)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if byte_level:
        return GgufVocab(model="gpt2", pre=_byte_level_pre(spec.get("pre_tokenizer")), tokens=tokens, types=types,
                         merges=merges, special=special,
                         add_bos=bool(getattr(tokenizer, "add_bos_token", False)), chat_template=template)
    # SentencePiece-style (MiniCPM4): llama.cpp merges the adjacent pair whose merged token scores highest, so a
    # token's score is minus the rank of the merge that makes it; the BPE merge order is then reproduced.
    scores = [0.0] * vocab_size
    index = {token: i for i, token in enumerate(tokens)}
    for rank, merge in enumerate(merges):
        merged = index.get(merge.replace(" ", "", 1))
        if merged is not None and scores[merged] == 0.0:
            scores[merged] = -float(rank + 1)
    # llama.cpp puts "▁" before every text that follows a special token when add_space_prefix is set, and before
    # none otherwise; a Metaspace with prepend_scheme "first" (non-legacy) puts it before none of them except the
    # very start. Chat prompts start with a special token, so they tokenize the same with the prefix off.
    metaspace = _metaspace(spec.get("pre_tokenizer"))
    space_prefix = metaspace is not None and metaspace.get("prepend_scheme", "always") == "always"
    return GgufVocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores, special=special,
                     add_bos=bool(getattr(tokenizer, "add_bos_token", True)), add_space_prefix=space_prefix,
                     chat_template=template)


def special_token_ids(path: Path, vocab_size: int) -> dict[str, int]:
    """GGUF key → token id of the special tokens, as llama.cpp's converter writes them (gguf-py's `SpecialVocab`).
    A type with no GGUF key (`cls`) is dropped, as `SpecialVocab.add_to_gguf` drops it."""
    import gguf

    keys = {"bos": gguf.Keys.Tokenizer.BOS_ID, "eos": gguf.Keys.Tokenizer.EOS_ID, "unk": gguf.Keys.Tokenizer.UNK_ID,
            "sep": gguf.Keys.Tokenizer.SEP_ID, "pad": gguf.Keys.Tokenizer.PAD_ID, "mask": gguf.Keys.Tokenizer.MASK_ID,
            "eot": gguf.Keys.Tokenizer.EOT_ID, "eom": gguf.Keys.Tokenizer.EOM_ID}
    found = gguf.SpecialVocab(path, load_merges=False, n_vocab=vocab_size).special_token_ids
    return {keys[kind]: int(token_id) for kind, token_id in found.items() if kind in keys}


# llama.cpp's pre-tokenizers of the Qwen tokenizers, by the split regex of tokenizer.json (its converter finds
# them by hashing a sample tokenization instead): Qwen3.5's letters include combining marks (\\p{M}).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_SPLIT = {_QWEN2_SPLIT: "qwen2", _QWEN35_SPLIT: "qwen35"}


def _byte_level_pre(pre_tokenizer: dict | None) -> str:
    """tokenizer.ggml.pre of a byte-level BPE tokenizer: the Qwen pre-tokenizer its split regex is; qwen2 (what the
    Qwen-based resampler releases have) for one mcq does not recognize."""
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    patterns = [(step.get("pattern") or {}).get("Regex") for step in steps if step.get("type") == "Split"]
    return next((_PRE_BY_SPLIT[p] for p in patterns if p in _PRE_BY_SPLIT), "qwen2")


def _metaspace(pre_tokenizer: dict | None) -> dict | None:
    if not pre_tokenizer:
        return None
    if pre_tokenizer.get("type") == "Metaspace":
        return pre_tokenizer
    return next((m for m in map(_metaspace, pre_tokenizer.get("pretokenizers") or []) if m), None)
