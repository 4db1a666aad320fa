"""Load MiniCPM-V tokenizers with plain transformers classes, never with the checkpoint's remote code.

The official tokenizer_config.json files name ``"tokenizer_class": "MiniCPMVTokenizerFast"`` with an ``auto_map``
into a Python file shipped next to the weights. That class only adds a few id properties on top of a stock
tokenizer, so we instantiate the stock class directly (``Qwen2Tokenizer`` for 2.6 / 4.5, whose LLMs are Qwen2 /
Qwen3; ``LlamaTokenizer`` for 4.0, whose MiniCPM4 LLM uses a Llama-style tokenizer) and compute those ids here
(:func:`special_token_ids`). ``cls.from_pretrained`` ignores ``tokenizer_class`` and ``auto_map`` (it does not even
warn), and it keeps the chat template (tokenizer_config.json or chat_template.jinja) and the added tokens.

Two things the stock loading does not guarantee and this module checks or enforces:

* transformers 5 rebuilds the backend from the vocabulary and appends the added tokens in id order; it does not
  place them at the ids tokenizer_config.json gives. Wrong ids would silently feed the wrong embeddings, so every
  ``added_tokens_decoder`` entry is checked against the loaded tokenizer.
* when tokenizer.json is present, transformers drops ``add_bos_token`` / ``add_eos_token`` from the config and uses
  the post-processor in tokenizer.json. MiniCPM-V after 2.5 never feeds a BOS, so the config's flags are re-applied.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from transformers import LlamaTokenizer, PreTrainedTokenizerBase, Qwen2Tokenizer

from mcq.errors import McqError

__all__ = ["MiniCPMVSpecialTokens", "load_tokenizer", "special_token_ids"]

# Stock tokenizer class per MiniCPM-V version (the key set matches versions.VERSIONS).
_TOKENIZER_CLASSES: dict[str, type[PreTrainedTokenizerBase]] = {
    "2.6": Qwen2Tokenizer,
    "4.0": LlamaTokenizer,
    "4.5": Qwen2Tokenizer,
}

_JSON_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json", "vocab.json")


def load_tokenizer(directory: str | Path, version: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a MiniCPM-V ``version`` ("2.6", "4.0" or "4.5") checkpoint directory.

    Raises :class:`McqError` (one line, naming the path) when the directory or its tokenizer files are missing or
    unreadable, or when the files disagree about the ids of the added tokens.
    """
    cls = _TOKENIZER_CLASSES.get(str(version))
    if cls is None:
        raise McqError(f"no tokenizer for MiniCPM-V version {version!r}; supported: {', '.join(_TOKENIZER_CLASSES)}")
    path = Path(directory)
    if not path.is_dir():
        raise McqError(f"tokenizer directory {path} does not exist")
    # Parse every JSON file up front (the large ones too) so that a broken file is reported by name; transformers
    # and tokenizers would fail with a bare parser message.
    config = {}
    for name in _JSON_FILES:
        if (path / name).is_file():
            data = _read_json(path / name)
            if name == "tokenizer_config.json":
                if not isinstance(data, dict):
                    raise McqError(f"cannot read {path / name}: expected a JSON object")
                config = data
    _check_vocabulary_files(path, cls)

    try:
        # local_files_only: a directory is all we ever load; never let a typo turn into a hub request.
        tokenizer = cls.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers/tokenizers raise many types; all mean "these files do not load"
        raise McqError(f"cannot load the tokenizer in {path}: {_first_line(err)}") from err

    if "add_bos_token" in config or "add_eos_token" in config:
        tokenizer.add_bos_token = bool(config.get("add_bos_token", False))
        tokenizer.add_eos_token = bool(config.get("add_eos_token", False))
    _check_added_token_ids(tokenizer, config.get("added_tokens_decoder") or {}, path)
    return tokenizer


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise McqError(f"cannot read {file}: {_first_line(err)}") from None


def _check_vocabulary_files(path: Path, cls: type[PreTrainedTokenizerBase]) -> None:
    """Fail early, with the missing file named, instead of deep inside transformers."""
    if (path / "tokenizer.json").is_file():
        return
    if cls is Qwen2Tokenizer:
        has_vocab, has_merges = (path / "vocab.json").is_file(), (path / "merges.txt").is_file()
        if has_vocab and not has_merges:
            raise McqError(f"{path} has vocab.json but no merges.txt (and no tokenizer.json)")
        if not has_vocab:
            raise McqError(f"{path} has no tokenizer files: expected tokenizer.json or vocab.json + merges.txt")
        return
    if not (path / "tokenizer.model").is_file():
        raise McqError(f"{path} has no tokenizer files: expected tokenizer.json or tokenizer.model")
    # transformers converts a SentencePiece model only with these two packages; without them it falls back to a
    # tiktoken reader and fails with an unrelated message.
    missing = [name for name in ("sentencepiece", "google.protobuf") if not _importable(name)]
    if missing:
        raise McqError(f"{path} has only tokenizer.model, which needs the {' and '.join(missing)} package(s); "
                       "install them or add tokenizer.json")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package ("google") raises instead of returning None
        return False


