"""Output directories: staging and atomic replacement, destination checks, manifest, model card, sizes."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest
import yaml
from safetensors import safe_open

import mcq.outputs as outputs
from mcq.errors import McqError
from mcq.models.loading import safetensors_component_bytes
from mcq.models.tiny import TinySpec, make_tiny
from mcq.outputs import (
    MANIFEST_NAME,
    check_output,
    directory_bytes,
    format_component_bytes,
    staged_output,
    write_manifest,
    write_model_card,
)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _existing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    return out


@pytest.mark.parametrize("interruption", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_removes_staging_and_writes_nothing(tmp_path, interruption):
    out = tmp_path / "out"
    with pytest.raises(type(interruption)):
        with staged_output(out, force=False) as staging:
            (staging / "half.bin").write_bytes(b"x" * 100)
            assert staging.parent == tmp_path and staging.name.startswith(".out.")
            raise interruption
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("interruption", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_with_force_keeps_the_existing_output(tmp_path, interruption):
    out = _existing(tmp_path)
    with pytest.raises(type(interruption)):
        with staged_output(out, force=True) as staging:
            (staging / "new.txt").write_text("new")
            raise interruption
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "old"


def test_existing_output_is_untouched_without_force(tmp_path):
    out = _existing(tmp_path)
    with pytest.raises(McqError, match="already exists.*--force"):
        with staged_output(out, force=False):
            pytest.fail("must not start writing")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_and_gives_normal_permissions(tmp_path):
    out = _existing(tmp_path)
    with staged_output(out, force=True) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "new.txt").write_text("new")
        (staging / "private.bin").write_bytes(b"1")
        (staging / "private.bin").chmod(0o600)  # what safetensors leaves behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing hidden left over
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["private.bin", "sub", "sub/new.txt"]
    umask = _umask()
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((out / "private.bin").stat().st_mode) == 0o666 & ~umask


def test_new_output_in_missing_parents(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with staged_output(out, force=False) as staging:
        (staging / "f").write_text("x")
    assert (out / "f").read_text() == "x"


def test_check_output_refuses_bad_destinations(tmp_path, monkeypatch):
    source = tmp_path / "model"
    source.mkdir()
    with pytest.raises(McqError, match="inside the source model"):
        check_output(source / "quantized", force=False, source=source)
    with pytest.raises(McqError, match="inside the source model"):
        check_output(source, force=True, source=source)
    with pytest.raises(McqError, match="source model .* is inside the output"):
        check_output(tmp_path, force=True, source=source)
    (tmp_path / "file").write_text("x")
    with pytest.raises(McqError, match="is not a directory"):
        check_output(tmp_path / "file", force=True)
    with pytest.raises(McqError, match="file is not a directory"):
        check_output(tmp_path / "file" / "out", force=False)
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)  # root may write anywhere: simulate
    with pytest.raises(McqError, match="not writable"):
        check_output(tmp_path / "elsewhere" / "out", force=False)


def test_make_tiny_interrupted_leaves_nothing(tmp_path, monkeypatch):
    import mcq.models.minicpmv.tiny as resampler_tiny

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(resampler_tiny.MiniCPMVImageProcessor, "save_pretrained", interrupted)  # the last write
    with pytest.raises(KeyboardInterrupt):
        make_tiny(tmp_path / "tiny", TinySpec())
    assert list(tmp_path.iterdir()) == []


def _fake_source(tmp_path):
    source = tmp_path / "MiniCPM-V-4_5"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "minicpmv"}')
    (source / "model.safetensors").write_bytes(os.urandom(3000))
    (source / ".gitattributes").write_text("*.safetensors filter=lfs")
    return source


def test_manifest_is_deterministic_and_hashes_every_file(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_HASH_CHUNK", 1000)  # several reads per file: the streaming path
    source = _fake_source(tmp_path)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(os.urandom(2500))
    (out / "sub" / "extra.txt").write_text("hello")
    recipe = {"method": "bitsandbytes", "rules": [{"match": "^llm\\.", "bits": 4}]}
    settings = {"seed": 0, "device": "cpu", "calibration": None}
    first = write_manifest(out, kind="bnb", source=source, recipe=recipe, settings=settings, extra={"b": 1, "a": 2})
    text = (out / MANIFEST_NAME).read_text()
    second = write_manifest(out, kind="bnb", source=source, recipe=recipe, settings=settings, extra={"b": 1, "a": 2})
    assert (out / MANIFEST_NAME).read_text() == text and first == second
    assert text.endswith("}\n") and str(tmp_path) not in text
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert first["outputs"] == {"model.safetensors": digest(out / "model.safetensors"),
                                "sub/extra.txt": digest(out / "sub" / "extra.txt")}
    assert first["source"] == {"name": "MiniCPM-V-4_5",
                               "files": {"config.json": digest(source / "config.json"),
                                         "model.safetensors": digest(source / "model.safetensors")}}
    assert first["recipe"] == recipe and first["settings"] == settings and first["kind"] == "bnb"
    assert {"python", "torch", "transformers", "safetensors", "tokenizers"} <= set(first["tools"])
    assert first["mcq_version"] == outputs.__version__


def test_model_card_front_matter_is_hub_yaml(tmp_path):
    source = _fake_source(tmp_path)
    (source / "README.md").write_text("---\nlicense: other\nlicense_name: minicpm-model-license\n"
                                      "license_link: https://example.org/LICENSE\npipeline_tag: x\n---\n# original\n")
    out = tmp_path / "out"
    out.mkdir()
    sections = [("How to load", "```python\nimport mcq\n```"), ("Recipe: nf4\nkept", "- lm_head kept")]
    write_model_card(out, title="MiniCPM-V 4.5: nf4 #1", base_model="openbmb/MiniCPM-V-4_5",
                     variant={"method": "bitsandbytes", "format": "nf4", "bits": 4}, sections=sections, source=source)
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front_text, body = text[4:].split("\n---\n", 1)
    front = yaml.safe_load(front_text)
    assert front == {
        "base_model": "openbmb/MiniCPM-V-4_5", "base_model_relation": "quantized", "library_name": "transformers",
        "pipeline_tag": "image-text-to-text", "tags": ["minicpm-v", "mcq", "bitsandbytes", "nf4", "4-bit"],
        "license": "other", "license_name": "minicpm-model-license", "license_link": "https://example.org/LICENSE",
    }
    assert body.lstrip().startswith("# MiniCPM-V 4.5: nf4 #1\n")
    assert "## How to load\n\n```python\nimport mcq\n```\n" in body
    assert "## Recipe: nf4 kept\n\n- lm_head kept\n" in body  # a heading stays one line
    write_model_card(out, title="MiniCPM-V 4.5: nf4 #1", base_model="openbmb/MiniCPM-V-4_5",
                     variant={"method": "bitsandbytes", "format": "nf4", "bits": 4}, sections=sections, source=source)
    assert (out / "README.md").read_text() == text

    (source / "README.md").write_text("# no front matter\n")
    write_model_card(out, title="t", base_model="b", variant={"method": "rtn"}, sections=[])
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert "license" not in front and front["tags"] == ["minicpm-v", "mcq", "rtn"]


def test_sizes_from_headers_and_files(tiny45):
    per_component = safetensors_component_bytes(tiny45)
    assert set(per_component) == {"vision", "resampler", "llm"}
    expected = dict.fromkeys(per_component, 0)
    for shard in tiny45.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                component = {"vpm": "vision", "resampler": "resampler", "llm": "llm"}[name.split(".")[0]]
                expected[component] += tensor.numel() * tensor.element_size()
    assert per_component == expected
    assert directory_bytes(tiny45) == sum(p.stat().st_size for p in tiny45.iterdir())
    table = format_component_bytes(per_component, {k: v // 2 for k, v in per_component.items()})
    assert table.splitlines()[-1].endswith("| 0.500 |") and len(table.splitlines()) == 6


def test_dot_output_is_staged_beside_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    with staged_output(".", force=True) as staging:
        assert staging.parent == tmp_path
        (staging / "f").write_text("x")
    assert [p.name for p in out.iterdir()] == ["f"]
