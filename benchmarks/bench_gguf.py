"""Time and peak memory of `mcq export --format gguf` beside llama.cpp's own MiniCPM-V conversion, and whether the two
F16 outputs hold the same tensors.

    python benchmarks/bench_gguf.py [--version 4.5|4.6] [--llm-layers N] [--vision-layers M] [--repeats 1]
                                    [--threads N] [--llama-src DIR] [--cache-dir DIR] [--contention TEXT]
                                    [--out results.json] [--workdir DIR] [--keep] [--tiny-widths]

JSON goes to stdout (and to --out), progress to stderr.

MiniCPM-V 4.6 (`--version 4.6`): `mcq make-tiny CKPT --version 4.6 --real-widths` (the release's widths: vision
1152 / 4304, LLM 1024 / 3584; layers default to make-tiny's 4 LLM + 3 vision), and llama.cpp's path is the one
docs/multimodal/minicpmv4.6.md gives, `convert_hf_to_gguf.py` twice on the checkpoint itself (no copy, no legacy
scripts: MiniCPMV4_6ForConditionalGeneration is native in transformers and in the converter):
    1. `convert_hf_to_gguf.py CKPT --outtype f16 --outfile OUT/llm-f16.gguf [--no-mtp]`;
    2. `convert_hf_to_gguf.py CKPT --outtype f16 --mmproj --outfile OUT/mmproj-f16.gguf`.
Workarounds 4, 5 and 6 below apply to both; and one more:
7. `--no-mtp` for the LLM when config.json's text_config has no `mtp_num_hidden_layers`: the converter's Qwen3.5
   class extends the layer count by the multi-token-prediction layers it finds and asserts it found some, which a
   checkpoint without them (the tiny one: transformers' class has no MTP head) fails; `--no-mtp` converts the same
   tensors without that step. (The --mmproj run refuses the flag and does not need it.) mcq writes no MTP layers.

What is built (in a temp dir, removed at the end unless --keep / --workdir): `mcq make-tiny CKPT --version 4.5
--real-widths --llm-layers N --vision-layers M --force`, a MiniCPM-V 4.5 checkpoint in the official on-disk layout
with the true widths (LLM 4096 / 12288, 32 + 8 heads of 128; vision 1152 / 4304; resampler 64 queries x 4096),
random bf16 weights and a small vocabulary (--tiny-widths: mcq's tiny widths, a quick smoke test of this script).

The two paths, each step its own child process:
- `mcq`: `mcq export --format gguf --model CKPT --out DIR --quant F16 --force` (one process, `python -m mcq.cli`).
- `llamacpp`: the conversion llama.cpp documents for MiniCPM-V 4.5 (docs/multimodal/minicpmv4.5.md), with the
  scripts shipped in the llama-cpp-python 0.3.36 source package (`vendor/llama.cpp`, gguf-py 0.19.0 from the same
  tree), on a copy of the checkpoint, because the surgery step writes into its model folder:
    1. `tools/mtmd/legacy-models/minicpmv-surgery.py -m COPY` (loads the whole model with `AutoModel`, saves the
       resampler and the vision tower as float32 torch files and the LLM as a plain Qwen3 folder `COPY/model`);
    2. `tools/mtmd/legacy-models/minicpmv-convert-image-encoder-to-gguf.py -m COPY --minicpmv-projector
       COPY/minicpmv.projector --output-dir OUT --minicpmv_version 6` (→ `OUT/mmproj-model-f16.gguf`);
    3. `convert_hf_to_gguf.py COPY/model --outtype f16 --outfile OUT/llm-f16.gguf`.
  The path's time is the sum of its three steps, its peak RSS the largest of the three (they run one after the
  other). Copying the checkpoint and the workarounds' file edits are not timed (`copy_seconds` is reported).

Workarounds the llama.cpp scripts need here (each is the least change that lets the script run as shipped):
1. `config.json` of the copy loses `auto_map`: the checkpoint has no remote-code files, and `import mcq` registers
   mcq's native MiniCPM-V class with transformers' Auto classes, which `AutoModel.from_pretrained(...,
   trust_remote_code=True)` then uses. Each legacy script that needs it runs in a child that first does
   `import mcq` and then runs the script with `runpy.run_path` (`--child surgery`).
2. `tokenizer_config.json` of the copy loses `auto_map` and its `tokenizer_class` becomes `Qwen2Tokenizer`: the
   surgery's `AutoTokenizer.from_pretrained(COPY, trust_remote_code=True)` would otherwise import
   `tokenization_minicpmv_fast.py`, which is not there (mcq loads the same files with the stock Qwen2 class).
3. The surgery child makes the loaded model's `state_dict()` return the official stored layout
   (`mcq.models.minicpmv.checkpoint_names.to_stored`: `resampler.attn.in_proj_weight/bias` packed, `resampler.proj`
   the bare `x @ proj` matrix), i.e. what the official remote-code model's state_dict holds and what the legacy
   converter's renaming expects. mcq's native resampler keeps q/k/v and `proj` as Linears; without this the legacy
   converter writes `resampler.proj.weight.weight` (transposed once more: the wrong orientation) and
   `resampler.pos_embed_k.weight` (F16), names clip.cpp does not load.
4. `convert_hf_to_gguf.py` imports `sentencepiece` even for a BPE tokenizer (Qwen2Model.set_vocab tries the
   SentencePiece path first). When the interpreter lacks it, it is installed with `pip install --no-deps --target
   CACHE/pydeps sentencepiece`, and that folder is put on PYTHONPATH for the llama.cpp steps only, so the shared
   environment (and torch) is left alone.
5. `convert_hf_to_gguf.py` stops on a pre-tokenizer hash it does not know ("BPE pre-tokenizer was not recognized")
   and has no flag to override it (MiniCPM-V's tokenizers are not in its table; the tiny vocabulary even less).
   The convert child (`--child convert`) wraps `TextModel.get_vocab_base_pre`: when the original raises
   NotImplementedError it returns "qwen2" (the Qwen-based releases' pre-tokenizer, what mcq writes); each run's
   `pre_tokenizer_override_used` says whether it was needed.
6. stdin is /dev/null for every step, so a `trust_remote_code` prompt would fail instead of waiting.
The image-encoder script runs with the vendored gguf-py first on sys.path (`--child encoder`), as
`convert_hf_to_gguf.py` arranges for itself; it needs neither mcq nor any workaround.

llama.cpp's scripts come from `pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:` into
--cache-dir (default ~/.cache/mcq-bench), extracted there once; --llama-src uses an extracted tree instead.

How peak memory is measured (as in bench_quantize.py): the parent starts each step with `subprocess.Popen` and
reaps it with `os.wait4(pid)`, whose rusage is that child's own `ru_maxrss` (the kernel's exact high-water mark of
resident memory). The parent never imports torch or numpy before the measured runs, so no child starts from a large
inherited high-water mark (`driver_peak_rss_mib`). A poller reads /proc/PID/status every 0.2 s for the anonymous /
file-backed split of the peak (approximate). RSS includes resident pages of memory-mapped files (safetensors are
read through mmap). Each run also records the 1-minute load average before and after it: the machine may be
shared (`--contention` stores a note about what else was running).

Then the two F16 outputs are compared tensor by tensor with gguf-py's `GGUFReader`, per file (LLM, mmproj): names
(llama.cpp's legacy mmproj names the vision MLP's fc1 `ffn_down` and fc2 `ffn_up`; a block whose `ffn_down.weight`
has ne[0] == `clip.vision.embedding_length`, the test clip.cpp uses, has its `ffn_up`/`ffn_down` names swapped back
before comparing), GGML types, shapes (ggml order) and the data bytes. `resampler.pos_embed_k` (a computed table
that clip.cpp requires but never reads: the graph recomputes its sin-cos at run time) is left out of the equality
count; its max |difference| is reported on its own. A tensor that differs gets its types, shapes and, when both are
float types of the same shape, the max |difference| and the number of differing elements. Metadata keys that
differ are listed too (informational: the files' descriptions and names differ by design).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from measure import emit, log, mib, proc_status

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "0.3.36"
EXCLUDED = ("resampler.pos_embed_k",)   # computed, required by clip.cpp's loader, never read by its graph


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# ------------------------------------------------------------------------------------------------------------------
# parent: orchestration only (no torch / numpy before the measured runs)
# ------------------------------------------------------------------------------------------------------------------
def run_measured(label: str, command: list[str], workdir: Path, env_extra: dict | None = None) -> dict:
    """Run `command` as its own process (stdin /dev/null, output to a log); wall time, peak RSS, CPU time."""
    log_path = workdir / "logs" / f"{label}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env_extra or {})}
    log(f"{label}: started (log {log_path})")
    peaks = {"RssAnon": 0, "RssFile": 0}
    load_before = os.getloadavg()[0]
    with open(log_path, "w") as log_file:
        log_file.write("$ " + " ".join(command) + "\n")
        log_file.flush()
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env=env, cwd=workdir)
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.2):
                status = proc_status(proc.pid)
                for key in peaks:
                    peaks[key] = max(peaks[key], status.get(key, 0))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, wait_status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        poller.join()
        proc.returncode = os.waitstatus_to_exitcode(wait_status)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{label} failed with exit code {proc.returncode}; end of {log_path}:\n{tail}")
    result = {
        "wall_seconds": round(seconds, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),          # Linux: KiB
        "polled_peak_rss_anon_mib": mib(peaks["RssAnon"]),
        "polled_peak_rss_file_mib": mib(peaks["RssFile"]),
        "user_cpu_seconds": round(usage.ru_utime, 1),
        "system_cpu_seconds": round(usage.ru_stime, 1),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
    }
    log(f"{label}: {result['wall_seconds']} s, peak RSS {result['peak_rss_mib']} MiB")
    return result


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, stdin=subprocess.DEVNULL,
                   stdout=sys.stderr, stderr=sys.stderr)


def llama_source(explicit: Path | None, cache: Path) -> Path:
    """The extracted llama-cpp-python sdist (its `vendor/llama.cpp` holds the conversion scripts)."""
    if explicit is not None:
        root = explicit
    else:
        root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
        if not (root / "vendor" / "llama.cpp").is_dir():
            download = cache / "download"
            download.mkdir(parents=True, exist_ok=True)
            log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source package into {download}")
            _pip("download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps", "--no-binary", ":all:",
                 "-d", str(download))
            archive = next(download.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
            with tarfile.open(archive) as tar:
                tar.extractall(cache, filter="data")
    if not (root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"{root} is not an extracted llama-cpp-python source package (no vendor/llama.cpp)")
    return root


def extra_python_path(cache: Path) -> tuple[str | None, dict]:
    """A folder with what llama.cpp's converter imports and this interpreter lacks (sentencepiece), or None."""
    probe = "import sentencepiece, sys; print(sentencepiece.__version__)"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if found.returncode == 0:
        return None, {"sentencepiece": found.stdout.strip() + " (already installed)"}
    target = cache / "pydeps"
    env = {**os.environ, "PYTHONPATH": str(target)}
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    if found.returncode != 0:
        log(f"installing sentencepiece into {target} (for llama.cpp's converter only)")
        _pip("install", "--no-deps", "--target", str(target), "sentencepiece")
        found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return str(target), {"sentencepiece": found.stdout.strip() + f" (pip --target {target})"}


