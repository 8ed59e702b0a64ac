"""6-bit palettized tied embedding / LM head (Core ML ``constexpr_lut_to_dense``, iOS 18).

Layout (built by coremltools' ``palettize_weights``, values chosen here):
- every row (token) is divided by its float16 largest magnitude; that scale is applied in the graph
  (after the gather, on the logits: wrapper.py), not as a constexpr (see convert.palettize_config);
- the normalised matrix is split into groups of ``LUT_GROUP`` hidden columns; each group has its own
  table of 64 float16 values and every weight is a 6-bit index into its group's table.

Rows cannot be grouped instead: MiniCPM-2B's vocabulary (122753) is prime, and a table per row would
cost 128 bytes per row. The table of a group is a 1-D k-means of its values (start: quantiles of
density^(1/3), then Lloyd steps) run on the histogram of distinct float16 values, so beyond one
counting pass its cost does not grow with the number of weights (283M for MiniCPM-2B: 15 s).
Measured on tiny (bench/RESULTS.md): perplexity equal to the int8 embedding's within noise; an
activation-aware (GPTQ) rounding of the head side halved the head's output error but did not change
perplexity, so it is not used.
"""
from __future__ import annotations

import numpy as np

LUT_BITS = 6
LUT_GROUP = 32          # hidden columns sharing one table
LLOYD_STEPS = 100


def kmeans_lut(values: np.ndarray, bits: int = LUT_BITS, steps: int = LLOYD_STEPS) -> np.ndarray:
    """Sorted float16 table of 2**bits entries minimising the squared error of ``values`` (float16)."""
    codes = np.ascontiguousarray(values, dtype=np.float16).reshape(-1).view(np.uint16)
    counts = np.bincount(codes, minlength=1 << 16)
    present = np.flatnonzero(counts)
    x = present.astype(np.uint16).view(np.float16).astype(np.float64)
    w = counts[present].astype(np.float64)
    keep = np.isfinite(x)
    x, w = x[keep], w[keep]
    order = np.argsort(x)
    x, w = x[order], w[order]
    k = 1 << bits
    # start: quantiles of density^(1/3) (the high-resolution optimum for squared error), then Lloyd
    edges = np.linspace(x[0], x[-1], 1025)
    dens = np.histogram(x, edges, weights=w)[0] ** (1 / 3)
    cum = np.concatenate([[0.0], np.cumsum(dens)]) / max(dens.sum(), 1e-300)
    lut = np.interp((np.arange(k) + 0.5) / k, cum, edges)
    for _ in range(steps):
        idx = np.searchsorted((lut[1:] + lut[:-1]) / 2, x)
        wsum = np.bincount(idx, w, k)
        new = np.where(wsum > 0, np.bincount(idx, w * x, k) / np.maximum(wsum, 1e-300), lut)
        new.sort()
        if np.array_equal(new, lut):
            break
        lut = new
    return np.sort(lut.astype(np.float16))


def nearest(values: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of the sorted table ``lut`` for every value (flattened, uint8)."""
    mids = (lut[1:].astype(np.float32) + lut[:-1].astype(np.float32)) / 2
    return np.searchsorted(mids, values.reshape(-1).astype(np.float32)).astype(np.uint8)


def lut_function(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """coremltools ``OpPalettizerConfig(mode="custom")`` callback: one group's table and indices."""
    lut = kmeans_lut(group)
    return lut, nearest(group, lut)


def dequantize(weight: np.ndarray) -> np.ndarray:
    """What the package will hold for ``weight`` [rows, cols] (float32), for tests and estimates."""
    w = np.asarray(weight, np.float16)
    scale = np.abs(w).max(axis=1, keepdims=True)
    scale[scale == 0] = 1
    norm = w / scale
    out = np.empty(w.shape, np.float32)
    for c in range(0, w.shape[1], LUT_GROUP):
        lut = kmeans_lut(norm[:, c:c + LUT_GROUP])
        out[:, c:c + LUT_GROUP] = lut[nearest(norm[:, c:c + LUT_GROUP], lut)].reshape(w.shape[0], -1)
    return out * scale.astype(np.float32)


def packed_bytes(rows: int, cols: int, bits: int = LUT_BITS, group: int = LUT_GROUP) -> int:
    """Bytes of the palettized embedding in weight.bin, before blob alignment: indices, tables, row scales."""
    return -(-rows * cols * bits // 8) + (cols // group) * (1 << bits) * 2 + rows * 2


def shared_lut_function(pieces: list[np.ndarray]):
    """``lut_function`` for the --ane-head pieces of one matrix (row blocks, in order): every piece gets
    the tables of the whole matrix, the ones an unsplit package has, so both packages hold the same
    weights. coremltools calls the function once per group of LUT_GROUP columns, op after op and the
    groups of an op in column order, so the call count modulo the groups per op names the group."""
    groups = pieces[0].shape[1] // LUT_GROUP
    tables = [kmeans_lut(np.concatenate([p[:, g * LUT_GROUP:(g + 1) * LUT_GROUP] for p in pieces]))
              for g in range(groups)]
    calls = iter(range(1 << 62))

    def lut_for(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lut = tables[next(calls) % groups]
        return lut, nearest(group, lut)
    return lut_for
