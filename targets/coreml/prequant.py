"""Prepare weights for Core ML's own int4 quantizer so that it lands on well-chosen values.

coremltools' linear_quantize_weights (linear_symmetric, int4, per_block 32) rounds to nearest on the
grid scale * [-7, 7] with scale = max|w| / 7 of each (row, 32-block). Feeding it weights that already
sit on such a grid, with each block's largest magnitude at exactly 7 steps, makes it reproduce them
exactly. Those weights are chosen here, per linear layer, from calibration statistics:

- scale: per (row, block), the clipping range over exporter.quant.CLIP_GRID that minimises the
  error weighted by the layer's input second moments (activation-aware clipping);
- values: GPTQ-style error-compensating rounding (Frantar et al. 2022): columns are rounded left to
  right and each rounding error is pushed onto the not-yet-rounded columns through the inverse of
  the input covariance X^T X, so the layer's outputs, not its weights, stay close.

When error compensation leaves a block's largest code below 7, Core ML picks a finer scale for that
block and re-rounds it (a small extra error, visible in the measured perplexity). Verification always
compares against the weights the package actually holds.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from exporter.model import MiniCPM
from exporter.quality import WINDOW, windows
from exporter.quant import CLIP_GRID, GROUP, is_linear

QMAX = 7          # coremltools int4 linear_symmetric range is [-7, 7]
DAMP = 0.01       # GPTQ dampening, fraction of the mean diagonal of X^T X


@contextmanager
def one_thread():
    """Many small sequential ops: extra intra-op threads only spin (measured 30x slower on a busy
    2-core machine), so these passes run single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def input_covariance(model: MiniCPM, ids: list[int], count: int) -> dict[str, torch.Tensor]:
    """X^T X of the input of every linear layer over ``count`` calibration windows (canonical names).

    Layers reading the same input (wq/wk/wv, w1/w3) share one matrix."""
    cov: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    last = {"input": None, "key": None}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_mod, args, key=name + ".weight"):
                if args[0] is last["input"]:          # wk/wv after wq, w3 after w1: same input
                    alias[key] = last["key"]
                    return
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                cov[key] = cov[key] + x.T @ x if key in cov else x.T @ x
                last["input"], last["key"] = args[0], key
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with one_thread():
            for w in windows(ids, WINDOW, count):
                model(torch.tensor([w]))
                last["input"] = None
    finally:
        for h in hooks:
            h.remove()
    return {**cov, **{k: cov[v] for k, v in alias.items()}}


def clip_scales(w: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Per-row scale of one 32-column block w [out, 32]: best clip over CLIP_GRID, float16-exact."""
    imp = importance / importance.mean().clamp_min(1e-12)
    absmax = w.abs().amax(-1).clamp_min(1e-8)
    best_err = torch.full(absmax.shape, float("inf"))
    best = absmax / QMAX
    for ratio in CLIP_GRID:
        s = (absmax * float(ratio) / QMAX).half().float().clamp_min(1e-8)
        err = (((w / s[:, None]).round().clamp(-QMAX, QMAX) * s[:, None] - w).pow(2) * imp).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


@torch.no_grad()
def gptq_weight(w: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """w [out, in] -> weights on the per-block int4 grid, chosen by error-compensating rounding."""
    out, n = w.shape
    W = w.float().clone()
    H = cov.float() / cov.diagonal().mean().clamp_min(1e-12)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += DAMP * torch.eye(n)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for b in range(0, n, GROUP):
        Wb, Hb = W[:, b:b + GROUP].clone(), Hinv[b:b + GROUP, b:b + GROUP]
        s = clip_scales(Wb, H.diagonal()[b:b + GROUP])
        err = torch.zeros_like(Wb)
        for i in range(GROUP):
            q = (Wb[:, i] / s).round().clamp(-QMAX, QMAX)
            Q[:, b + i] = q * s
            err[:, i] = (Wb[:, i] - Q[:, b + i]) / Hb[i, i]
            Wb[:, i:] -= err[:, i:i + 1] @ Hb[i:i + 1, i:]
        W[:, b + GROUP:] -= err @ Hinv[b:b + GROUP, b + GROUP:]
    return Q.to(w.dtype)


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
