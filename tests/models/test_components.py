"""The vision tower and resampler against independent formulations."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from mcq.models.minicpmv import MiniCPMV, MiniCPMVConfig, checkpoint_names
from mcq.models.minicpmv.resampler import Resampler, sincos_2d
from mcq.models.minicpmv.vision import MiniCPMVisionTransformer, navit_position_ids


def test_official_config_on_meta_matches_published_index(reference_dir):
    config = MiniCPMVConfig(**json.loads((reference_dir / "config.json").read_text()))
    with torch.device("meta"):
        model = MiniCPMV(config)
    assert sum(p.numel() for p in model.parameters()) == 8_695_895_280
    index = json.loads((reference_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = json.loads((reference_dir / "parameter_shapes.json").read_text())["shapes"]
    assert set(index) == set(shapes)
    # The published names and shapes, mapped onto mcq's Linears, are exactly the model's parameters.
    published = {param: shape for name, stored in shapes.items()
                 for param, shape in checkpoint_names.param_shapes(name, stored).items()}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == published
    assert published["resampler.attn.q_proj.weight"] == [4096, 4096]
    assert len(model.vpm.encoder.layers) == 27  # drop_vision_last_layer: false is honoured


def test_official_2_6_config_on_meta_matches_published_weight_names(reference_dir):
    """2.6's published LLM fields with the vision and resampler fields it shares with 4.5 give exactly the
    published tensor names, and parameters that fill the published total size."""
    official = reference_dir.parent / "minicpm-v-2_6"
    published = json.loads((official / "weight_names.json").read_text())
    llm = json.loads((official / "llm_config.json").read_text())
    shared = json.loads((reference_dir / "config.json").read_text())
    config = MiniCPMVConfig(**{key: value for key, value in llm.items() if key not in ("architectures", "model_type")},
                            version=2.6, architectures=["MiniCPMV"],
                            **{key: shared[key] for key in ("vision_config", "query_num", "image_size", "patch_size",
                                                            "slice_mode", "slice_config", "drop_vision_last_layer")})
    with torch.device("meta"):
        model = MiniCPMV(config)
    assert {checkpoint_names.stored_name(name) for name in model.state_dict()} == set(published["weight_names"])
    assert 2 * sum(p.numel() for p in model.parameters()) == published["total_size"]  # bf16


def _vision_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(hidden_size=64, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
                              image_size=980, patch_size=14, vision_use_head=False)


def test_vision_tower_equals_siglip_on_full_grid():
    torch.manual_seed(0)
    config = _vision_config()
    reference = SiglipVisionModel(config).eval()
    ours = MiniCPMVisionTransformer(config).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}
    image = torch.randn(1, 3, 980, 980)
    # Our packing: one row of 70*70 patches in raster order, [3, 14, 14 * 4900].
    patches = image.unfold(2, 14, 14).unfold(3, 14, 14)  # [1, 3, 70, 70, 14, 14]
    packed = patches.permute(0, 1, 4, 2, 3, 5).reshape(1, 3, 14, 70 * 70 * 14)
    mask = torch.ones(1, 4900, dtype=torch.bool)
    with torch.no_grad():
        expected = reference(pixel_values=image).last_hidden_state
        got = ours(packed, mask, torch.tensor([[70, 70]]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_padded_slices_do_not_change_real_patches():
    torch.manual_seed(0)
    tower = MiniCPMVisionTransformer(_vision_config()).eval()
    small = torch.randn(1, 3, 14, 14 * 6)  # a 2x3 slice
    padded = torch.cat([small, torch.randn(1, 3, 14, 14 * 4)], dim=-1)
    with torch.no_grad():
        alone = tower(small, torch.ones(1, 6, dtype=torch.bool), torch.tensor([[2, 3]]))
        mask = torch.tensor([[True] * 6 + [False] * 4])
        in_batch = tower(padded, mask, torch.tensor([[2, 3]]))
    torch.testing.assert_close(in_batch[:, :6], alone, rtol=1e-5, atol=1e-5)


def _official_buckets(n: int, step: float | None = None, side: int = 70) -> list[int]:
    """The official bucket of each of the n coordinates of a side of n patches, from the definition, element by
    element: the step is the float32 value of 1/n (`1 / tensor(n)`), both aranges are torch's CPU kernel (pairs
    of 8-lane vectors, each lane = float32(vector's first value) + lane * step in double, rounded to float32; the
    elements after the last full pair are float32(start + i * step)), and `bucketize(right=True)` counts the
    boundaries <= the coordinate."""
    def cpu_arange(start: float, end: float, step: float) -> list[np.float32]:
        count = math.ceil((end - start) / step)
        values = []
        for i in range(count):
            if i < count // 16 * 16:
                first = float(np.float32(start + step * (i - i % 8)))
                values.append(np.float32(first + (i % 8) * step))
            else:
                values.append(np.float32(start + step * i))
        return values

    step = float(np.float32(1) / np.float32(n)) if step is None else step
    boundaries = cpu_arange(1 / side, 1.0, 1 / side)
    return [sum(bool(b <= c) for b in boundaries) for c in cpu_arange(0.0, 1 - 1e-6, step)]


def test_position_ids_are_the_official_float32_buckets_for_every_side_length():
    expected = {n: _official_buckets(n) for n in range(1, 71)}
    for n in range(1, 71):
        for m in sorted({n, 71 - n, 49}):
            ids = navit_position_ids(torch.tensor([[n, m]]), 70, 4900)[0]
            assert ids[:n * m].tolist() == [r * 70 + c for r in expected[n] for c in expected[m]], (n, m)
            assert not ids[n * m:].any()  # padding
    assert expected[70] == list(range(70)) and expected[35] == list(range(0, 70, 2))
    # The float32 step matters exactly where the issue found official outputs disagreeing with a double step.
    assert {n for n in range(1, 71) if expected[n] != _official_buckets(n, step=1 / n)} == {25, 49, 50, 55, 58}
    assert expected[25] != [(r * 70) // 25 for r in range(25)]  # nor is it exact integer math


def _mha_reference(resampler: Resampler, x, tgt_sizes):
    """The official 2D resampler written with a stock nn.MultiheadAttention, one slice at a time."""
    dim = resampler.embed_dim
    mha = nn.MultiheadAttention(dim, resampler.attn.num_heads)
    attn = resampler.attn
    mha.load_state_dict({
        "in_proj_weight": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
        "in_proj_bias": torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
        "out_proj.weight": attn.out_proj.weight, "out_proj.bias": attn.out_proj.bias})
    outputs = []
    for i, (h, w) in enumerate(tgt_sizes.tolist()):
        kv = resampler.ln_kv(resampler.kv_proj(x[i, : h * w]))  # [L, D]
        pos = sincos_2d(dim, h, w)
        q = resampler.ln_q(resampler.query)
        out, _ = mha(q[:, None], (kv + pos)[:, None], kv[:, None], need_weights=False)
        outputs.append(resampler.ln_post(out[:, 0]) @ resampler.proj.weight.t())  # official: x @ proj
    return torch.stack(outputs)


def test_resampler_equals_multihead_attention_formulation():
    torch.manual_seed(0)
    resampler = Resampler(num_queries=8, embed_dim=64, num_heads=4, kv_dim=32, temporal=False)
    for p in resampler.parameters():
        nn.init.normal_(p, std=0.2)
    tgt_sizes = torch.tensor([[4, 5], [3, 3]])
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(resampler(x, tgt_sizes), _mha_reference(resampler, x, tgt_sizes),
                                   rtol=1e-4, atol=1e-5)


def test_sincos_2d_layout():
    table = sincos_2d(8, 2, 3).view(2, 3, 8)
    # First half encodes the column w, second half the row h; position (0, 0) is sin 0 = 0, cos 0 = 1.
    assert table[0, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert torch.equal(table[1, 2, :4], table[0, 2, :4]) and torch.equal(table[1, 2, 4:], table[1, 0, 4:])


def test_temporal_groups_pack_frames_into_one_block():
    torch.manual_seed(0)
    resampler = Resampler(num_queries=8, embed_dim=64, num_heads=4, kv_dim=32, temporal=True)
    for p in resampler.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(8, 16, 32)
    tgt = torch.tensor([[4, 4]] * 8)
    with torch.no_grad():
        six = resampler(x[:6], tgt[:6], temporal_ids=[[0, 1, 2, 3, 4, 5]])
        mixed = resampler(x, tgt, temporal_ids=[[0, 1, 2, 3, 4, 5], [-1], [-1]])
        plain = resampler(x[6:], tgt[6:])
    assert six.shape == (1, 8, 64)
    assert mixed.shape == (3, 8, 64)
    torch.testing.assert_close(mixed[:1], six, rtol=1e-5, atol=1e-5)
    # An image ([-1]) gets no temporal term: same as the plain 2D path.
    torch.testing.assert_close(mixed[1:], plain, rtol=1e-5, atol=1e-5)
    # Frame order matters (temporal term), so a group is not a bag of frames.
    with torch.no_grad():
        shuffled = resampler(x[:6], tgt[:6], temporal_ids=[[5, 4, 3, 2, 1, 0]])
    assert not torch.allclose(shuffled, six, atol=1e-4)


@pytest.mark.parametrize("version", ["2.6", "4.0"])
def test_temporal_ids_ignored_without_3d_resampler(version):
    resampler = Resampler(num_queries=4, embed_dim=64, num_heads=4, kv_dim=32, temporal=False)
    for p in resampler.parameters():
        nn.init.normal_(p, std=0.2)
    x, tgt = torch.randn(2, 16, 32), torch.tensor([[4, 4]] * 2)
    with torch.no_grad():
        assert resampler(x, tgt, temporal_ids=[[-1], [-1]]).shape == (2, 4, 64)
