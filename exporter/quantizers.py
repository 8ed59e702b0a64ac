"""Quantizers: how the values of a quantized tensor are chosen (the layouts are exporter/quant.py).

``QUANTIZERS``, selected per recipe (``quantizer = "gptq" | "clip"`` in recipes/*.toml, default gptq):

- ``clip``: activation-aware clipping search. Each group's scale is chosen from quant.CLIP_GRID to
  minimise the squared error weighted by E[x^2] of the layer's input channels; values round to nearest.
- ``gptq``: GPTQ-class error-compensating rounding (Frantar et al. 2022) on the same grid. A weight's
  columns are rounded left to right and each rounding error is pushed onto the not-yet-rounded
  columns through the inverse of the input covariance X^T X, so the layer's outputs, not its weights,
  stay close. Each group's scale is the clipping search's choice on the group's already-compensated
  weights. Sequential: each decoder layer's statistics are taken on the output of the layers before
  it as quantized (measured on tiny: q4f16_e8 +0.56% -> +0.50%, q4f16 +1.25% -> +0.98%). For int4
  tensors, the embedding / tied head included (its statistics are those of the head's input); int8
  tensors take the clipping search (GPTQ-rounding tiny's int8 embedding measured +0.52% vs +0.50%).

Both read ``InputStats`` that exporter/streaming.py gathers from calibration text one decoder layer at a
time (``InputRecorder``) for every target (the iOS package holds the same codes, targets/coreml/shipped.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .quant import GRIDS, GROUP, Grid, QTensor, _search_scales, encode, quantize_weight

DAMP = 0.01          # GPTQ dampening, fraction of the mean diagonal of X^T X
ROWS_PER_CHUNK = 16384   # rows are independent in GPTQ: bounded memory for a 120k-row embedding


@dataclass
class InputStats:
    """Second moments of one weight's input over ``tokens`` calibration tokens: X^T X [in, in]
    (``full``) or only its diagonal [in]."""
    tokens: int
    xtx: torch.Tensor
    factors: tuple[torch.Tensor, torch.Tensor] | None = None    # hessian_factors(xtx), once

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


@torch.no_grad()
def hessian_factors(xtx: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the inverse of the dampened, normalised X^T X; its diagonal per
    group [in/GROUP, GROUP], the clipping search's importance)."""
    n = xtx.shape[0]
    H = xtx.float().clone()
    H /= H.diagonal().mean().clamp_min(1e-12)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp)
    imp = H.diagonal().clone().reshape(n // GROUP, GROUP)
    with one_thread():
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), imp


@torch.no_grad()
def gptq(w: torch.Tensor, xtx: torch.Tensor, grid: Grid, damp: float = DAMP,
         rows_per_chunk: int = ROWS_PER_CHUNK,
         factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (grid values int8 [out, in], float16-exact scales [out, in/GROUP]), w ~= value * scale.
    ``factors``: hessian_factors(xtx, damp) when already computed (weights sharing an input)."""
    out, n = w.shape
    if n % GROUP:
        raise ValueError(f"input dim {n} is not a multiple of the group size {GROUP}")
    Hinv, imp = factors if factors is not None else hessian_factors(xtx, damp)
    values = torch.empty(out, n, dtype=torch.int8)     # grid values are small integers
    scales = torch.empty(out, n // GROUP)
    with one_thread():
        _gptq_rows(w, Hinv, imp, grid, values, scales, rows_per_chunk)
    return values, scales


def _gptq_rows(w, Hinv, imp, grid, values, scales, rows_per_chunk) -> None:
    out, n = w.shape
    for r0 in range(0, out, rows_per_chunk):
        # transposed ([in, rows]): the column being rounded is one contiguous row
        WT = w[r0:r0 + rows_per_chunk].float().T.contiguous()
        VT = torch.empty_like(WT)
        for g, b in enumerate(range(0, n, GROUP)):
            Wb, Hb = WT[b:b + GROUP], Hinv[b:b + GROUP, b:b + GROUP]
            s = _search_scales(Wb.T.contiguous().reshape(-1, 1, GROUP), imp[g:g + 1], grid)[:, 0]
            scales[r0:r0 + rows_per_chunk, g] = s
            err = torch.empty_like(Wb)
            for i in range(GROUP):
                q = torch.div(Wb[i], s, out=VT[b + i]).round_().clamp_(grid.qmin, grid.qmax)
                torch.div(Wb[i] - q * s, Hb[i, i], out=err[i])
                Wb[i + 1:].sub_(Hb[i, i + 1:, None] * err[i])
            WT[b + GROUP:].addmm_(Hinv[b:b + GROUP, b + GROUP:].T, err, alpha=-1.0)
        values[r0:r0 + rows_per_chunk] = VT.T


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
