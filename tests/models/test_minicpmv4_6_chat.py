"""`mcq chat` on MiniCPM-V 4.6: the prompt is what transformers' `MiniCPMV4_6Processor` builds (for a video, what it
built in tests/data/minicpmv4_6_video/reference.json), the answer is what transformers' own model generates from it
(bf16, a quantized output, and an ONNX export on onnxruntime), and what 4.6 does not take is refused in one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

from minicpmv4_6_inputs import VIDEO_CASES, VIDEO_QUESTION, images_processor, random_image, video_case

from mcq.cli import main
from mcq.models.bnb_runtime import disable_unsupported_cpu_repacking
from mcq.models.familyspec import ChatRequest
from mcq.models.minicpmv4_6.calibration import CalibrationEncoder
from mcq.models.minicpmv4_6.chat import chat_inputs
from mcq.models.minicpmv4_6.video import Video
from mcq.models.tiny import resolve_tiny

QUESTION = "What differs between them?"
NEW_TOKENS = 6
VIDEO_REFERENCE = Path(__file__).parents[1] / "data" / "minicpmv4_6_video" / "reference.json"


@pytest.fixture(scope="module")
def tiny46():
    return resolve_tiny("tiny:4.6")


@pytest.fixture(scope="module")
def loud46(tiny46, tmp_path_factory):
    """tiny:4.6 with every write of its LLM layers to the residual stream (attention and MLP outputs) 10x. At the
    tiny model's initialization the stream is mostly the current token's embedding, and the greedy answer is the
    same for any picture (measured: the same 6 tokens for three random images); here it follows the picture, so an
    answer that dropped an image would differ."""
    path = tmp_path_factory.mktemp("loud46") / "model"
    shutil.copytree(tiny46, path)
    tensors = load_file(path / "model.safetensors")
    for name in tensors:
        if name.startswith("model.language_model.") and name.endswith(("o_proj.weight", "out_proj.weight",
                                                                        "down_proj.weight")):
            tensors[name] = tensors[name] * 10
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _saved(images, folder) -> list[str]:
    folder.mkdir(exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(str(folder / f"{index}.png"))
        image.save(paths[-1])
    return paths


def _processor_inputs(path, images):
    """transformers' processor on the question with one image token per image before it (mcq's layout)."""
    processor = images_processor(path)
    tokenizer = processor.tokenizer
    content = "\n".join([tokenizer.image_token] * len(images) + [QUESTION])
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return processor(images=images or None, text=text, return_tensors="pt")


def _generated(model, path, images) -> str:
    """transformers' greedy answer, its inputs cast as transformers' 4.6 documentation casts them."""
    inputs = _processor_inputs(path, images).to(dtype=model.dtype)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return images_processor(path).tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _chat(capsys, model, paths, *options) -> str:
    images = [argument for path in paths for argument in ("--image", path)]
    assert main(["chat", "--model", str(model), *images, "--max-new-tokens", str(NEW_TOKENS), *options,
                 QUESTION]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("sizes", [[(640, 480)], [(150, 100), (200, 120)]], ids=["sliced", "two-sizes"])
def test_chat_inputs_are_what_transformers_processor_builds(tiny46, sizes):
    """A sliced image (overview + slices) and two images of different sizes: token for token and pixel for pixel
    the processor's output."""
    images = [random_image(width, height, seed=index) for index, (width, height) in enumerate(sizes)]
    ours = chat_inputs(CalibrationEncoder(tiny46), ChatRequest(model="tiny:4.6", question=QUESTION,
                                                                images=tuple(images)))
    reference = _processor_inputs(tiny46, images)
    assert set(ours) == set(reference) == {"input_ids", "attention_mask", "pixel_values", "target_sizes"}
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key
    assert len(reference["target_sizes"]) == (3 if len(images) == 1 else 2)   # 640x480: overview + 2 slices


