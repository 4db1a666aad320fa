"""Build small, deterministic MiniCPM-V tokenizers for tests and tiny checkpoints.

The real tokenizers have vocabularies of ~150k (Qwen2 / Qwen3) or tens of thousands (MiniCPM4) tokens, and nothing
may be downloaded.
Tests still need something that behaves like them: the same on-disk layout, the same special-token strings, the
same chat template and the same "remote code" ``tokenizer_class`` / ``auto_map`` entries, so that the loader in
:mod:`mcq.models.minicpmv.tokenization` is exercised on realistic directories.

``write_tiny_tokenizer`` trains a BPE model with the ``tokenizers`` library on the built-in corpus below and writes it
in the layout of the requested MiniCPM-V version:

* ``"4.5"`` / ``"2.6"``: Qwen2-style byte-level BPE: ``vocab.json``, ``merges.txt``, ``tokenizer.json``,
  ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``.
* ``"4.0"``: Llama-style BPE with byte fallback (MiniCPM4 LLM): ``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``. No ``tokenizer.model``: writing a SentencePiece proto needs packages we do not use.

The output depends only on the arguments: the corpus is fixed, its order is fixed, and everything the trainer
returns is renumbered by rules below, so the same arguments give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mcq.errors import McqError

from .families import FAMILIES

__all__ = ["QWEN2_PRETOKENIZE_REGEX", "SUPPORTED_VERSIONS", "write_tiny_qwen_tokenizer", "write_tiny_tokenizer"]

SUPPORTED_VERSIONS = FAMILIES["minicpmv"]

# Training text. Plain English, Chinese, numbers, punctuation and code-like lines so that every kind of input a test
# feeds the tokenizer gets some multi-byte merges. The order of the entries is part of the output: do not sort it.
_CORPUS = (
    "The harbour was quiet before sunrise. A small boat carried three fishermen, two nets and a dog that barked at "
    "every seagull. When the fog lifted, the lighthouse keeper counted the boats and wrote the number in his book.",
    "A picture of a red bicycle leaning against a blue wall. The front wheel is turned to the left, and a basket "
    "full of oranges hangs from the handlebars. Shadows fall across the street in the late afternoon light.",
    "Describe the image in detail. What colour is the car? How many people are standing near the door? Answer "
    "with one word if you can, otherwise explain your reasoning step by step.",
    "Quantization maps floating point weights to a small set of integer levels. Each group of weights shares a "
    "scale and sometimes a zero point; the error depends on the group size and on the outliers inside each group.",
    "She opened the window, looked at the mountains and said: \"It will rain tomorrow, so we should leave early.\" "
    "Nobody believed her, but by noon the sky had turned grey and the first drops hit the glass.",
    "今天早上下了一场小雨，街道上的行人都撑着伞。我们在咖啡馆里坐了一个小时，聊了很多关于旅行的事情。",
    "这张图片里有一只白色的猫，它正躺在窗台上晒太阳。窗外是一棵高大的树，树上开满了黄色的花。",
    "请描述这幅图像的内容，并回答：图中一共有几个人？他们在做什么？如果看不清楚，请说明原因。",
    "模型量化可以减少显存占用，提高推理速度。但是量化误差会影响模型的准确率，所以需要仔细选择量化方法。",
    "北京、上海、广州和深圳是中国的大城市。春天的时候，公园里有很多人散步、放风筝、拍照片。",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 4096 65536 3.14159 2.71828 -17 +23 1e-5 0x1F 2025-06-30 "
    "12:45:07 98.6% $19.99 1,234,567",
    ", . ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ = + * & ^ % $ # @ ~ ` ... -- => -> != == <= >= && ||",
    "def scale_weights(weights, bits=4, group_size=128):\n    levels = 2 ** bits - 1\n    for start in range(0, "
    "len(weights), group_size):\n        group = weights[start:start + group_size]\n        lo, hi = min(group), "
    "max(group)\n        yield (hi - lo) / levels\n",
    'if __name__ == "__main__":\n    config = {"hidden_size": 4096, "num_layers": 36, "vocab_size": 151748}\n    '
    "print(json.dumps(config, indent=2))\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product\nreturn sum;",
    "<div class=\"caption\">A dog runs on the beach.</div>\n# Heading\n- item one\n- item two\n\n| col | value |\n",
    "User: What is in this photo?\nAssistant: A kitchen with a wooden table, four chairs and a bowl of apples.\n"
    "User: 这是什么地方？\nAssistant: 这是一个公园，里面有湖和小船。",
)

# Qwen2/Qwen3 added tokens in the order (and therefore relative ids) of the official MiniCPM-V 4.5 files, with the
# official "special" flag: the tool/fim tokens and <think> are plain added tokens there, everything else is special.
# 2.6 gets the same list: we have no official 2.6 files to check against, and extra unused tokens are harmless,
# whereas a missing one would break a test that a real 2.6 checkpoint passes.
_QWEN_RESERVED = tuple(f"<|reserved_{i}|>" for i in range(63))
_MULTIMODAL = (
    "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>",
    "<slice>", "</slice>", "<image_id>", "</image_id>", "<unit>", "</unit>",
)  # fmt: skip
_QWEN_ADDED: tuple[tuple[str, bool], ...] = (
    *((t, True) for t in (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    )),
    *((t, False) for t in (
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
        "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    )),
    *((t, True) for t in (*_MULTIMODAL, *_QWEN_RESERVED)),
)  # fmt: skip
# The official files list exactly these as additional_special_tokens (not im_start/im_end/endoftext).
_QWEN_ADDITIONAL_SPECIAL = ("<unk>", *_MULTIMODAL, *_QWEN_RESERVED)

# MiniCPM4 (4.0): SentencePiece-style control tokens first, then ChatML and the multimodal markers after the vocab.
_LLAMA_CONTROL = ("<unk>", "<s>", "</s>")
_LLAMA_ADDED = ("<|im_start|>", "<|im_end|>", *_MULTIMODAL)

# Qwen2's pre-tokenizer split pattern. transformers' Qwen2Tokenizer rebuilds its pipeline with its own copy of this
# pattern when it loads a directory (the tests check the two are equal); it is restated here so that building a tiny
# tokenizer needs only the light `tokenizers` package, not the multi-second transformers import.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_AUTO_MAP = {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]}
# Only the 4.5 value is taken from official files; nothing here depends on the other two.
_MODEL_MAX_LENGTH = {"2.6": 32768, "4.0": 32768, "4.5": 131072}

# Chat template of the official MiniCPM-V 4.5 tokenizer_config.json (the Qwen3 template), kept as data so the package
# does not read reference files at runtime. It appends "<think>\n\n</think>\n\n" to the generation prompt when
# enable_thinking is false and "<think>\n" when it is true.
_QWEN3_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided '
    'with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') "
    "and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n"
    "        {%- set ns.last_query_index = index %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {%- set content = message.content %}\n"
    "        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n"
    "        {%- else %}\n"
    "            {%- if '</think>' in message.content %}\n"
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n"
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}\n"
    "            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "            {%- endif %}\n"
    "        {%- else %}\n"
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    "        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n"
    "                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n"
    "                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n"
    "                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n"
    "            {%- endfor %}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "    {%- if enable_thinking is defined and enable_thinking is true %}\n"
    "        {{- '<think>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}"
)

# Plain ChatML, used for 2.6 (Qwen2) and 4.0 (MiniCPM4): no default system prompt and no thinking switch.
_CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def write_tiny_tokenizer(directory: str | Path, version: str, vocab_size: int = 1024) -> Path:
    """Write a tiny tokenizer for MiniCPM-V ``version`` into ``directory``, which is created if needed.

    ``vocab_size`` is the size of the base vocabulary (the BPE model, byte symbols or byte-fallback tokens included).
    The added special tokens follow it, so the full vocabulary is ``vocab_size + 105`` for 4.5 / 2.6 and
    ``vocab_size + 18`` for 4.0. Returns the directory.
    """
    if version not in SUPPORTED_VERSIONS:
        raise McqError(f"tiny tokenizer: unsupported MiniCPM-V version {version!r}; expected one of "
                       f"{', '.join(SUPPORTED_VERSIONS)}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = _qwen_files(version, vocab_size) if version in ("2.6", "4.5") else _llama_files(vocab_size)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8", newline="\n")
    return out


def write_tiny_qwen_tokenizer(directory: str | Path, version: str, config: dict, vocab_size: int = 1024) -> Path:
    """Write the Qwen-style tiny tokenizer (the vocabulary and added tokens of ``write_tiny_tokenizer``'s 4.5) for a
    release of another family, whose ``tokenizer_config.json`` differs by ``config``: its entries replace the
    resampler family's, and an entry set to None is left out (the remote-code ``auto_map`` of a native model)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in _qwen_files(version, vocab_size, config).items():
        (out / name).write_text(text, encoding="utf-8", newline="\n")
    return out


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _token_entry(content: str, special: bool | None = True) -> dict:
    # The field set transformers writes in added_tokens_decoder and special_tokens_map.json.
    entry = {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    if special is not None:
        entry["special"] = special
    return entry


def _train(tokenizer: Tokenizer, vocab_size: int, alphabet: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Train BPE on the corpus; return (alphabet symbols that the trainer kept, merges in rank order)."""
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer, length=len(_CORPUS))
    trained = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    merged = {a + b for a, b in merges}
    symbols = [token for token in trained["vocab"] if token not in merged]
    return symbols, merges


def _byte_symbols() -> list[str]:
    """The 256 byte-level symbols in the order GPT-2 and Qwen2 vocabularies give them ids (so id 0 is "!").

    Printable Latin-1 bytes stand for themselves and come first, in byte order. The others (controls, space, DEL,
    no-break space, soft hyphen) are shown as U+0100, U+0101, ... in byte order and come after them.
    """
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    shifted = 256 - len(printable)
    return [chr(b) for b in printable] + [chr(0x100 + i) for i in range(shifted)]


def _merged_tokens(merges: list[tuple[str, str]]) -> list[str]:
    # A BPE vocabulary lists each merge result in the order the merges were learned, as Qwen2's vocab.json does.
    return [a + b for a, b in merges]


def _qwen_files(version: str, vocab_size: int, overrides: dict | None = None) -> dict[str, str]:
    byte_symbols = _byte_symbols()
    # One base slot is kept for <unk>: the official vocabulary holds it inside the base range (id 128244, below the
    # first added token 151643) instead of in added_tokens.json, and we mirror that at the last base id.
    merges_wanted = vocab_size - len(byte_symbols) - 1
    if merges_wanted < 1:
        raise McqError(f"tiny tokenizer: vocab_size {vocab_size} is too small for version {version}; it must exceed "
                       f"{len(byte_symbols) + 1} (the byte symbols, <unk> and at least one merge)")

    def pipeline(model) -> Tokenizer:
        tok = Tokenizer(model)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        return tok

    _, merges = _train(pipeline(models.BPE()), len(byte_symbols) + merges_wanted, byte_symbols)
    if len(merges) != merges_wanted:
        raise McqError(f"tiny tokenizer: vocab_size {vocab_size} is too large for version {version}; the built-in "
                       f"corpus yields at most {len(byte_symbols) + len(merges) + 1} base tokens")
    regular = [*byte_symbols, *_merged_tokens(merges), "<unk>"]
    vocab = {token: i for i, token in enumerate(regular)}

    tok = pipeline(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added one at a time so that ids follow the official order exactly.
    tok.add_special_tokens([AddedToken("<unk>", normalized=False, special=True)])
    for content, special in _QWEN_ADDED:
        token = AddedToken(content, normalized=False, special=special)
        (tok.add_special_tokens if special else tok.add_tokens)([token])

    added_ids = {content: vocab_size + i for i, (content, _) in enumerate(_QWEN_ADDED)}
    decoder_entries = [(vocab["<unk>"], "<unk>", True)] + [(added_ids[c], c, s) for c, s in _QWEN_ADDED]
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): _token_entry(c, s) for i, c, s in decoder_entries},
        "additional_special_tokens": list(_QWEN_ADDITIONAL_SPECIAL),
        "bos_token": "<|im_start|>",
        "chat_template": _QWEN3_CHAT_TEMPLATE if version == "4.5" else _CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": _MODEL_MAX_LENGTH.get(version),
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "unk_token": "<unk>",
        "auto_map": _AUTO_MAP,
        "tokenizer_class": "MiniCPMVTokenizerFast",
    }
    # A release outside the resampler family has no entry in _MODEL_MAX_LENGTH and gives its own in `overrides`.
    config = {key: value for key, value in {**config, **(overrides or {})}.items() if value is not None}
    # Like the official special_tokens_map.json: no bos/unk entries there, only the additional list, eos and pad.
    special_map = {
        "additional_special_tokens": [_token_entry(t, None) for t in _QWEN_ADDITIONAL_SPECIAL],
        "eos_token": _token_entry("<|im_end|>", None),
        "pad_token": _token_entry("<|endoftext|>", None),
    }
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": merges_txt,
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": _dump(config),
        "special_tokens_map.json": _dump(special_map),
        "added_tokens.json": _dump(dict(sorted(added_ids.items()))),
    }


def _llama_files(vocab_size: int) -> dict[str, str]:
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    reserved = len(_LLAMA_CONTROL) + len(byte_tokens)

    def pre_tokenizer(split: bool) -> pre_tokenizers.Metaspace:
        # prepend_scheme "first" is what transformers' LlamaTokenizer rebuilds with (legacy=False): a "▁" is put in
        # front of the text only at the very start, not after every special token.
        return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=split)

    # Train on words (split=True) so merges never span a word boundary, like a SentencePiece model; encode with
    # split=False as the Llama class does.
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.pre_tokenizer = pre_tokenizer(split=True)
    wanted = max(vocab_size - reserved, 0)
    symbols, merges = _train(trainer_tok, wanted, [])
    symbols.sort()  # the trainer's alphabet order is not part of its contract; code point order is
    learned = [*symbols, *_merged_tokens(merges)]
    if len(learned) > wanted:
        raise McqError(f"tiny tokenizer: vocab_size {vocab_size} is too small for version 4.0; it needs at least "
                       f"{reserved + len(symbols)} (control, byte-fallback and corpus character tokens)")
    if len(learned) < wanted:
        raise McqError(f"tiny tokenizer: vocab_size {vocab_size} is too large for version 4.0; the built-in corpus "
                       f"yields at most {reserved + len(learned)} base tokens")
    vocab = {token: i for i, token in enumerate([*_LLAMA_CONTROL, *byte_tokens, *learned])}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizer(split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    # No BOS: the MiniCPM-V processor does not prepend one for versions after 2.5, and add_bos_token is false below.
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in _LLAMA_CONTROL])
    for content in _LLAMA_ADDED:
        tok.add_special_tokens([AddedToken(content, normalized=False, special=True)])

    added = [*_LLAMA_CONTROL, *_LLAMA_ADDED]
    ids = {**{t: vocab[t] for t in _LLAMA_CONTROL}, **{t: vocab_size + i for i, t in enumerate(_LLAMA_ADDED)}}
    config = {
        # MiniCPM4 is a Llama-layout model whose tokenizer would prepend <s>; MiniCPM-V (> 2.5) never feeds a BOS, so
        # the tokenizer must not add one either.
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {str(ids[t]): _token_entry(t) for t in added},
        "additional_special_tokens": list(_LLAMA_ADDED),
        "bos_token": "<s>",
        "chat_template": _CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": _MODEL_MAX_LENGTH["4.0"],
        "unk_token": "<unk>",
        "auto_map": _AUTO_MAP,
        "tokenizer_class": "MiniCPMVTokenizerFast",
    }
    special_map = {
        "additional_special_tokens": [_token_entry(t, None) for t in _LLAMA_ADDED],
        "bos_token": _token_entry("<s>", None),
        "eos_token": _token_entry("</s>", None),
        "unk_token": _token_entry("<unk>", None),
    }
    return {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": _dump(config),
        "special_tokens_map.json": _dump(special_map),
    }
