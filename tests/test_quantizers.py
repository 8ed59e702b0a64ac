"""The quantizer registry: GPTQ vs the clipping search on the same grid, statistics, recipe selection."""
import numpy as np
import pytest
import torch

from exporter import quant
from exporter.errors import ExportError
from exporter.model import Block
from exporter.quantizers import DAMP, QUANTIZERS, InputRecorder, InputStats, gptq
from exporter.recipes import KNOWN_QUANTIZERS, get_recipe, parse_recipe


def _correlated(n_tok=4096, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_tok, n, generator=g) @ (torch.randn(n, n, generator=g) * 0.3 + torch.eye(n))


def test_registry_matches_recipe_names():
    assert set(QUANTIZERS) == set(KNOWN_QUANTIZERS)
    assert get_recipe("tiny").quantizer == "gptq"


@pytest.mark.parametrize("grid", [quant.GRIDS[4], quant.Grid(-7, 7)])
def test_gptq_beats_clipping_on_layer_output(grid):
    """Same grid, same scale search: GPTQ's output error ||X (W - Q)^T|| is well below round-to-nearest's."""
    x = _correlated()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    stats = InputStats.of(x, full=True)
    values, scales = gptq(w, stats.xtx, grid)
    assert values.min() >= grid.qmin and values.max() <= grid.qmax
    assert values.dtype == torch.int8
    assert torch.equal(scales, scales.half().float())           # stored as float16 exactly
    deq = (values.float().reshape(64, 4, 32) * scales[..., None]).reshape(64, 128)
    clip_scales = quant._search_scales(w.reshape(64, 4, 32), stats.importance.reshape(4, 32), grid)
    rtn = ((w.reshape(64, 4, 32) / clip_scales[..., None]).round().clamp(grid.qmin, grid.qmax)
           * clip_scales[..., None]).reshape(64, 128)
    err = lambda q: float(((x @ (w - q).T) ** 2).mean())  # noqa: E731
    assert err(deq) < 0.7 * err(rtn), (err(deq), err(rtn))


def _textbook_gptq(w, xtx, grid):
    """GPTQ as usually written (the spec of the blocked R-form): U = upper Cholesky factor of H^-1, one
    column at a time, each group's scale from the clipping search on the weights as updated so far."""
    H = (xtx / xtx.diagonal().mean()).double()
    H.diagonal().add_(DAMP)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    imp = H.diagonal().float().reshape(-1, 32)
    W, V = w.double().clone(), torch.empty(w.shape)
    S = torch.empty(w.shape[0], w.shape[1] // 32)
    for j in range(w.shape[1]):
        g = j // 32
        if j % 32 == 0:
            S[:, g] = quant._search_scales(W[:, j:j + 32].float().reshape(-1, 1, 32), imp[g:g + 1], grid)[:, 0]
        s = S[:, g].double()
        V[:, j] = (W[:, j] / s).round().clamp(grid.qmin, grid.qmax).float()
        err = (W[:, j] - V[:, j] * s) / U[j, j]
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:]
    return V, S


def _output_error(x, w, values, scales):
    deq = (values.float().reshape(w.shape[0], -1, 32) * scales[..., None]).reshape(w.shape)
    return float(((x @ (w - deq).T) ** 2).sum())


def test_blocked_gptq_equals_textbook_gptq():
    """The lazy-batch R-form (one Cholesky, 128-column batches, two row threads) chooses the same values
    and scales as the textbook column loop; the scale refit then lowers the layer-output error."""
    x = _correlated(n=320)
    w = torch.randn(96, 320, generator=torch.Generator().manual_seed(3))
    xtx = InputStats.of(x, full=True).xtx
    want_v, want_s = _textbook_gptq(w, xtx, quant.GRIDS[4])
    values, scales = gptq(w, xtx, quant.GRIDS[4], refit=False)
    assert torch.equal(values.float(), want_v) and torch.equal(scales, want_s)
    values1, scales1 = gptq(w, xtx, quant.GRIDS[4], refit=False, threads=1)
    assert torch.equal(values1, values) and torch.equal(scales1, scales)
    refit_v, refit_s = gptq(w, xtx, quant.GRIDS[4])
    assert torch.equal(refit_v, values) and torch.equal(refit_s, refit_s.half().float())
    assert (refit_s > 0).all() and not torch.equal(refit_s, scales)
    assert _output_error(x, w, refit_v, refit_s) < 0.985 * _output_error(x, w, values, scales)