def prepare_copy(checkpoint: Path, copy: Path) -> list[str]:
    """The checkpoint copy the legacy scripts edit in place, with workarounds 1 and 2 applied."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(checkpoint, copy)
    edits = []
    config_path = copy / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("auto_map", None) is not None:
        edits.append("config.json: auto_map removed")
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    tokenizer_path = copy / "tokenizer_config.json"
    tokenizer = json.loads(tokenizer_path.read_text())
    if tokenizer.pop("auto_map", None) is not None:
        edits.append("tokenizer_config.json: auto_map removed")
    if tokenizer.get("tokenizer_class") != "Qwen2Tokenizer":
        edits.append(f"tokenizer_config.json: tokenizer_class {tokenizer.get('tokenizer_class')} -> Qwen2Tokenizer")
        tokenizer["tokenizer_class"] = "Qwen2Tokenizer"
    tokenizer_path.write_text(json.dumps(tokenizer, indent=2) + "\n")
    return edits


def _child(kind: str, script: Path, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(script), *args]


def run_llamacpp(checkpoint: Path, llama: Path, work: Path, label: str, pythonpath: str | None,
                 threads_env: dict) -> dict:
    copy, out = work / "checkpoint-copy", work / "out"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    edits = prepare_copy(checkpoint, copy)
    copy_seconds = time.perf_counter() - started
    legacy = llama / "tools" / "mtmd" / "legacy-models"
    env = dict(threads_env)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p)
    steps = {
        "surgery": run_measured(f"{label}-surgery", _child("surgery", legacy / "minicpmv-surgery.py",
                                                            "-m", str(copy)), work, env),
        "image_encoder": run_measured(f"{label}-image-encoder", _child(
            "encoder", legacy / "minicpmv-convert-image-encoder-to-gguf.py", "-m", str(copy),
            "--minicpmv-projector", str(copy / "minicpmv.projector"), "--output-dir", str(out),
            "--minicpmv_version", "6"), work, env),
        "convert_hf_to_gguf": run_measured(f"{label}-convert-hf", _child(
            "convert", llama / "convert_hf_to_gguf.py", str(copy / "model"), "--outtype", "f16",
            "--outfile", str(out / "llm-f16.gguf")), work, env),
    }
    convert_log = (work / "logs" / f"{label}-convert-hf.log").read_text(errors="replace")
    return {
        **_path_totals(steps),
        "copy_seconds_untimed": round(copy_seconds, 1),
        "copy_edits": edits,
        "pre_tokenizer_override_used": "[bench-workaround] tokenizer.ggml.pre" in convert_log,
        "files": {"llm": str(out / "llm-f16.gguf"), "mmproj": str(out / "mmproj-model-f16.gguf")},
    }


def _path_totals(steps: dict[str, dict]) -> dict:
    """A path's time and peak over its steps (run one after the other: times add up, the peak is the largest)."""
    return {"wall_seconds": round(sum(s["wall_seconds"] for s in steps.values()), 2),
            "peak_rss_mib": max(s["peak_rss_mib"] for s in steps.values()),
            "user_cpu_seconds": round(sum(s["user_cpu_seconds"] for s in steps.values()), 1),
            "system_cpu_seconds": round(sum(s["system_cpu_seconds"] for s in steps.values()), 1),
            "steps": steps}