def _check_added_token_ids(tokenizer: PreTrainedTokenizerBase, decoder: Mapping, path: Path) -> None:
    vocab = tokenizer.get_vocab()
    for index, entry in decoder.items():
        content = entry["content"] if isinstance(entry, Mapping) else str(entry)
        actual = vocab.get(content)
        if actual != int(index):
            raise McqError(
                f"{path / 'tokenizer_config.json'} gives {content!r} id {index}, but the vocabulary files give it "
                f"{'no id' if actual is None else f'id {actual}'}; the tokenizer files do not belong together"
            )


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


@dataclass(frozen=True)
class MiniCPMVSpecialTokens:
    """Token ids the MiniCPM-V model and processor use, looked up by their strings in one tokenizer.

    ``unk_id`` is the image feature slot: the processor writes 64 ``<unk>`` per image or slice and the model
    overwrites their embeddings. ``bos_id`` / ``pad_id`` are None when the tokenizer defines no such token.
    """

    im_start_id: int  # <image>
    im_end_id: int  # </image>
    slice_start_id: int  # <slice>
    slice_end_id: int  # </slice>
    im_id_start_id: int  # <image_id>
    im_id_end_id: int  # </image_id>
    unk_id: int  # <unk>
    newline_id: int  # "\n", as encoded right after a special token (how the slice grid uses it)
    bos_id: int | None
    eos_id: int
    pad_id: int | None
    vocab: Mapping[str, int] = field(repr=False, compare=False)

    def terminator_ids(self, names: Iterable[str]) -> list[int]:
        """Ids of the token strings that end generation, e.g. ``VersionSpec.terminators``."""
        return [_lookup(self.vocab, name) for name in names]


# MiniCPMVSpecialTokens field -> token string, in field order.
_MARKERS = {
    "im_start_id": "<image>",
    "im_end_id": "</image>",
    "slice_start_id": "<slice>",
    "slice_end_id": "</slice>",
    "im_id_start_id": "<image_id>",
    "im_id_end_id": "</image_id>",
    "unk_id": "<unk>",
}


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> MiniCPMVSpecialTokens:
    """Resolve the MiniCPM-V special tokens of ``tokenizer``; a missing one raises :class:`McqError` naming it."""
    vocab = tokenizer.get_vocab()
    if tokenizer.eos_token is None:
        raise McqError("the tokenizer defines no eos_token")

    def optional(token: str | None) -> int | None:
        return None if token is None else _lookup(vocab, str(token))

    markers = {name: _lookup(vocab, token) for name, token in _MARKERS.items()}
    return MiniCPMVSpecialTokens(
        **markers,
        newline_id=_newline_id(tokenizer, markers["slice_end_id"]),
        bos_id=optional(tokenizer.bos_token),
        eos_id=_lookup(vocab, str(tokenizer.eos_token)),
        pad_id=optional(tokenizer.pad_token),
        vocab=vocab,
    )


def _lookup(vocab: Mapping[str, int], token: str) -> int:
    # A vocabulary lookup, not convert_tokens_to_ids: that one maps unknown strings to the unk id, and in MiniCPM-V
    # the unk token is a real, meaningful token (the image slot).
    if token not in vocab:
        raise McqError(f"the tokenizer has no {token!r} token")
    return vocab[token]


def _newline_id(tokenizer: PreTrainedTokenizerBase, slice_end_id: int) -> int:
    # Byte-level vocabularies spell "\n" as "Ċ" and SentencePiece-style ones as "<0x0A>" (or "\n"), and the latter put
    # a word-start marker in front of text at the start of the input. Encoding it after a special token, where the
    # slice grid places it, gives the id the model actually sees, whatever the spelling.
    ids = tokenizer.encode("</slice>\n", add_special_tokens=False)
    if len(ids) != 2 or ids[0] != slice_end_id:
        raise McqError("the tokenizer does not encode '\\n' as a single token after '</slice>'")
    return ids[1]