def test_chat_answers_as_transformers_generate_and_follows_the_images(loud46, tmp_path, capsys):
    model = AutoModelForImageTextToText.from_pretrained(loud46, dtype="auto").eval()
    first, second, other = (random_image(150, 100, seed=seed) for seed in range(3))
    one = json.loads(_chat(capsys, loud46, _saved([first], tmp_path / "a"), "--json"))["answer"]
    assert one == _generated(model, loud46, [first])
    two = _chat(capsys, loud46, _saved([first, second], tmp_path / "b")).rstrip("\n")
    assert two == _generated(model, loud46, [first, second])
    changed = _chat(capsys, loud46, _saved([first, other], tmp_path / "c")).rstrip("\n")
    assert changed == _generated(model, loud46, [first, other]) and changed != two
    assert _chat(capsys, loud46, _saved([first, second], tmp_path / "b"), "--stream").rstrip("\n") == two


def _as_the_card_loads(out, method):
    """The output loaded as its model card says (`Family.load_code`)."""
    if method == "rtn":
        return AutoModelForImageTextToText.from_pretrained(
            out, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    model = AutoModelForImageTextToText.from_pretrained(out, device_map="cpu").eval()
    disable_unsupported_cpu_repacking(model)
    return model


@pytest.mark.parametrize("method", ["rtn", "bnb-nf4"])
def test_a_quantized_46_output_answers_as_transformers_loads_it(method, loud46, tmp_path, capsys):
    """An `mcq quantize` output (compressed-tensors, dequantized; bitsandbytes on its CPU kernels)."""
    out = tmp_path / method
    assert main(["quantize", "--method", method, "--model", str(loud46), "--out", str(out)]) == 0
    capsys.readouterr()
    image = random_image(150, 100, seed=0)
    answer = json.loads(_chat(capsys, out, _saved([image], tmp_path / "images"), "--json"))["answer"]
    assert answer == _generated(_as_the_card_loads(out, method), out, [image])


@pytest.mark.parametrize("name", sorted(VIDEO_CASES))
def test_video_inputs_are_what_transformers_video_processor_builds(tiny46, name):
    """Token for token, and pixel for pixel (a SHA-256 of the float32 bytes), what `MiniCPMV4_6Processor` with its
    torchvision video processor gave for the same frames (tests/data/minicpmv4_6_video/make_reference.py): sliced
    frames, upscaled frames, max_slice_nums, an image and a video in one prompt."""
    reference = json.loads(VIDEO_REFERENCE.read_text())["cases"][name]
    images, frames = video_case(name)
    turn = {"role": "user", "content": [*images, Video(tuple(frames)), VIDEO_QUESTION]}
    ours = CalibrationEncoder(tiny46).encode([turn], True, VIDEO_CASES[name].get("options", {}).get("max_slice_nums"))
    assert ours["input_ids"][0].tolist() == reference["input_ids"]
    assert ours["attention_mask"][0].tolist() == reference["attention_mask"]
    assert ours["target_sizes_videos"].tolist() == reference["target_sizes_videos"]
    for key in ("pixel_values_videos", "pixel_values"):
        assert (key in ours) == (key in reference)
        if key in ours:
            pixels = ours[key].to(torch.float32).contiguous()
            found = {"shape": list(pixels.shape), "sum": float(pixels.double().sum()),
                     "sha256": hashlib.sha256(pixels.numpy().tobytes()).hexdigest()}
            assert found == reference[key], key


def _frames_folder(folder, seeds) -> Path:
    folder.mkdir()
    for index, seed in enumerate(seeds):
        random_image(150, 100, seed=seed).save(folder / f"{index:02d}.png")
    return folder


def test_chat_answers_about_a_video_as_generate_on_its_inputs_and_follows_the_frames(loud46, tmp_path, capsys):
    """`--frames`: the answer is transformers' greedy `generate` on the video inputs (checked against the processor
    above), and another video, or none, gives another answer."""
    model = AutoModelForImageTextToText.from_pretrained(loud46, dtype="auto").eval()
    folder = _frames_folder(tmp_path / "clip", (10, 11, 12))
    request = ChatRequest(model=str(loud46), question=QUESTION, images=(), frames=str(folder))
    inputs = chat_inputs(CalibrationEncoder(loud46), request)
    assert len(inputs["target_sizes_videos"]) == 3    # one unsliced block per frame
    inputs = {key: value.to(model.dtype) if key == "pixel_values_videos" else value for key, value in inputs.items()}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = images_processor(loud46).tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                                         skip_special_tokens=True)
    answer = _chat(capsys, loud46, [], "--frames", str(folder)).rstrip("\n")
    assert answer == expected
    other = _chat(capsys, loud46, [], "--frames", str(_frames_folder(tmp_path / "other", (20, 21, 22)))).rstrip("\n")
    assert other != answer and _chat(capsys, loud46, []).rstrip("\n") != answer



