"""The command line: the main commands on tiny models, and bad input → one line on stderr, exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from mcq.cli import main


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(path)
    return path


def test_inspect_json_flags_the_vision_fc2(capsys):
    assert main(["inspect", "tiny:4.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == "4.5"
    flagged = set(report["non_divisible"])
    assert flagged == {f"vpm.encoder.layers.{i}.mlp.fc2" for i in range(2)}
    fc2 = next(l for l in report["linears"] if l["name"] == "vpm.encoder.layers.0.mlp.fc2")
    assert fc2["group_sizes"] == [] and fc2["non_divisible"]
    assert set(report["components"]) == {"vision", "resampler", "llm"}
    assert report["total_parameters"] == sum(c["parameters"] for c in report["components"].values())
    assert report["total_bytes"] == 2 * report["total_parameters"]  # bf16
    assert {r["stored"] for r in report["stored_as"]} == {"resampler.attn.in_proj_weight",
                                                         "resampler.attn.in_proj_bias", "resampler.proj"}
    assert {"resampler.attn.q_proj", "resampler.proj"} <= {linear["name"] for linear in report["linears"]}


def test_inspect_text_marks_non_divisible(capsys):
    assert main(["inspect", "tiny:4.5"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if "mlp.fc2" in l)
    assert "NOT divisible by 32, 64, 128" in line


def test_chat_prints_a_deterministic_answer(image, capsys):
    assert main(["chat", "--model", "tiny:4.5", "--image", str(image), "--max-new-tokens", "6", "--json", "hi"]) == 0
    first = json.loads(capsys.readouterr().out)["answer"]
    assert main(["chat", "--model", "tiny:4.5", "--image", str(image), "--max-new-tokens", "6", "--json", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == first


def test_chat_frames_as_video(tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        Image.new("RGB", (448, 448), (i * 60, 0, 0)).save(frames / f"{i:03d}.png")
    assert main(["chat", "--model", "tiny:4.5", "--frames", str(frames), "--fps", "2", "--packing", "2",
                 "--max-new-tokens", "4", "what happens?"]) == 0
    assert main(["chat", "--model", "tiny:2.6", "--frames", str(frames), "what happens?"]) == 2
    assert "4.5" in capsys.readouterr().err


def test_make_tiny_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["make-tiny", str(out), "--version", "2.6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "2.6"
    assert main(["make-tiny", str(out), "--version", "2.6"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["make-tiny", str(out), "--version", "2.6", "--force"]) == 0


def _broken_copy(tiny45, tmp_path, name="m"):
    target = tmp_path / name
    shutil.copytree(tiny45, target)
    return target


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _write(file, text):
    file.write_text(text)


# case → (what breaks the copy; returns the model path to pass, or None for the copy itself; expected message)
CASES = {
    "missing path": (lambda p: p / "nope", "does not exist"),
    "no config": (lambda p: (p / "config.json").unlink(), "no config.json"),
    "bad json": (lambda p: _write(p / "config.json", "{oops"), "not valid JSON"),
    "other model_type": (lambda p: _edit_config(p, model_type="llava"), "supported: minicpmv"),
    "old version": (lambda p: _edit_config(p, version=2.5), "2.5 is not supported"),
    "missing shard": (lambda p: (p / "model-00002-of-00004.safetensors").unlink(), "is missing"),
    "truncated shard": (lambda p: _truncate(p / "model-00003-of-00004.safetensors"), "truncated"),
    "shape mismatch": (lambda p: _edit_config(p, intermediate_size=512), "shape mismatch"),
    "pickle only": (lambda p: _only_pickle(p), "pickle"),
}


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _only_pickle(path):
    for file in path.glob("model*.safetensors*"):
        file.unlink()
    (path / "pytorch_model.bin").write_bytes(b"not loaded")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint_is_one_line_exit_2(case, tiny45, tmp_path, capsys):
    breaker, message = CASES[case]
    copy = _broken_copy(tiny45, tmp_path)
    model = breaker(copy) or copy
    for argv in (["inspect", str(model)], ["chat", "--model", str(model), "hi"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mcq: error:") and len(err.splitlines()) == 1 and message in err, err
        assert "Traceback" not in err


@pytest.mark.parametrize("missing,message", [("tokenizer", "tokenizer"), ("preprocessor_config.json",
                                                                           "preprocessor_config.json")])
def test_missing_tokenizer_or_processor_config(missing, message, tiny45, tmp_path, capsys):
    model = _broken_copy(tiny45, tmp_path)
    doomed = [p for p in model.iterdir() if p.name.startswith(missing) or p.name in ("vocab.json", "merges.txt")] \
        if missing == "tokenizer" else [model / missing]
    for file in doomed:
        file.unlink()
    assert main(["chat", "--model", str(model), "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_bad_image_and_unknown_tiny(tmp_path, capsys):
    bogus = tmp_path / "x.png"
    bogus.write_text("not an image")
    assert main(["chat", "--model", "tiny:4.5", "--image", str(bogus), "hi"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["inspect", "tiny:3.0"]) == 2
    assert "no tiny model for version 3.0" in capsys.readouterr().err


def test_exit_code_and_debug_in_a_real_process(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mcq.cli", "inspect", str(tmp_path / "none")], capture_output=True,
                         text=True)
    assert run.returncode == 2 and run.stderr.strip() == f"mcq: error: model path {tmp_path / 'none'} does not exist"
    debug = subprocess.run([sys.executable, "-m", "mcq.cli", "--debug", "inspect", str(tmp_path / "none")],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_readme_main_job_commands_parse():
    """The README's first two lines are what a new user runs: every mcq command in them must still parse."""
    import shlex
    from pathlib import Path

    from mcq.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [part.strip() for line in block.splitlines() for part in line.split("&&")]
    mcq_commands = [shlex.split(c)[1:] for c in commands if c.startswith("mcq ")]
    assert [c[0] for c in mcq_commands] == ["quantize", "validate"]
    for argv in mcq_commands:
        build_parser().parse_args(argv)


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "gguf", "--block-size", "64"], "--block-size applies to --format onnx, not gguf"),
    (["--format", "coreml", "--block-size", "64"], "--block-size applies to --format onnx, not coreml"),
    (["--format", "onnx", "--seed", "1"], "--seed applies to --format gguf, not onnx"),
    (["--format", "coreml", "--seed", "0"], "--seed applies to --format gguf, not coreml"),
    (["--format", "onnx", "--precision", "fp16", "--block-size", "64"], "--block-size applies to int4 and int8"),
    (["--format", "onnx", "--block-size", "64"], "--block-size applies to int4 and int8"),    # fp32 by default
    (["--format", "onnx", "--precision", "int4", "--from", "{out}", "--block-size", "64"],
     "--block-size does not apply with --from"),
])
def test_an_export_option_that_does_not_apply_is_an_error(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["export", "--model", "tiny:4.5", "--out", str(out), *[a.format(out=tmp_path) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"mcq: error: {message}") and err.count("\n") == 1, err
    assert not out.exists()
