"""Quantizers: how the values of a quantized tensor are chosen (the layouts are exporter/quant.py).

``QUANTIZERS``, selected per recipe (``quantizer = "gptq" | "clip"`` in recipes/*.toml, default gptq):

- ``clip``: activation-aware clipping search. Each group's scale is chosen from quant.CLIP_GRID to
  minimise the squared error weighted by E[x^2] of the layer's input channels; values round to nearest.
- ``gptq``: GPTQ-class error-compensating rounding (Frantar et al. 2022) on the same grid. A weight's
  columns are rounded left to right and each rounding error is pushed onto the not-yet-rounded
  columns through the inverse of the input covariance X^T X, so the layer's outputs, not its weights,
  stay close (one Cholesky factorisation per input, updates in lazy batches of 128 columns, rows on
  two threads). Each group's scale is the clipping search's choice on the group's already-compensated
  weights; once every value is rounded, each row's scales are re-fitted jointly by least squares in
  the same X^T X metric (``refit_scales``: measured on tiny, q4f16_e8 +0.50% -> +0.31%, q4f16
  +0.98% -> +0.78%; bench/RESULTS.md). Sequential: each decoder layer's statistics are taken on the
  output of the layers before it as quantized (measured on tiny before the refit: q4f16_e8 +0.56% ->
  +0.50%, q4f16 +1.25% -> +0.98%). For int4
  tensors, the embedding / tied head included (its statistics are those of the head's input); int8
  tensors take the clipping search (GPTQ-rounding tiny's int8 embedding measured +0.52% vs +0.50%).

Both read ``InputStats`` that exporter/streaming.py gathers from calibration text one decoder layer at a
time (``InputRecorder``) for every target (the iOS package holds the same codes, targets/coreml/shipped.py).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .quant import GRIDS, GROUP, SEARCH_THREADS, Grid, QTensor, _search_scales, encode, quantize_weight

DAMP = 0.01          # GPTQ dampening, fraction of the mean diagonal of X^T X
ROWS_PER_CHUNK = 16384   # rows are independent in GPTQ: bounded memory for a 120k-row embedding
BLOCK = 128          # GPTQ lazy batch: columns whose differences reach the later columns in one product


@dataclass
class InputStats:
    """Second moments of one weight's input over ``tokens`` calibration tokens: X^T X [in, in]
    (``full``) or only its diagonal [in]."""
    tokens: int
    xtx: torch.Tensor
    factors: "HessianFactors | None" = None    # hessian_factors(xtx), once

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self.xtx.dim() == 2:
            self.xtx.addmm_(x.T, x)
        else:
            self.xtx += x.pow(2).sum(0)

    @staticmethod
    def of(x: torch.Tensor, full: bool) -> "InputStats":
        n = x.shape[-1]
        stats = InputStats(0, torch.zeros((n, n) if full else (n,)))
        stats.add(x)
        return stats

    @property
    def importance(self) -> torch.Tensor:
        """E[x^2] per input channel."""
        d = self.xtx.diagonal() if self.xtx.dim() == 2 else self.xtx
        return d / max(self.tokens, 1)


class InputRecorder:
    """Forward pre-hooks recording InputStats for every nn.Linear in ``module`` under the key
    ``prefix + module path + ".weight"`` (canonical names). Linears reading the same tensor (wq/wk/wv,
    w1/w3) share one record. Use as a context manager (the hooks are removed on exit)."""

    def __init__(self, module: torch.nn.Module, full: bool, prefix: str = ""):
        self.stats: dict[str, InputStats] = {}
        self.full = full
        self._last: tuple[torch.Tensor | None, str] = (None, "")
        self._hooks = [mod.register_forward_pre_hook(partial(self._hook, f"{prefix}{name}.weight"))
                       for name, mod in module.named_modules() if isinstance(mod, torch.nn.Linear)]

    def _hook(self, key: str, _mod, args) -> None:
        x = args[0]
        if x is self._last[0]:
            self.stats[key] = self.stats[self._last[1]]
            return
        self._last = (x, key)
        if key in self.stats:
            self.stats[key].add(x)
        else:
            self.stats[key] = InputStats.of(x, self.full)

    def __enter__(self) -> "InputRecorder":
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._last = (None, "")


@contextmanager
def one_thread():
    """Many small sequential ops: extra intra-op threads only spin (measured 30x slower on a busy
    2-core machine; the GPTQ factorisation of a 5760-wide X^T X: 8 s on one thread, 40 s on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass(frozen=True)
class HessianFactors:
    """GPTQ's view of one input's X^T X, normalised to mean diagonal 1 and dampened (H), factorised
    once per input (weights reading it share it). H = R R^T with R upper triangular (the Cholesky
    factor of H with its index order reversed): R^-1 is the upper Cholesky factor of H^-1 that GPTQ's
    updates are usually written with, so one factorisation replaces factor-invert-factor."""
    update: torch.Tensor       # R with each column divided by its diagonal entry (unit upper) [in, in]
    group_inv: torch.Tensor    # inverse of each GROUP x GROUP diagonal block of ``update`` [in/GROUP, G, G]
    importance: torch.Tensor   # diag(H) per group [in/GROUP, GROUP]: the scale search's weights
    h: torch.Tensor            # H [in, in]: the metric of the scale refit


@torch.no_grad()
def hessian_factors(xtx: torch.Tensor, damp: float = DAMP) -> HessianFactors:
    n = xtx.shape[0]
    H = xtx.float().clone()
    H /= H.diagonal().mean().clamp_min(1e-12)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp)
    with one_thread():
        R = torch.linalg.cholesky(H.flip(0, 1)).flip(0, 1)
        unit = R.div_(R.diagonal().clone())
        blocks = unit.unfold(0, GROUP, GROUP).unfold(1, GROUP, GROUP).diagonal(dim1=0, dim2=1).permute(2, 0, 1)
        group_inv = torch.linalg.solve_triangular(blocks.contiguous(), torch.eye(GROUP).expand_as(blocks).contiguous(),
                                                  upper=True, unitriangular=True)
    return HessianFactors(unit, group_inv, H.diagonal().clone().reshape(n // GROUP, GROUP), H)


@torch.no_grad()
def gptq(w: torch.Tensor, xtx: torch.Tensor, grid: Grid, damp: float = DAMP,
         rows_per_chunk: int = ROWS_PER_CHUNK,
         factors: HessianFactors | None = None, threads: int = SEARCH_THREADS,
         refit: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (grid values int8 [out, in], float16-exact scales [out, in/GROUP]), w ~= value * scale.
    ``factors``: hessian_factors(xtx, damp) when already computed (weights sharing an input);
    ``refit``: re-fit the scales to the final values (refit_scales; False: textbook GPTQ)."""
    out, n = w.shape
    if n % GROUP:
        raise ValueError(f"input dim {n} is not a multiple of the group size {GROUP}")
    f = factors if factors is not None else hessian_factors(xtx, damp)
    values = torch.empty(out, n, dtype=torch.int8)     # grid values are small integers
    scales = torch.empty(out, n // GROUP)
    step = min(rows_per_chunk, -(-out // threads))

    def part(r0: int) -> None:
        rows = slice(r0, r0 + step)
        _gptq_rows(w[rows], f, grid, values[rows], scales[rows])
        if refit:
            scales[rows] = refit_scales(w[rows], values[rows], scales[rows], f.h)

    with one_thread(), ThreadPoolExecutor(threads, thread_name_prefix="gptq") as pool:
        list(pool.map(part, range(0, out, step)))     # rows are independent: one torch thread each
    return values, scales


def _gptq_rows(w: torch.Tensor, f: HessianFactors, grid: Grid, values: torch.Tensor, scales: torch.Tensor) -> None:
    """GPTQ in lazy batches of BLOCK columns, written with R (H = R R^T): with D = W - Q the rounding
    differences so far, column k is rounded at W_k + sum_{i<k} D_i R_ik / R_kk. Transposed
    ([in, rows]): the column being rounded is one contiguous row."""
    n = w.shape[1]
    WT = w.float().T.contiguous()
    CT = torch.zeros_like(WT)        # sum_{i<k} D_i R_ik / R_kk from the columns rounded so far
    VT = torch.empty_like(WT)
    U = f.update
    for b0 in range(0, n, BLOCK):
        b1 = min(n, b0 + BLOCK)
        D = torch.empty(b1 - b0, WT.shape[1])
        for g0 in range(b0, b1, GROUP):
            g, e = g0 // GROUP, g0 + GROUP
            Dg = D[g0 - b0:e - b0]
            s = _group(WT[g0:e], CT[g0:e], f, g, grid, VT[g0:e], Dg)
            scales[:, g] = s
            if e < b1:
                CT[e:b1].addmm_(U[g0:e, e:b1].T, Dg)
        if b1 < n:
            CT[b1:].addmm_(U[b0:b1, b1:].T, D)
    values.copy_(VT.T)


def _group(W, C, f: HessianFactors, g: int, grid: Grid, V, D) -> torch.Tensor:
    """One group's columns [GROUP, rows]: its scale per row (the clipping search on the weights as
    compensated for every earlier column), then the values V and differences D column by column."""
    b = g * GROUP
    U = f.update[b:b + GROUP, b:b + GROUP]
    # W + C is a column's value once the group's earlier columns are rounded; the weights as updated
    # for every earlier group (what the textbook column loop's scale search sees) are W + C U_gg^-1
    S = torch.addmm(W, f.group_inv[g].T, C)
    s = _search_scales(S.T.contiguous().reshape(-1, 1, GROUP), f.importance[g:g + 1], grid, threads=1)[:, 0]
    Wc = W + C
    for i in range(GROUP):
        q = torch.div(Wc[i], s, out=V[i]).round_().clamp_(grid.qmin, grid.qmax)
        torch.sub(W[i], q * s, out=D[i])
        Wc[i + 1:].addr_(U[i, i + 1:], D[i])
    return s


@torch.no_grad()
def refit_scales(w: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, h: torch.Tensor,
                 rows_per_chunk: int = 4096) -> torch.Tensor:
    """The group scales that, given the grid values, minimise each row's layer-output error
    (w - v*s) H (w - v*s)^T: per row a [in/GROUP]^2 least-squares system M^T H M s = M^T H w, M
    placing the values of group g in column g. Rounded to float16; a group whose refit scale is not
    positive keeps its scale, and a row keeps all of them unless the rounded refit lowers its error."""
    out, n = w.shape
    G = n // GROUP
    new = scales.clone()
    for r0 in range(0, out, rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        V = values[rows].float()
        Vg, S = V.view(-1, G, GROUP), scales[rows]
        A = torch.empty(V.shape[0], G, G)
        for g in range(G):      # row g of M^T H M: group g's values times H, summed per group with the values
            part = V[:, g * GROUP:(g + 1) * GROUP] @ h[g * GROUP:(g + 1) * GROUP]
            A[:, g] = (part.view(-1, G, GROUP) * Vg).sum(-1)
        resid = w[rows].float() - (Vg * S[..., None]).reshape(-1, n)
        b = ((resid @ h).view(-1, G, GROUP) * Vg).sum(-1)                      # M^T H (w - M s)
        ridge = 1e-6 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        delta = torch.linalg.solve(A + torch.diag_embed(ridge[:, None].expand(-1, G)), b)
        cand = (S + delta).half().float()
        step = torch.where(cand > 0, cand - S, torch.zeros_like(S))
        change = (step[:, :, None] * A * step[:, None, :]).sum((1, 2)) - 2 * (b * step).sum(-1)
        new[r0:r0 + rows_per_chunk] = torch.where((change < 0)[:, None], S + step, S)
    return new


def _clip(w: torch.Tensor, bits: int, stats: InputStats | None) -> QTensor:
    return QTensor(bits, *quantize_weight(w, bits, None if stats is None else stats.importance))


def _gptq(w: torch.Tensor, bits: int, stats: InputStats | None) -> QTensor:
    if bits != 4 or stats is None or stats.xtx.dim() != 2:
        return _clip(w, bits, stats)
    if stats.factors is None:       # shared by the weights reading the same input (wq/wk/wv, w1/w3)
        stats.factors = hessian_factors(stats.xtx)
    values, scales = gptq(w, stats.xtx, GRIDS[bits], factors=stats.factors)
    return QTensor(bits, encode(values, bits), scales.half().numpy())


@dataclass(frozen=True)
class Quantizer:
    name: str
    description: str
    full_covariance: bool      # needs X^T X (else E[x^2] only)
    sequential: bool           # statistics of layer i+1 from layer i's quantized output (GPTQ's order)
    run: Callable[[torch.Tensor, int, "InputStats | None"], QTensor]   # (w [out, in], bits, stats)


QUANTIZERS = {
    "gptq": Quantizer("gptq", "GPTQ error-compensating rounding, activation-aware clipped scales", True, True, _gptq),
    "clip": Quantizer("clip", "activation-aware clipping search, round to nearest", False, False, _clip),
}
DEFAULT_QUANTIZER = "gptq"
