"""NF4 decode: bit for bit what bitsandbytes decodes, for every shape it accepts."""

import pytest
import torch

from conftest import HAS_BNB, make_linear4bit, needs_bnb
from tinylora_kernels.nf4 import (NF4Weight, dequantize_nf4, nf4_block_scales,
                                  restore_canonical_layout)

if HAS_BNB:
    import bitsandbytes.functional as bnbF

pytestmark = needs_bnb

SHAPES = [(1, 1), (3, 5), (7, 63), (33, 100), (64, 64), (300, 257), (5, 11008), (40, 3584),
          (17, 18944 // 8), (256, 2048)]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_decode_bit_identical_to_bitsandbytes(shape, dtype, double_quant, device, rng):
    w = (torch.randn(*shape, generator=rng).to(dtype) * 3).to(device)
    packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant,
                                    blocksize=64)
    expected = bnbF.dequantize_4bit(packed, qs)
    if device == "cpu" and dtype != torch.float32:
        as_fp32 = torch.ops.bitsandbytes.dequantize_4bit.default(
            packed, nf4_block_scales(NF4Weight.from_quant_state(packed, qs)), 64, "nf4",
            qs.shape, torch.float32)
        if not torch.equal(expected, as_fp32.to(dtype)):
            pytest.skip(f"bitsandbytes' CPU kernel on this processor does not round its fp32 "
                        f"decode to {dtype} (its own outputs disagree); the CUDA variant checks")
    got = dequantize_nf4(NF4Weight.from_quant_state(packed, qs))
    assert got.dtype == expected.dtype == dtype and got.shape == expected.shape
    mismatch = (got.view(-1) != expected.view(-1)).nonzero().flatten()
    assert mismatch.numel() == 0, f"{mismatch.numel()} elements differ, first at {mismatch[:5]}"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_to_another_dtype_is_fp32_product_then_cast(out_dtype, rng):
    # bitsandbytes decodes straight to the compute dtype: level * scale in fp32, one rounding
    w = torch.randn(37, 192, generator=rng)
    packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    absmax = bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    expected = torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, 64, "nf4",
                                                              qs.shape, out_dtype)
    got = dequantize_nf4(NF4Weight.from_quant_state(packed, qs), out_dtype)
    assert torch.equal(got, expected)


def test_groups_of_256_blocks_straddle_rows(rng):
    # K = 3584: 56 blocks per row, so absmax2's groups of 256 blocks start mid-row
    w = torch.randn(12, 3584, generator=rng)
    packed, qs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    assert qs.state2.absmax.numel() == -(-12 * 56 // 256)
    assert torch.equal(dequantize_nf4(NF4Weight.from_quant_state(packed, qs)),
                       bnbF.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_quant_storage_reinterpreted_as_bytes(storage):
    layer, _ = make_linear4bit(48, 128, quant_storage=storage)
    assert layer.weight.dtype == storage
    expected = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(dequantize_nf4(NF4Weight.from_bnb(layer.weight)), expected)


def test_fp4_is_refused_by_name():
    packed, qs = bnbF.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="only NF4.*fp4"):
        NF4Weight.from_quant_state(packed, qs)


def test_cpu_packed_layout_refused_then_restored():
    layer, _ = make_linear4bit(64, 128, bias=False)
    before = dequantize_nf4(NF4Weight.from_bnb(layer.weight))
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 128, dtype=torch.float16))   # bitsandbytes may repack here
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU's bitsandbytes does not repack (no AVX512-BF16)")
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        NF4Weight.from_bnb(layer.weight)
    assert restore_canonical_layout(layer)
    after = dequantize_nf4(NF4Weight.from_bnb(layer.weight))
    # the layout is back; only the block scales carry bf16 rounding
    torch.testing.assert_close(after.float(), before.float(), rtol=2 ** -7, atol=0)
