"""Prepare weights for Core ML's own int4 quantizer so that it lands on well-chosen values.

coremltools' linear_quantize_weights (linear_symmetric, int4, per_block 32) rounds to nearest on the
grid scale * [-7, 7] with scale = max|w| / 7 of each (row, 32-block). Feeding it weights that already
sit on such a grid, with each block's largest magnitude at exactly 7 steps, makes it reproduce them
exactly. Those weights are chosen here, per linear layer, from calibration statistics:

the shared GPTQ quantizer (exporter/quantizers.py: error-compensating rounding, activation-aware
clipped scales) run on Core ML's grid [-7, 7] instead of q4f16's [-7, 8].

When error compensation leaves a block's largest code below 7, Core ML picks a finer scale for that
block and re-rounds it (a small extra error, visible in the measured perplexity). Verification always
compares against the weights the package actually holds.
"""
from __future__ import annotations

import torch

from exporter.model import MiniCPM
from exporter.quality import WINDOW, windows
from exporter.quant import GROUP, Grid, is_linear
from exporter.quantizers import InputRecorder, gptq, one_thread

QMAX = 7          # coremltools int4 linear_symmetric range is [-7, 7]
COREML_GRID = Grid(-QMAX, QMAX)
QUANTIZER = "gptq"   # exporter.quantizers name of what this module runs (the ios manifest says it)


@torch.no_grad()
def input_covariance(model: MiniCPM, ids: list[int], count: int) -> dict[str, torch.Tensor]:
    """X^T X of the input of every linear layer over ``count`` calibration windows (canonical names).

    Layers reading the same input (wq/wk/wv, w1/w3) share one matrix."""
    with one_thread(), InputRecorder(model, full=True) as rec:
        for w in windows(ids, WINDOW, count):
            model(torch.tensor([w]))
    return {k: st.xtx for k, st in rec.stats.items()}


@torch.no_grad()
def gptq_weight(w: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """w [out, in] -> weights on Core ML's per-block int4 grid, chosen by the shared GPTQ."""
    values, scales = gptq(w, cov, COREML_GRID)
    out, n = w.shape
    return (values.float().reshape(out, n // GROUP, GROUP) * scales[..., None]).reshape(out, n).to(w.dtype)


def prequantize_state_dict(state: dict[str, torch.Tensor], cov: dict[str, torch.Tensor],
                           on_tensor=lambda name: None, store=None,
                           consume: bool = False) -> dict[str, torch.Tensor]:
    """Every linear weight moved onto its int4 grid (GPTQ); other tensors unchanged.

    ``store(tensor) -> tensor`` is applied to each new weight (the ios target maps them from files);
    ``consume`` deletes each matrix from ``cov`` once used (shared ones go with their last user)."""
    out = {}
    with one_thread():
        for name, w in state.items():
            if is_linear(name) and w.shape[1] % GROUP == 0 and name in cov:
                q = gptq_weight(w, cov[name])
                out[name] = store(q) if store is not None else q
                del q
                if consume:
                    del cov[name]
                on_tensor(name)
            else:
                out[name] = w
    return out