def test_dequantize_broadcast_equals_elementwise():
    """unpack_int4 / unpack_int8 broadcast over groups; the obvious gather of codes and scales agrees."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (5, 96), dtype=np.uint8)
    scale = rng.standard_normal((5, 3)).astype(np.float16)
    k = np.arange(96)
    np.testing.assert_array_equal(quant.unpack_int4(quant.pack_codes(codes), scale),
                                  (codes.astype(np.float32) - quant.Q4_ZERO) * scale[:, k // 32].astype(np.float32))
    q8 = rng.integers(-127, 128, (5, 96)).astype(np.int8)
    np.testing.assert_array_equal(quant.unpack_int8(q8, scale),
                                  q8.astype(np.float32) * scale[:, k // 32].astype(np.float32))


def test_gptq_quantizer_packs_q4f16_and_keeps_int8_on_the_clipping_search():
    x = _correlated()
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(2))
    stats = InputStats.of(x, full=True)
    q4 = QUANTIZERS["gptq"].run(w, 4, stats)
    values, scales = gptq(w, stats.xtx, quant.GRIDS[4])
    np.testing.assert_array_equal(q4.data, quant.pack_codes((values + quant.Q4_ZERO).to(torch.uint8).numpy()))
    np.testing.assert_array_equal(q4.scale, scales.half().numpy())
    q8 = QUANTIZERS["gptq"].run(w, 8, stats)
    want = QUANTIZERS["clip"].run(w, 8, InputStats.of(x, full=False))
    np.testing.assert_array_equal(q8.data, want.data)
    np.testing.assert_array_equal(q8.scale, want.scale)


def test_recorder_shares_inputs_and_counts_tokens(tiny):
    block = Block(tiny.config)
    x = torch.randn(2, 16, tiny.config.hidden_size)
    from exporter.model import rope_tables
    cos, sin = rope_tables(tiny.config, torch.arange(16))
    with InputRecorder(block, full=True, prefix="layers.3.") as rec:
        block(x, cos, sin, None, 0, 0)
        block(x, cos, sin, None, 0, 0)
    st = rec.stats
    assert st["layers.3.attention.wq.weight"] is st["layers.3.attention.wv.weight"]
    assert st["layers.3.feed_forward.w1.weight"] is st["layers.3.feed_forward.w3.weight"]
    assert st["layers.3.attention.wq.weight"] is not st["layers.3.attention.wo.weight"]
    wq = st["layers.3.attention.wq.weight"]
    assert wq.tokens == 64 and wq.xtx.shape == (tiny.config.hidden_size,) * 2
    diag = InputStats.of(x, full=False)
    assert len(block._forward_pre_hooks) == 0 and not any(m._forward_pre_hooks for m in block.modules())
    # E[x^2] agrees between the full and the diagonal record of the same input (wq reads rms(x), not x)
    torch.testing.assert_close(InputStats.of(x, full=True).importance, diag.importance)


def test_recipe_quantizer_key(tmp_path):
    src = get_recipe("tiny").source.read_text()
    p = tmp_path / "r.toml"
    p.write_text('quantizer = "clip"\n' + src)
    assert parse_recipe(p).quantizer == "clip"
    p.write_text('quantizer = "awq"\n' + src)
    with pytest.raises(ExportError, match="unknown quantizer 'awq'"):
        parse_recipe(p)


def test_tiny_ships_gptq(tiny_quantized):
    qm, _, report = tiny_quantized
    assert qm.quantizer == "gptq" and report.loss_pct < report.threshold_pct