@pytest.fixture(scope="module")
def onnx46(loud46, tmp_path_factory) -> Path:
    from mcq.export.onnx import export_onnx

    return export_onnx(str(loud46), tmp_path_factory.mktemp("onnx46") / "fp32").out


def _generated_video(model, path, folder) -> str:
    """transformers' greedy answer about the frames in `folder` (inputs as `--frames` builds them)."""
    request = ChatRequest(model=str(path), question=QUESTION, images=(), frames=str(folder))
    inputs = chat_inputs(CalibrationEncoder(path), request)
    inputs = {key: value.to(model.dtype) if key == "pixel_values_videos" else value for key, value in inputs.items()}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return images_processor(path).tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_on_an_onnx_export_answers_as_transformers_in_float32(loud46, onnx46, tmp_path, capsys):
    """The fp32 ONNX export on onnxruntime: greedy answers about an image, another image and a video are transformers'
    float32 `generate`'s, streamed or whole; sampling follows the seed."""
    model = AutoModelForImageTextToText.from_pretrained(loud46, dtype=torch.float32).eval()
    first, other = random_image(150, 100, seed=0), random_image(150, 100, seed=2)
    one = _chat(capsys, onnx46, _saved([first], tmp_path / "a")).rstrip("\n")
    assert one == _generated(model, loud46, [first])
    changed = _chat(capsys, onnx46, _saved([other], tmp_path / "b")).rstrip("\n")
    assert changed == _generated(model, loud46, [other]) and changed != one
    assert _chat(capsys, onnx46, _saved([first], tmp_path / "a"), "--stream").rstrip("\n") == one
    folder = _frames_folder(tmp_path / "clip", (10, 11, 12))
    assert _chat(capsys, onnx46, [], "--frames", str(folder)).rstrip("\n") == _generated_video(model, loud46, folder)
    sampled = [_chat(capsys, onnx46, [], "--sampling", "--seed", str(seed)) for seed in (1, 1)]
    assert sampled[0] == sampled[1]



@pytest.fixture(scope="module")
def coreml46(loud46, tmp_path_factory) -> Path:
    from mcq.export.coreml import export_coreml

    return Path(export_coreml(str(loud46), tmp_path_factory.mktemp("coreml46") / "fp16", vision="fp16", llm="fp16",
                              progress=False).out)


def test_chat_on_a_coreml_export_answers_as_transformers(loud46, coreml46, tmp_path, capsys):
    """The fp16 Core ML packages (the interpreter here, Core ML on macOS): greedy answers about an image and a
    video are transformers' float32 `generate`'s, streamed or whole; the export carries its tokenizer files."""
    model = AutoModelForImageTextToText.from_pretrained(loud46, dtype=torch.float32).eval()
    assert (coreml46 / "tokenizer_config.json").is_file() and not (coreml46 / "config.json").exists()
    first = random_image(150, 100, seed=0)
    one = _chat(capsys, coreml46, _saved([first], tmp_path / "a")).rstrip("\n")
    assert one == _generated(model, loud46, [first])
    assert _chat(capsys, coreml46, _saved([first], tmp_path / "a"), "--stream").rstrip("\n") == one
    folder = _frames_folder(tmp_path / "clip", (10, 11, 12))
    assert _chat(capsys, coreml46, [], "--frames", str(folder)).rstrip("\n") == _generated_video(model, loud46, folder)

