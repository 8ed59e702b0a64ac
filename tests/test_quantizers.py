"""The quantizer registry: GPTQ vs the clipping search on the same grid, statistics, recipe selection."""
import numpy as np
import pytest
import torch

from exporter import quant
from exporter.errors import ExportError
from exporter.model import Block
from exporter.quantizers import QUANTIZERS, InputRecorder, InputStats, gptq
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
