"""q4f16 packing and the quantizer: fast path vs the NumPy reference, error bounds, layout."""
import numpy as np
import pytest
import torch

from exporter import quant


def test_pack_matches_reference_and_round_trips():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(7, 96)).astype(np.uint8)
    packed = quant.pack_codes(codes)
    assert packed.dtype == np.uint32 and packed.shape == (7, 12)
    np.testing.assert_array_equal(packed, quant.pack_int4_reference(codes))
    np.testing.assert_array_equal(quant.unpack_codes(packed), codes)
    np.testing.assert_array_equal(quant.unpack_int4_reference(packed), codes)


def test_layout_is_mlc_q4f16_1():
    # element k of a row lives in word k // 8 at bits 4 * (k % 8); w = (q - 7) * scale
    codes = np.zeros((1, 32), dtype=np.uint8)
    codes[0, 9] = 0xA
    packed = quant.pack_codes(codes)
    assert packed[0, 1] == 0xA << 4 and packed[0, [0, 2, 3]].sum() == 0
    scale = np.full((1, 1), 0.5, dtype=np.float16)
    w = quant.unpack_int4(packed, scale)
    assert w[0, 9] == pytest.approx((0xA - 7) * 0.5) and w[0, 0] == pytest.approx(-3.5)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_weight_error_bound(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    rtn = quant.QTensor(bits, *quant.quantize_weight(w, bits, search=False))
    assert rtn.shape == (64, 256) and rtn.scale.dtype == np.float16 and rtn.scale.shape == (64, 8)
    err = np.abs(rtn.dequantize() - w.numpy()).reshape(64, 8, 32)
    # round-to-nearest: at most half a step (absmax/7 or absmax/127, fp16-rounded) per group
    step = rtn.scale.astype(np.float32)[..., None]
    assert (err <= step * 0.5 + 1e-6).all()
    # the clipping search never does worse than round-to-nearest on any group
    searched = quant.QTensor(bits, *quant.quantize_weight(w, bits))
    mse = lambda q: ((q.dequantize() - w.numpy()) ** 2).reshape(64, 8, 32).sum(-1)  # noqa: E731
    assert (mse(searched) <= mse(rtn) + 1e-7).all()
    if bits == 4:  # 4-bit gains from clipping Gaussian tails; 8-bit may tie
        assert mse(searched).sum() < mse(rtn).sum()


def test_clipping_search_beats_round_to_nearest():
    torch.manual_seed(1)
    w = torch.randn(128, 256) * torch.linspace(0.1, 3, 256)
    imp = torch.linspace(0.01, 5, 256)
    errs = {}
    for search in (False, True):
        d, s = quant.quantize_weight(w, 4, importance=imp, search=search)
        errs[search] = float(((quant.unpack_int4(d, s) - w.numpy()) ** 2 * imp.numpy()).mean())
    assert errs[True] < 0.9 * errs[False]


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quant.quantize_weight(torch.randn(4, 40), 4)


def test_scheme_covers_every_weight(tiny, tiny_quantized):
    qm, _, _ = tiny_quantized
    assert set(qm.tensors) == set(tiny.state)
    for name, t in qm.tensors.items():
        if quant.is_linear(name):
            assert isinstance(t, quant.QTensor) and t.bits == 4, name
        elif name == "tok_embeddings.weight":
            assert isinstance(t, quant.QTensor) and t.bits == 8
        else:
            assert t.dtype == np.float16, name
    # int4 linears + int8 embedding: well under fp16's 2 bytes per parameter
    params = sum(v.numel() for v in tiny.state.values())
    assert qm.nbytes / params < 0.9


@pytest.mark.parametrize("bits", [4, 8])
def test_native_search_equals_reference(bits):
    """csrc/qsearch.c (what the quantizer runs) picks exactly the reference's scales."""
    torch.manual_seed(2)
    w = (torch.randn(300, 8, 32) * torch.rand(8, 32) * 3)
    w[0, 0] = 0.0  # an all-zero group
    imp = torch.rand(8, 32) + 0.01
    for importance in (None, imp):
        fast = quant._search_scales(w, importance, bits)
        ref = quant._search_scales_reference(w, importance, bits)
        torch.testing.assert_close(fast, ref, rtol=0, atol=0)