@pytest.mark.parametrize("option,message", [(["--dtype", "bfloat16"], "computes in the precision it was exported"),
                                            (["--packing", "2"], "packs no frames by temporal id")])
@pytest.mark.parametrize("export", ["onnx46", "coreml46"])
def test_chat_on_an_export_refuses_what_does_not_apply_in_one_line(export, option, message, request, capsys):
    assert main(["chat", "--model", str(request.getfixturevalue(export)), *option, QUESTION]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err

def test_a_video_file_is_sampled_a_frame_a_second_or_at_fps(tiny46, tmp_path):
    """`--video`: one frame a second, as the video processor samples main frames (3 for 3 s), `--fps` another rate,
    the video processor's max_num_frames at most."""
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for index in range(12):   # 3 s at 4 fps
            pixels = np.asarray(random_image(160, 120, seed=index))
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    encoder = CalibrationEncoder(tiny46)

    def frames(**options) -> int:
        request = ChatRequest(model="tiny:4.6", question=QUESTION, images=(), video=str(clip), **options)
        return len(chat_inputs(encoder, request)["target_sizes_videos"])   # 160x120: one block per frame

    assert frames() == 3 and frames(fps=2.0) == 6
    encoder.videos.settings["max_num_frames"] = 4
    assert frames(fps=2.0) == 4


@pytest.mark.parametrize("option,message", [(["--packing", "2"], "packs no frames by temporal id"),
                                            (["--fps", "2"], "only sets how often --video is sampled"),
                                            (["--frames", "clip", "--fps", "2"], "--frames are taken as they are")])
def test_temporal_video_options_are_refused_for_46_in_one_line(option, message, capsys):
    """4.6 has no temporal ids: what only times frames or packs them by time is refused, not ignored."""
    assert main(["chat", "--model", "tiny:4.6", *option, "what happens?"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_thinking_is_the_chat_template_s_switch(tiny46, reference_dir, tmp_path, capsys):
    """tiny:4.6's template has no enable_thinking: --thinking is refused, not ignored. A 4.6 checkpoint whose
    template has it (here the official 4.5 one) gets it."""
    assert main(["chat", "--model", "tiny:4.6", "--thinking", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no enable_thinking switch" in err
    path = tmp_path / "thinking46"
    shutil.copytree(tiny46, path)
    official = json.loads((reference_dir / "tokenizer_config.json").read_text())["chat_template"]
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": official}))
    encoder = CalibrationEncoder(path)
    requests = {thinking: ChatRequest(model=str(path), question=QUESTION, images=(), thinking=thinking)
                for thinking in (False, True)}
    prompts = {thinking: encoder.tokenizer.decode(chat_inputs(encoder, request)["input_ids"][0])
               for thinking, request in requests.items()}
    assert prompts[True].endswith("<|im_start|>assistant\n<think>\n")
    assert prompts[False].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("missing,message", [("tokenizer", "cannot load the tokenizer"),
                                             ("preprocessor_config.json", "cannot load the image processor")])
def test_a_46_checkpoint_without_its_tokenizer_or_image_processor_is_one_line(missing, message, tiny46, tmp_path,
                                                                               capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny46, model)
    for file in model.iterdir():
        if file.name.startswith(missing) or (missing == "tokenizer" and file.name in ("vocab.json", "merges.txt")):
            file.unlink()
    assert main(["chat", "--model", str(model), "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
