"""`mcq --help`, argument errors and `mcq recipes list` import nothing heavy; `import mcq` still registers MiniCPM-V
with transformers, whichever of the two is imported first. Each case runs in a fresh interpreter (this test
session has long imported everything). Time is measured in benchmarks/bench_startup.py, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "llmcompressor", "compressed_tensors", "onnx", "onnxruntime", "coremltools")

# The command as the `mcq` script runs it, then the heavy top-level modules it left in sys.modules.
RUN_CLI = """
import json, runpy, sys
sys.argv = ["mcq", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("mcq.cli", run_name="__main__")
except SystemExit as exit:
    code = exit.code or 0
print(json.dumps({"code": code, "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(%r))}))
""" % (HEAVY,)


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


@pytest.mark.parametrize(("args", "code"), [
    (["--help"], 0),
    (["--version"], 0),
    (["recipes", "list"], 0),
    (["recipes", "show", "awq-w4g128", "--json"], 0),
    (["export", "--format", "bogus"], 2),
    (["quantize", "--model", "tiny:4.5"], 2),                      # --out missing
    (["export", "--format", "onnx", "--model", "m", "--out", "o", "--seed", "1"], 2),
])
def test_light_commands_import_no_heavy_module(args, code):
    done = _python(RUN_CLI, *args)
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == {"code": code, "heavy": []}, done.stderr


REGISTERED = """
import sys
{first}
from transformers import AutoConfig, AutoModel
model = AutoModel.from_pretrained(sys.argv[1])
print(type(model).__module__, type(AutoConfig.from_pretrained(sys.argv[1])).__name__)
"""


@pytest.mark.parametrize("first", ["import mcq", "import transformers\nimport mcq"])
def test_import_mcq_registers_the_model_before_or_after_transformers(first, tiny45):
    # No trust_remote_code: the checkpoint's auto_map names remote code, which must not be needed.
    done = _python(REGISTERED.format(first=first), str(tiny45))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["mcq.models.minicpmv.modeling", "MiniCPMVConfig"]


def test_without_import_mcq_transformers_does_not_know_the_model(tiny45):
    """The control: the registration above is mcq's doing, not something transformers does on its own."""
    done = _python(REGISTERED.format(first=""), str(tiny45))
    assert done.returncode != 0 and "trust_remote_code" in done.stderr
