"""Writes reference.json: what transformers' own `MiniCPMV4_6Processor` (with its torchvision video processor) gives
for the videos of tests/models/test_minicpmv4_6_chat.py, which checks mcq's torch-only video encoding against it.

mcq's environment has no torchvision (PyPI's torchvision 0.28.0, the one built for torch 2.13.0, is a CUDA build
whose `_C` extension does not load beside torch's CPU build). The reference is made in a throwaway venv that sees
mcq's packages and adds that torchvision without its dependencies, with the two modules that register `_C`'s
operators emptied (the video processor uses none of them: its resize is torch's `interpolate`):

    python -m venv --system-site-packages /tmp/tvvenv
    /tmp/tvvenv/bin/pip install --no-deps torchvision==0.28.0
    TV=/tmp/tvvenv/lib/python3.11/site-packages/torchvision
    for f in _meta_registrations _autograd_registrations; do echo > $TV/$f.py; done
    PYTHONPATH=.:tests /tmp/tvvenv/bin/python tests/data/minicpmv4_6_video/make_reference.py

Pixels are kept as a SHA-256 of their float32 bytes (with shape and sum, to tell how a mismatch differs): the
reference frames are noise and the pixels megabytes. The bytes do not depend on torch's CPU kernel dispatch: mcq's
encoding gives these hashes under ATEN_CPU_CAPABILITY=default, avx2 and avx512 alike (checked with torch 2.13.0).
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, AutoVideoProcessor, MiniCPMV4_6Processor
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

from minicpmv4_6_inputs import VIDEO_CASES, VIDEO_QUESTION, video_case  # tests/minicpmv4_6_inputs.py

from mcq.models.tiny import resolve_tiny

# The image processor's PIL backend, the one mcq follows: with torchvision present AutoProcessor would pick the
# torchvision backend, whose resize differs from PIL's.
path = resolve_tiny("tiny:4.6")
tokenizer = AutoTokenizer.from_pretrained(path)
processor = MiniCPMV4_6Processor(image_processor=MiniCPMV4_6ImageProcessorPil.from_pretrained(path),
                                 video_processor=AutoVideoProcessor.from_pretrained(path), tokenizer=tokenizer)
assert type(processor.video_processor).__name__ == "MiniCPMV4_6VideoProcessor"
reference = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
             "torchvision": __import__("torchvision").__version__, "cases": {}}
for name, case in VIDEO_CASES.items():
    images, frames = video_case(name)
    content = "\n".join([tokenizer.image_token] * len(images) + [tokenizer.video_token, VIDEO_QUESTION])
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    out = processor(images=images or None, videos=[frames], text=text, do_sample_frames=False, return_tensors="pt",
                    **case.get("options", {}))
    entry = {"input_ids": out["input_ids"][0].tolist(), "attention_mask": out["attention_mask"][0].tolist(),
             "target_sizes_videos": out["target_sizes_videos"].tolist()}
    for key in ("pixel_values_videos", "pixel_values"):
        if key in out:
            pixels = out[key].to(torch.float32).contiguous()
            entry[key] = {"shape": list(pixels.shape), "sum": float(pixels.double().sum()),
                          "sha256": hashlib.sha256(pixels.numpy().tobytes()).hexdigest()}
    reference["cases"][name] = entry
Path(sys.argv[0]).with_name("reference.json").write_text(json.dumps(reference) + "\n")
