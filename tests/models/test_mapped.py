"""Mapped Linears (`mcq.models.mapped`): a compressed-tensors weight dequantized a block of rows at a time gives
the bytes compressed-tensors' own `decompress` gives, for every packing that has the blockwise path, and the
packings without it still run (whole-matrix dequantization)."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from torch.nn import functional as F

from mcq.models.mapped import ROW_BLOCK, MappedLinear, _packed_linear

OUT, IN = ROW_BLOCK + 44, 256      # more than one row block, the last one partial


class _Stored:
    """The part of `CheckpointReader` a packed Linear reads."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def read_stored(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def _packed(bits: int, symmetric: bool, strategy: str, group: int | None, g_idx: bool = False):
    generator = torch.Generator().manual_seed(bits * 10 + symmetric)
    groups = IN // group if strategy == "group" else 1
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    levels = torch.randint(low, high + 1, (OUT, IN), generator=generator, dtype=torch.int8)
    tensors = {"m.weight_packed": pack_to_int32(levels, bits),
               "m.weight_scale": (torch.rand(OUT, groups, generator=generator) * 0.05 + 1e-3).bfloat16(),
               "m.weight_shape": torch.tensor([OUT, IN])}
    if not symmetric:
        zero = torch.randint(low, high + 1, (OUT, groups), generator=generator, dtype=torch.int8)
        tensors["m.weight_zero_point"] = pack_to_int32(zero, bits, packed_dim=0)
    if g_idx:
        tensors["m.weight_g_idx"] = torch.arange(IN, dtype=torch.int32) // group
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group)
    return tensors, QuantizationScheme(targets=["Linear"], weights=args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,symmetric,strategy,group", [
    (4, False, "group", 128), (4, True, "group", 32), (8, True, "channel", None), (8, False, "group", 64)])
def test_blockwise_dequantization_gives_compressed_tensors_bytes(bits, symmetric, strategy, group, dtype):
    tensors, scheme = _packed(bits, symmetric, strategy, group)
    bias = torch.randn(OUT)
    linear = _packed_linear(_Stored(tensors), "m", scheme, set(tensors), bias, dtype)
    assert linear._rows is not None      # the blockwise path, not the whole-matrix fallback
    packed = {name.removeprefix("m."): tensor for name, tensor in tensors.items()}
    expected = PackedQuantizationCompressor.decompress(
        {**packed, "weight_scale": packed["weight_scale"].to(dtype)}, scheme)["weight"].to(dtype)
    blocks = [linear._rows(start, min(start + ROW_BLOCK, OUT), torch.empty(min(ROW_BLOCK, OUT - start), IN,
                                                                            dtype=dtype))
              for start in range(0, OUT, ROW_BLOCK)]
    assert torch.equal(torch.cat(blocks), expected)
    assert torch.equal(linear.weight, expected)
    x = torch.randn(3, 5, IN)
    torch.testing.assert_close(linear(x), F.linear(x.to(dtype), expected, bias.to(dtype)), rtol=0, atol=0)


def test_a_packing_without_the_blockwise_path_is_dequantized_whole():
    """An activation-ordered weight (`weight_g_idx` stored) keeps compressed-tensors' dequantization per call."""
    tensors, scheme = _packed(4, True, "group", 32, g_idx=True)
    linear = _packed_linear(_Stored(tensors), "m", scheme, set(tensors), None, torch.float32)
    assert linear._rows is None
    x = torch.randn(2, IN)
    torch.testing.assert_close(linear(x), F.linear(x, linear.weight), rtol=0, atol=0)


def test_a_stored_weight_is_cast_a_block_at_a_time():
    weight = torch.randn(OUT, IN).bfloat16()
    linear = MappedLinear.stored(weight, None, torch.float32)
    x = torch.randn(4, IN)
    out = linear(x)
    assert out.dtype == torch.float32 and linear.weight is weight
    for start in range(0, OUT, ROW_BLOCK):
        stop = min(start + ROW_BLOCK, OUT)
        assert torch.equal(out[:, start:stop], F.linear(x, weight[start:stop].float()))