def run_llamacpp_native(checkpoint: Path, llama: Path, work: Path, label: str, pythonpath: str | None,
                        threads_env: dict) -> dict:
    """MiniCPM-V 4.6: llama.cpp's converter on the checkpoint itself, once for the LLM, once for the mmproj."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(threads_env)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p)
    text_config = json.loads((checkpoint / "config.json").read_text()).get("text_config", {})
    no_mtp = [] if text_config.get("mtp_num_hidden_layers") else ["--no-mtp"]   # workaround 7
    converter = llama / "convert_hf_to_gguf.py"
    steps = {
        "convert_llm": run_measured(f"{label}-convert-llm", _child(
            "convert", converter, str(checkpoint), "--outtype", "f16", "--outfile", str(out / "llm-f16.gguf"),
            *no_mtp), work, env),
        "convert_mmproj": run_measured(f"{label}-convert-mmproj", _child(
            "convert", converter, str(checkpoint), "--outtype", "f16", "--mmproj",
            "--outfile", str(out / "mmproj-f16.gguf")), work, env),
    }
    convert_log = (work / "logs" / f"{label}-convert-llm.log").read_text(errors="replace")
    return {
        **_path_totals(steps),
        "no_mtp_flag_used": bool(no_mtp),
        "pre_tokenizer_override_used": "[bench-workaround] tokenizer.ggml.pre" in convert_log,
        "files": {"llm": str(out / "llm-f16.gguf"), "mmproj": str(out / "mmproj-f16.gguf")},
    }


# llama.cpp's conversion per release: the legacy scripts (4.5) or its converter alone (4.6).
LLAMACPP_PATHS = {"4.5": run_llamacpp, "4.6": run_llamacpp_native}
REAL_WIDTHS = {"4.5": "LLM 4096/12288, vision 1152/4304", "4.6": "LLM 1024/3584, vision 1152/4304"}


def run_mcq(checkpoint: Path, work: Path, label: str, threads_env: dict) -> dict:
    out = work / "out"
    result = run_measured(label, [sys.executable, "-m", "mcq.cli", "export", "--format", "gguf", "--model",
                                  str(checkpoint), "--out", str(out), "--quant", "F16", "--force"], work, threads_env)
    mmproj = sorted(out.glob("mmproj-*.gguf"))
    llm = sorted(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-"))
    if len(mmproj) != 1 or len(llm) != 1:
        raise RuntimeError(f"{out}: expected one LLM and one mmproj GGUF, found {[p.name for p in out.iterdir()]}")
    result["files"] = {"llm": str(llm[0]), "mmproj": str(mmproj[0])}
    return result


# ------------------------------------------------------------------------------------------------------------------
# comparison (after the measured runs)
# ------------------------------------------------------------------------------------------------------------------
def _short(value, limit: int = 120):
    text = json.dumps(value, default=str)
    if len(text) <= limit:
        return value
    if isinstance(value, list):
        return f"[{len(value)} items]"
    return text[:limit] + "..."


def compare_metadata(mcq_reader, llama_reader) -> dict:
    ours = {k: f.contents() for k, f in mcq_reader.fields.items() if not k.startswith("GGUF.")}
    theirs = {k: f.contents() for k, f in llama_reader.fields.items() if not k.startswith("GGUF.")}
    different = {}
    for key in sorted(set(ours) & set(theirs)):
        a, b = ours[key], theirs[key]
        if a == b:
            continue
        entry = {"mcq": _short(a), "llamacpp": _short(b)}
        if isinstance(a, list) and isinstance(b, list):
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            entry.update({"lengths": [len(a), len(b)], "first_difference_at": first,
                          "at_first_difference": {"mcq": _short(a[first] if first < len(a) else None),
                                                  "llamacpp": _short(b[first] if first < len(b) else None)}})
        different[key] = entry
    return {"only_mcq": {k: _short(ours[k]) for k in sorted(set(ours) - set(theirs))},
            "only_llamacpp": {k: _short(theirs[k]) for k in sorted(set(theirs) - set(ours))},
            "different": different}


def _legacy_ffn_names(reader) -> tuple[dict[str, str], list[int]]:
    """llama.cpp legacy mmproj name → mcq name, for the blocks whose fc1/fc2 carry swapped names."""
    field = reader.fields.get("clip.vision.embedding_length")
    if field is None:
        return {}, []
    n_embd = int(field.contents())
    tensors = {t.name: t for t in reader.tensors}
    renames, swapped = {}, []
    block = 0
    while f"v.blk.{block}.ffn_down.weight" in tensors:
        down, up = tensors[f"v.blk.{block}.ffn_down.weight"], tensors.get(f"v.blk.{block}.ffn_up.weight")
        # clip.cpp's test: a `ffn_down` whose rows are n_embd long takes n_embd inputs, so it is fc1 (up).
        if int(down.shape[0]) == n_embd and up is not None and int(up.shape[0]) != n_embd:
            for part in ("weight", "bias"):
                renames[f"v.blk.{block}.ffn_down.{part}"] = f"v.blk.{block}.ffn_up.{part}"
                renames[f"v.blk.{block}.ffn_up.{part}"] = f"v.blk.{block}.ffn_down.{part}"
            swapped.append(block)
        block += 1
    return renames, swapped


def _float_values(tensor):
    import numpy as np
    from gguf import GGMLQuantizationType as T

    if tensor.tensor_type in (T.F32, T.F16, T.F64):
        return np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if tensor.tensor_type == T.BF16:
        return (np.asarray(tensor.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(-1)
    return None


def compare_files(mcq_path: str, llama_path: str) -> dict:
    import numpy as np
    from gguf import GGUFReader

    ours, theirs = GGUFReader(mcq_path), GGUFReader(llama_path)
    renames, swapped = _legacy_ffn_names(theirs)
    mine = {t.name: t for t in ours.tensors}
    other = {renames.get(t.name, t.name): t for t in theirs.tensors}
    equal, different, excluded = [], [], {}
    for name in sorted(set(mine) & set(other)):
        a, b = mine[name], other[name]
        same_type = a.tensor_type == b.tensor_type
        shape_a, shape_b = [int(x) for x in a.shape], [int(x) for x in b.shape]
        entry: dict = {"name": name}
        if b.name != name:
            entry["llamacpp_name"] = b.name
        bytes_equal = same_type and shape_a == shape_b and a.n_bytes == b.n_bytes and np.array_equal(
            np.asarray(a.data).reshape(-1).view(np.uint8), np.asarray(b.data).reshape(-1).view(np.uint8))
        if not bytes_equal or name in EXCLUDED:
            entry.update({"types": {"mcq": a.tensor_type.name, "llamacpp": b.tensor_type.name},
                          "shapes": {"mcq": shape_a, "llamacpp": shape_b}, "bytes_equal": bool(bytes_equal)})
            va, vb = _float_values(a), _float_values(b)
            if va is not None and vb is not None and va.size == vb.size:
                diff = np.abs(va.astype(np.float64) - vb.astype(np.float64))
                entry.update({"max_abs_diff": float(diff.max()) if diff.size else 0.0,
                              "differing_elements": int(np.count_nonzero(diff)), "elements": int(diff.size),
                              "max_abs_value": float(max(np.abs(va).max(), np.abs(vb).max())) if va.size else 0.0})
        if name in EXCLUDED:
            excluded[name] = entry
        elif bytes_equal:
            equal.append(name)
        else:
            different.append(entry)
    return {
        "mcq_file": mcq_path, "llamacpp_file": llama_path,
        "tensors": {"mcq": len(mine), "llamacpp": len(other)},
        "compared": len(equal) + len(different), "equal": len(equal), "different": different,
        "only_mcq": sorted(set(mine) - set(other)), "only_llamacpp": sorted(set(other) - set(mine)),
        "excluded": excluded,
        "legacy_ffn_swapped_blocks": swapped,
        "metadata": compare_metadata(ours, theirs),
    }


# ------------------------------------------------------------------------------------------------------------------
# children: the legacy llama.cpp scripts, run with runpy after the workarounds that apply to them
# ------------------------------------------------------------------------------------------------------------------
def _vendored_gguf(script: Path) -> Path:
    for parent in script.parents:
        if (parent / "gguf-py" / "gguf").is_dir():
            return parent / "gguf-py"
    raise SystemExit(f"no vendored gguf-py above {script}")


def child_main(kind: str, script: Path, args: list[str]) -> None:
    import runpy

    sys.argv = [str(script), *args]
    if kind == "surgery":
        # Workarounds 1 + 3: mcq's registered class instead of remote code, with the official state_dict layout.
        import transformers

        import mcq  # noqa: F401  (registers MiniCPMV with transformers' Auto classes)
        from mcq.models.minicpmv.checkpoint_names import to_stored

        original = transformers.AutoModel.from_pretrained.__func__

        def from_pretrained(cls, *a, **k):
            model = original(cls, *a, **k)
            module_state_dict = model.state_dict
            model.state_dict = lambda *sa, **sk: to_stored(module_state_dict(*sa, **sk))
            return model

        transformers.AutoModel.from_pretrained = classmethod(from_pretrained)
    elif kind == "encoder":
        sys.path.insert(0, str(_vendored_gguf(script)))
    elif kind == "convert":
        # What the script arranges for itself (its folder for `conversion`, gguf-py), before importing
        # conversion.base here to apply workaround 5.
        sys.path[0:0] = [str(script.parent), str(_vendored_gguf(script))]
        from conversion import base

        original = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                print("[bench-workaround] tokenizer.ggml.pre: unknown pre-tokenizer hash, using 'qwen2'",
                      file=sys.stderr, flush=True)
                return "qwen2"

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    runpy.run_path(str(script), run_name="__main__")


# ------------------------------------------------------------------------------------------------------------------
def _versions(pythonpath: str | None) -> dict:
    probe = ("import json, gguf, mcq, numpy, torch, transformers; print(json.dumps({'mcq': mcq.__version__, "
             "'torch': torch.__version__, 'transformers': transformers.__version__, 'numpy': numpy.__version__, "
             "'gguf_installed (GGUFReader, mcq)': __import__('importlib.metadata').metadata.version('gguf')}))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    return json.loads(found.stdout) if found.returncode == 0 else {"error": found.stderr[-500:]}


def _mcq_source() -> dict:
    """The mcq code that was measured: git HEAD, whether the tree differs from it, and a digest of the exporter's
    sources as they were at run time (the working tree may hold uncommitted changes)."""
    import hashlib

    digest = hashlib.sha256()
    for source in sorted((REPO / "mcq" / "export").rglob("*.py")):
        digest.update(source.relative_to(REPO).as_posix().encode() + b"\0" + source.read_bytes())
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout.strip()  # noqa: E731
    return {"git_head": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain")),
            "mcq_export_sources_sha256": digest.hexdigest()[:16]}


def _summary_of(runs: list[dict]) -> dict:
    walls = [r["wall_seconds"] for r in runs]
    summary = {"wall_seconds_median": round(statistics.median(walls), 2), "wall_seconds_min": min(walls),
               "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs),
               "cpu_seconds_median": round(statistics.median(r["user_cpu_seconds"] + r["system_cpu_seconds"]
                                                             for r in runs), 1)}
    if "steps" in runs[0]:
        summary["steps"] = {step: {"wall_seconds_median": round(statistics.median(r["steps"][step]["wall_seconds"]
                                                                                  for r in runs), 2),
                                   "peak_rss_mib_max": max(r["steps"][step]["peak_rss_mib"] for r in runs)}
                            for step in runs[0]["steps"]}
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1], Path(argv[2]), argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", choices=sorted(LLAMACPP_PATHS), default="4.5")
    parser.add_argument("--llm-layers", type=int, help="default: 2 (4.6: make-tiny's 4, both layer kinds)")
    parser.add_argument("--vision-layers", type=int, help="default: 2 (4.6: make-tiny's 3, around the vit_merger)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each path (alternating which goes first)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="OMP/MKL threads in every run (default: the libraries')")
    parser.add_argument("--llama-src", type=Path, help="an extracted llama-cpp-python source package (default: "
                                                       "download it into --cache-dir)")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME",
                                                                               Path.home() / ".cache")) / "mcq-bench")
    parser.add_argument("--contention", help="a note on what else ran on the machine (stored in the JSON)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--workdir", type=Path, help="build here instead of a new temp dir (implies --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (checkpoints, outputs, logs)")
    parser.add_argument("--tiny-widths", action="store_true", help="tiny widths instead of the real ones "
                                                                   "(a quick smoke test of this script)")
    args = parser.parse_args(argv)
    if args.version == "4.5":
        args.llm_layers, args.vision_layers = args.llm_layers or 2, args.vision_layers or 2

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    llama_root = llama_source(args.llama_src, args.cache_dir)
    llama = llama_root / "vendor" / "llama.cpp"
    pythonpath, extra = extra_python_path(args.cache_dir)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mcq-bench-gguf-"))
    keep = args.keep or args.workdir is not None
    workdir.mkdir(parents=True, exist_ok=True)
    threads_env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
    log(f"working in {workdir}")
    checkpoint = workdir / f"minicpmv{args.version.replace('.', '')}"
    load_start = os.getloadavg()
    mcq_source = _mcq_source()
    runs: dict[str, list[dict]] = {"mcq": [], "llamacpp": []}
    try:
        layers = [option for flag, value in (("--llm-layers", args.llm_layers),
                                             ("--vision-layers", args.vision_layers)) if value
                  for option in (flag, str(value))]
        command = [sys.executable, "-m", "mcq.cli", "make-tiny", str(checkpoint), "--version", args.version,
                   *layers, "--seed", str(args.seed), "--force"] + ([] if args.tiny_widths else ["--real-widths"])
        build = run_measured("make-tiny", command, workdir, threads_env)
        for repeat in range(args.repeats):
            order = ("mcq", "llamacpp") if repeat % 2 == 0 else ("llamacpp", "mcq")
            for path in order:
                work = workdir / f"{path}-{repeat}"
                if path == "mcq":
                    result = run_mcq(checkpoint, work, f"mcq-{repeat}", threads_env)
                else:
                    result = LLAMACPP_PATHS[args.version](checkpoint, llama, work, f"llamacpp-{repeat}", pythonpath,
                                                          threads_env)
                result["order"] = order.index(path)
                runs[path].append(result)
        driver_rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        log("comparing the F16 outputs")
        comparison = {kind: compare_files(runs["mcq"][0]["files"][kind], runs["llamacpp"][0]["files"][kind])
                      for kind in ("llm", "mmproj")}
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"kept {workdir}")

    summary = {path: _summary_of(results) for path, results in runs.items()}
    summary["mcq_over_llamacpp"] = {
        "wall_seconds": _ratio(summary["mcq"]["wall_seconds_median"], summary["llamacpp"]["wall_seconds_median"]),
        "peak_rss": _ratio(summary["mcq"]["peak_rss_mib_max"], summary["llamacpp"]["peak_rss_mib_max"]),
        "cpu_seconds": _ratio(summary["mcq"]["cpu_seconds_median"], summary["llamacpp"]["cpu_seconds_median"]),
    }
    summary["tensors"] = {kind: {"compared": c["compared"], "equal": c["equal"],
                                 "different": [d["name"] for d in c["different"]],
                                 "only_mcq": c["only_mcq"], "only_llamacpp": c["only_llamacpp"],
                                 **{f"{name} max_abs_diff": e.get("max_abs_diff") for name, e in c["excluded"].items()}}
                          for kind, c in comparison.items()}
    report = {
        "settings": {
            "version": args.version, "llm_layers": args.llm_layers or "make-tiny's default",
            "vision_layers": args.vision_layers or "make-tiny's default", "repeats": args.repeats,
            "seed": args.seed, "threads": args.threads or "library defaults",
            "widths": "tiny" if args.tiny_widths else f"real ({REAL_WIDTHS[args.version]})",
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "versions": {**_versions(pythonpath), **extra, "llama-cpp-python sdist": LLAMA_CPP_PYTHON},
            "llama_cpp_scripts": str(llama), "mcq_source": mcq_source,
            "contention": {"note": args.contention, "load_average_at_start": [round(x, 2) for x in load_start],
                           "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
            "peak_rss": "os.wait4 ru_maxrss of each step's own child process (exact kernel high-water mark); "
                        "llama.cpp path: the largest of its steps",
            "driver_peak_rss_mib": driver_rss,
        },
        "build": build,
        "runs": runs,
        "summary": summary,
        "comparison": comparison,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
