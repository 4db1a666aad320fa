"""A checkpoint with one NaN or infinity in a weight is refused by every command that reads weights: exit 2, one
line that names the tensor and its file, and nothing written (the staged output is removed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mcq.cli import main


def _poison(source: Path, out: Path, name: str, value: float) -> Path:
    """A copy of `source` whose stored tensor `name` holds `value` at one position; returns its shard."""
    shutil.copytree(source, out)
    shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(shard, "pt") as handle:
        tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[7] = value
    save_file(tensors, shard, metadata=metadata)
    return shard


@pytest.fixture(scope="module")
def nan_checkpoint(tiny45, tmp_path_factory):
    name = "llm.model.layers.0.self_attn.q_proj.weight"
    path = tmp_path_factory.mktemp("nan") / "model"
    return path, _poison(tiny45, path, name, float("nan")), name


def _refused(args: list[str], out: Path, capsys) -> str:
    code = main(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mcq:")]
    assert code == 2 and len(lines) == 1, lines
    assert not out.exists() and not any(out.parent.iterdir())  # no output, no staging directory left behind
    return lines[0]


@pytest.mark.parametrize("command", [
    ["quantize", "--method", "rtn"],
    ["quantize", "--method", "bnb-nf4"],
    ["export", "--format", "gguf"],
    ["export", "--format", "onnx"],
    ["export", "--format", "coreml"],
], ids=lambda command: "-".join(command[::2]) + "-" + command[-1])
def test_a_nan_weight_is_refused(nan_checkpoint, tmp_path, capsys, command):
    path, shard, name = nan_checkpoint
    out = tmp_path / "out"
    line = _refused([command[0], *command[1:], "--model", str(path), "--out", str(out)], out, capsys)
    assert f"{shard}: tensor {name} holds non-finite values (1 NaN)" in line


def test_an_infinite_weight_is_refused(tiny45, tmp_path, capsys):
    name = "vpm.encoder.layers.1.mlp.fc2.weight"
    shard = _poison(tiny45, tmp_path / "model", name, float("-inf"))
    (tmp_path / "outputs").mkdir()
    out = tmp_path / "outputs" / "out"
    line = _refused(["quantize", "--method", "rtn", "--model", str(tmp_path / "model"), "--out", str(out)], out, capsys)
    assert f"{shard}: tensor {name} holds non-finite values (1 infinite)" in line


def test_finite_weights_of_every_dtype_pass(tiny45):
    from mcq.models.loading import check_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_finite(torch.full((3, 5), 65000.0).to(dtype), "w", tiny45)  # large, still finite
    check_finite(torch.tensor([-128, 127], dtype=torch.int8), "levels", tiny45)  # integers are not checked
