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

from dataclasses import dataclass

import numpy as np
import torch

from .wrapper import split_row_scale

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


@dataclass
class Lut6:
    """The palettized embedding as the package holds it: per group of LUT_GROUP columns a sorted
    float16 table, a 6-bit index per weight (kept as uint8) and a float16 scale per row."""
    tables: np.ndarray      # float16 [cols / LUT_GROUP, 2**LUT_BITS]
    indices: np.ndarray     # uint8 [rows, cols]
    row_scale: np.ndarray   # float16 [rows]

    @property
    def shape(self) -> tuple[int, int]:
        return self.indices.shape

    @property
    def nbytes(self) -> int:
        return packed_bytes(*self.shape)

    def rows(self) -> np.ndarray:
        """The normalised rows (table values), float32 [rows, cols]."""
        rows, cols = self.shape
        groups = np.arange(cols) // LUT_GROUP
        return self.tables[groups[None, :], self.indices].astype(np.float32).reshape(rows, cols)

    def dequantize(self) -> np.ndarray:
        """float32 [rows, cols] exactly as the package decompresses it (targets/coreml/verify.py)."""
        return self.rows() * self.row_scale.astype(np.float32)[:, None]


@dataclass(frozen=True)
class Lut6Codec:
    """exporter/streaming.py codec (targets.base.Quantization.codecs): weight -> Lut6."""
    name: str = "lut6"

    def encode(self, weight: torch.Tensor) -> Lut6:
        rows, scale = split_row_scale(weight)
        norm = rows.numpy().astype(np.float16)
        del rows
        indices = np.empty(norm.shape, np.uint8)
        tables = np.empty((norm.shape[1] // LUT_GROUP, 1 << LUT_BITS), np.float16)
        for g in range(tables.shape[0]):
            cols = slice(g * LUT_GROUP, (g + 1) * LUT_GROUP)
            tables[g] = kmeans_lut(norm[:, cols])
            indices[:, cols] = nearest(norm[:, cols], tables[g]).reshape(norm.shape[0], LUT_GROUP)
        return Lut6(tables, indices, scale.numpy().astype(np.float16))


def dequantize(weight: np.ndarray) -> np.ndarray:
    """What the package will hold for ``weight`` [rows, cols] (float32), for tests and estimates."""
    return Lut6Codec().encode(torch.from_numpy(np.asarray(weight, np.float32))).dequantize()


def packed_bytes(rows: int, cols: int, bits: int = LUT_BITS, group: int = LUT_GROUP) -> int:
    """Bytes of the palettized embedding in weight.bin, before blob alignment: indices, tables, row scales."""
    return -(-rows * cols * bits // 8) + (cols // group) * (1 << bits) * 2 + rows * 2


def table_lut_function(tables: np.ndarray):
    """``lut_function`` handing out precomputed tables (Lut6.tables, one per group of LUT_GROUP
    columns) for one matrix or its --ane-head pieces (row blocks, in order): every piece gets the
    tables of the whole matrix, so split and unsplit packages hold the same weights. coremltools calls
    the function once per group, op after op and the groups of an op in column order, so the call
    count modulo the groups per op names the group. The values it is handed are table entries
    (Lut6.rows()), so ``nearest`` gives back the encoded indices."""
    groups = tables.shape[0]
    calls = iter(range(1 << 62))

    def lut_for(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lut = tables[next(calls) % groups]
        return lut, nearest(group, lut)
    return lut_for
