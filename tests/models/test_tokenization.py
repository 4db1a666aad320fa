"""Tokenizer loading without remote code, the MiniCPM-V special-token ids, and the tiny tokenizers tests build on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from transformers import LlamaTokenizer, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from mcq.errors import McqError
from mcq.models.minicpmv.tokenization import MiniCPMVSpecialTokens, load_tokenizer, special_token_ids
from mcq.models.minicpmv.versions import VERSIONS
from mcq.models.tiny_tokenizer import QWEN2_PRETOKENIZE_REGEX, SUPPORTED_VERSIONS, write_tiny_tokenizer

# The official MiniCPM-V 4.5 tokenizer files (tests/data/official/README.md).
REFERENCE = Path(__file__).resolve().parents[1] / "data" / "official" / "minicpm-v-4_5"

EXPECTED_FILES = {
    "4.5": {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json"},
    "4.0": {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"},
}
EXPECTED_FILES["2.6"] = EXPECTED_FILES["4.5"]
EXPECTED_CLASS = {"2.6": Qwen2Tokenizer, "4.0": LlamaTokenizer, "4.5": Qwen2Tokenizer}
ADDED_COUNT = {"2.6": 105, "4.0": 18, "4.5": 105}
MULTIMODAL = ["<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>",
              "<slice>", "</slice>", "<image_id>", "</image_id>", "<unit>", "</unit>"]
TEXTS = [
    "今天天气很好，我们去公园散步吧。",
    "图片中有一只猫。A cat sits on the mat.",
    "龘 鱻 🙂 — rare characters and an emoji",
    "double  spaces,  a trailing tab\t",
    "def f(x):\n    return x ** 2  # 平方\n",
    "12345 + 67890 = 80235",
]


@pytest.fixture(scope="module", params=SUPPORTED_VERSIONS)
def built(request, tmp_path_factory):
    """(version, directory, loaded tokenizer) for each version."""
    version = request.param
    directory = write_tiny_tokenizer(tmp_path_factory.mktemp(f"tok{version}"), version)
    return version, directory, load_tokenizer(directory, version)


def _copy(directory: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update(changes)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


# --- the tiny tokenizers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_build_is_deterministic_and_fast(tmp_path, version):
    start = time.perf_counter()
    first = write_tiny_tokenizer(tmp_path / "a", version)
    elapsed = time.perf_counter() - start
    second = write_tiny_tokenizer(tmp_path / "b", version)
    # Another process, with other hash seeds and thread counts: the trainer's internal maps must not leak out.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "RAYON_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from mcq.models.tiny_tokenizer import write_tiny_tokenizer as w; w(sys.argv[1], sys.argv[2])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c"), version], check=True, env=env)
    names = {p.name for p in first.iterdir()}
    assert names == EXPECTED_FILES[version]
    for other in (second, tmp_path / "c"):
        assert names == {p.name for p in other.iterdir()}
        for name in names:
            assert (first / name).read_bytes() == (other / name).read_bytes(), name
    assert elapsed < 2.0


def test_regex_is_the_one_transformers_rebuilds_with():
    assert QWEN2_PRETOKENIZE_REGEX == PRETOKENIZE_REGEX


def test_sizes_and_fixed_ids(built):
    version, _, tok = built
    assert tok.vocab_size == 1024
    assert len(tok) == 1024 + ADDED_COUNT[version]
    ids = special_token_ids(tok)
    if version == "4.0":
        assert (ids.unk_id, ids.bos_id, ids.eos_id, ids.pad_id) == (0, 1, 2, None)
        assert tok.convert_tokens_to_ids("<|im_start|>") == 1024
        assert ids.im_start_id == 1026
    else:
        # <unk> sits at the last base id (the official vocabulary also holds it inside the base range); the added
        # tokens follow in the official order, <|endoftext|> first.
        assert ids.unk_id == 1023
        assert (ids.pad_id, ids.bos_id, ids.eos_id) == (1024, 1025, 1026)
        assert ids.im_start_id == 1050
        assert ids.newline_id == 198  # same byte-symbol order as the real Qwen2 vocabulary


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_other_vocab_sizes(tmp_path, version):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "ok", version, vocab_size=640), version)
    assert tok.vocab_size == 640
    assert len(tok) == 640 + ADDED_COUNT[version]
    for size in (16, 100_000):
        with pytest.raises(McqError, match="vocab_size"):
            write_tiny_tokenizer(tmp_path / str(size), version, vocab_size=size)


def test_unknown_version_is_rejected(tmp_path):
    with pytest.raises(McqError, match="3.0"):
        write_tiny_tokenizer(tmp_path, "3.0")
    with pytest.raises(McqError, match="3.0"):
        load_tokenizer(tmp_path, "3.0")


# --- loading without remote code ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_loads_without_remote_code(tmp_path, version, monkeypatch, capfd):
    directory = write_tiny_tokenizer(tmp_path, version)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "MiniCPMVTokenizerFast"
    assert "AutoTokenizer" in config["auto_map"]

    def refuse(*args, **kwargs):
        raise AssertionError("remote code was requested")

    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "get_class_from_dynamic_module", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = load_tokenizer(directory, version)
    assert type(tok) is EXPECTED_CLASS[version]
    assert not any(name.startswith("tokenization_minicpmv") for name in sys.modules)
    noise = capfd.readouterr().err + "".join(str(w.message) for w in caught)
    assert "MiniCPMVTokenizerFast" not in noise and "trust_remote_code" not in noise
    assert tok.chat_template == config["chat_template"]


def test_no_bos_is_added(built):
    _, _, tok = built
    ids = special_token_ids(tok)
    with_specials = tok.encode("hello there", add_special_tokens=True)
    assert with_specials == tok.encode("hello there", add_special_tokens=False)
    assert ids.bos_id not in with_specials


@pytest.mark.parametrize("add_bos", [False, True])
def test_config_decides_bos_over_tokenizer_json(tmp_path, add_bos):
    # A Llama-style tokenizer.json usually prepends <s> in its post-processor; transformers then ignores the config's
    # add_bos_token. The loader re-applies the config, which is what MiniCPM-V's tokenizers rely on.
    directory = write_tiny_tokenizer(tmp_path, "4.0")
    backend = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    backend["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    (directory / "tokenizer.json").write_text(json.dumps(backend), encoding="utf-8")
    _edit_config(directory, add_bos_token=add_bos)
    ids = load_tokenizer(directory, "4.0").encode("hello")
    assert (ids[0] == 1) is add_bos


def test_vocab_and_merges_alone_give_the_same_tokenizer(tmp_path):
    full = write_tiny_tokenizer(tmp_path / "full", "4.5")
    partial = _copy(full, tmp_path)
    (partial / "tokenizer.json").unlink()
    a, b = load_tokenizer(full, "4.5"), load_tokenizer(partial, "4.5")
    assert len(a) == len(b)
    for text in [*TEXTS, "<image>" + "<unk>" * 3 + "</image>\n<think>x</think>"]:
        assert a.encode(text) == b.encode(text)
    assert special_token_ids(a) == special_token_ids(b)


def test_save_pretrained_round_trip(built, tmp_path):
    version, _, tok = built
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path, version)
    assert type(again) is type(tok)
    assert again.chat_template == tok.chat_template
    assert special_token_ids(again) == special_token_ids(tok)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)


def test_chat_template_file_takes_priority(tmp_path):
    directory = write_tiny_tokenizer(tmp_path, "2.6")
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    tok = load_tokenizer(directory, "2.6")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user]hi"


# --- special tokens -----------------------------------------------------------------------------------------------


def test_every_added_token_is_one_id(built):
    _, directory, tok = built
    decoder = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))["added_tokens_decoder"]
    assert decoder
    for index, entry in decoder.items():
        assert tok.encode(entry["content"], add_special_tokens=False) == [int(index)], entry["content"]
    for token in MULTIMODAL:
        assert token in {entry["content"] for entry in decoder.values()}


def test_special_token_ids(built):
    version, _, tok = built
    ids = special_token_ids(tok)
    assert isinstance(ids, MiniCPMVSpecialTokens)
    expected = {
        "im_start_id": "<image>", "im_end_id": "</image>", "slice_start_id": "<slice>", "slice_end_id": "</slice>",
        "im_id_start_id": "<image_id>", "im_id_end_id": "</image_id>", "unk_id": "<unk>",
    }
    for field_name, token in expected.items():
        assert getattr(ids, field_name) == tok.convert_tokens_to_ids(token), field_name
    assert len(set(expected)) == len({getattr(ids, f) for f in expected})
    assert ids.eos_id == tok.eos_token_id
    assert tok.decode([ids.newline_id]) == "\n"
    terminators = ids.terminator_ids(VERSIONS[version].terminators)
    assert terminators[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(set(terminators)) == 2
    with pytest.raises(McqError, match="<nope>"):
        ids.terminator_ids(["<|im_end|>", "<nope>"])


def test_missing_special_token_is_named():
    plain = Qwen2Tokenizer(vocab={"<|endoftext|>": 0, "a": 1}, merges=[])
    with pytest.raises(McqError, match="<image>"):
        special_token_ids(plain)


def test_image_placeholder_is_66_tokens(built):
    _, _, tok = built
    ids = special_token_ids(tok)
    encoded = tok.encode("<image>" + "<unk>" * 64 + "</image>", add_special_tokens=False)
    assert len(encoded) == 66
    assert encoded == [ids.im_start_id] + [ids.unk_id] * 64 + [ids.im_end_id]
    grid = "<slice>" + "<unk>" * 2 + "</slice>" + "\n" + "<slice>" + "<unk>" * 2 + "</slice>"
    assert tok.encode(grid, add_special_tokens=False) == (
        [ids.slice_start_id, ids.unk_id, ids.unk_id, ids.slice_end_id, ids.newline_id,
         ids.slice_start_id, ids.unk_id, ids.unk_id, ids.slice_end_id]
    )


def test_text_round_trips(built):
    _, _, tok = built
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


# --- chat templates -----------------------------------------------------------------------------------------------

HI = [{"role": "user", "content": "hi"}]


def test_qwen3_template_thinking_switch(tmp_path):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path, "4.5"), "4.5")
    off = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    on = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    unset = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    assert off == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on.endswith("<|im_start|>assistant\n<think>\n")
    assert unset.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(HI, add_generation_prompt=True, enable_thinking=False)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    thinking_off = tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert ids[-len(thinking_off):] == thinking_off


@pytest.mark.parametrize("version", ["2.6", "4.0"])
def test_chatml_template(tmp_path, version):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path, version), version)
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hello"}, *HI]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert text == ("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# --- the official 4.5 files ---------------------------------------------------------------------------------------


def test_tiny_4_5_mirrors_the_official_files(tmp_path):
    directory = write_tiny_tokenizer(tmp_path, "4.5")
    official = json.loads((REFERENCE / "tokenizer_config.json").read_text(encoding="utf-8"))
    tiny = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert list(tiny) == list(official)
    assert {k: v for k, v in tiny.items() if k != "added_tokens_decoder"} == {
        k: v for k, v in official.items() if k != "added_tokens_decoder"
    }
    assert list(tiny["added_tokens_decoder"].values()) == list(official["added_tokens_decoder"].values())
    official_ids = [int(i) for i in official["added_tokens_decoder"]][1:]  # after <unk>, which is in the base range
    tiny_ids = [int(i) for i in tiny["added_tokens_decoder"]][1:]
    assert [i - official_ids[0] for i in official_ids] == [i - tiny_ids[0] for i in tiny_ids]
    for name in ("special_tokens_map.json", "added_tokens.json"):
        a = json.loads((REFERENCE / name).read_text(encoding="utf-8"))
        b = json.loads((directory / name).read_text(encoding="utf-8"))
        assert (a if name != "added_tokens.json" else sorted(a)) == (b if name != "added_tokens.json" else sorted(b))
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    assert list(vocab)[:256] == list(bytes_to_unicode().values())


def test_official_config_on_a_tiny_vocabulary_is_rejected(tmp_path):
    # The official config places its added tokens at ids from 151643 up; a 1024-token vocabulary cannot honour that,
    # and loading must fail loudly rather than hand out different ids.
    directory = write_tiny_tokenizer(tmp_path, "4.5")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (directory / name).write_bytes((REFERENCE / name).read_bytes())
    with pytest.raises(McqError, match="tokenizer_config.json.*id 128244"):
        load_tokenizer(directory, "4.5")


def test_official_class_auto_map_and_template_are_accepted(tmp_path):
    official = json.loads((REFERENCE / "tokenizer_config.json").read_text(encoding="utf-8"))
    directory = write_tiny_tokenizer(tmp_path, "2.6")  # ChatML template, replaced by the official one below
    _edit_config(directory, **{k: official[k] for k in ("tokenizer_class", "auto_map", "chat_template")})
    tok = load_tokenizer(directory, "2.6")
    assert type(tok) is Qwen2Tokenizer
    assert tok.chat_template == official["chat_template"]
    text = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=False, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# --- errors -------------------------------------------------------------------------------------------------------


def _one_line_error(directory, version: str, match: str) -> None:
    with pytest.raises(McqError, match=match) as err:
        load_tokenizer(directory, version)
    assert "\n" not in str(err.value)
    assert str(directory) in str(err.value)


def test_missing_directory(tmp_path):
    _one_line_error(tmp_path / "nowhere", "4.5", "does not exist")


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_no_tokenizer_files(tmp_path, version):
    (tmp_path / "config.json").write_text("{}")
    _one_line_error(tmp_path, version, "no tokenizer files")


def test_vocab_without_merges(tmp_path):
    directory = write_tiny_tokenizer(tmp_path, "4.5")
    (directory / "tokenizer.json").unlink()
    (directory / "merges.txt").unlink()
    _one_line_error(directory, "4.5", "vocab.json but no merges.txt")


@pytest.mark.parametrize("name", ["tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"])
def test_unreadable_json(tmp_path, name):
    directory = write_tiny_tokenizer(tmp_path, "4.5")
    (directory / name).write_text('{"truncated": ', encoding="utf-8")
    _one_line_error(directory, "4.5", f"cannot read .*{name}")


def test_sentencepiece_model_that_cannot_be_read(tmp_path):
    # Without sentencepiece/protobuf the loader says so; with them, the conversion of this garbage fails. Either way
    # the user gets one McqError line naming the directory.
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a real model")
    with pytest.raises(McqError) as err:
        load_tokenizer(tmp_path, "4.0")
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
