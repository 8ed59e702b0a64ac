"""Two-phase weight quantization: pack offline (here), dequantize at run time (in each target).

Layout q4f16 (MLC-LLM's q4f16_1, see docs/DESIGN.md): per output row, groups of 32 inputs, one fp16
scale per group, 4-bit codes q in 0..15 packed 8 per uint32 (element k in word k//8, bits 4*(k%8)),
w = (q - 7) * scale. Scheme q4f16_e8 keeps the embedding (and tied head) at 8 bits per group of 32.

This module owns the layouts end to end: the constants (group size, bits, zero point, packing order),
pack / unpack, and the dequantize expression every engine uses (NumPy here, TVM TE in targets/tvm).
How the values are chosen (clipping search, GPTQ) is exporter/quantizers.py.
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol

import numpy as np
import torch

from . import native

GROUP = 32           # inputs per fp16 scale (both int4 and int8)
Q4_BITS = 4
Q4_PER_WORD = 8      # codes per uint32 word; element k in word k // 8 at bits 4 * (k % 8)
Q4_MASK = 0xF
Q4_ZERO = 7          # w = (q - 7) * scale, q in 0..15
Q4_MIN, Q4_MAX = -7, 8
Q8_MAX = 127
CLIP_GRID = np.linspace(1.0, 0.55, 19)
SEARCH_THREADS = min(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class Grid:
    """Integer values a group's weights round to: w ~= value * scale, value in [qmin, qmax].
    Scales are searched from absmax * ratio / -qmin."""
    qmin: int
    qmax: int


GRIDS = {4: Grid(Q4_MIN, Q4_MAX), 8: Grid(-Q8_MAX, Q8_MAX)}


def dequant_q4_expr(word, k, scale, u32, f32):
    """Element k of a q4f16 row: ``word`` is that row's packed word k // Q4_PER_WORD, ``scale`` its
    group k // GROUP. u32 / f32 cast to uint32 / float32: NumPy (np.uint32, np.float32) or TVM TE
    (tirx.Cast), so the NumPy unpack and every TVM kernel evaluate the same expression."""
    code = (word >> (u32(k % Q4_PER_WORD) * u32(Q4_BITS))) & u32(Q4_MASK)
    return (f32(code) - f32(Q4_ZERO)) * f32(scale)


def dequant_q8_expr(value, scale, f32):
    """An int8 element times its group's fp16 scale (scheme q4f16_e8's embedding)."""
    return f32(value) * f32(scale)


@dataclass(frozen=True)
class Scheme:
    name: str
    linear_bits: int | None      # None: keep fp16
    embedding_bits: int | None
    description: str

    def bits_for(self, name: str) -> int | None:
        """Bits of canonical tensor ``name`` under this scheme (None: stored float16)."""
        return self.linear_bits if is_linear(name) else self.embedding_bits if is_embedding(name) else None


SCHEMES = {
    "q4f16": Scheme("q4f16", 4, 4, "int4 group-32 for every weight incl. embedding/tied head"),
    "q4f16_e8": Scheme("q4f16_e8", 4, 8, "int4 group-32 linears; embedding/tied head int8 group-32"),
    "fp16": Scheme("fp16", None, None, "fp16 weights, no quantization"),
}


# ---------------------------------------------------------------- NumPy reference pack / unpack
def pack_int4_reference(q: np.ndarray) -> np.ndarray:
    """Codes [out, in] in 0..15 -> uint32 [out, in/8]; slow, obvious loop (the spec)."""
    out, n = q.shape
    packed = np.zeros((out, n // 8), dtype=np.uint32)
    for k in range(n):
        packed[:, k // 8] |= q[:, k].astype(np.uint32) << np.uint32(4 * (k % 8))
    return packed


def unpack_int4_reference(packed: np.ndarray) -> np.ndarray:
    out, words = packed.shape
    q = np.zeros((out, words * 8), dtype=np.uint8)
    for k in range(words * 8):
        q[:, k] = (packed[:, k // 8] >> np.uint32(4 * (k % 8))) & 0xF
    return q


# ---------------------------------------------------------------- fast path
def pack_codes(q: np.ndarray) -> np.ndarray:
    """Codes [out, in] (uint8, 0..15) -> uint32 [out, in/8], vectorised."""
    out, n = q.shape
    q = q.reshape(out, n // 8, 8).astype(np.uint32)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    return np.bitwise_or.reduce(q << shifts, axis=2).astype(np.uint32)


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    out, words = packed.shape
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    return ((packed[:, :, None] >> shifts) & 0xF).astype(np.uint8).reshape(out, words * 8)


def unpack_int4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Dequantize q4f16 to float32 [out, in] (dequant_q4_expr over every element)."""
    out, words = packed.shape
    per_group = GROUP // Q4_PER_WORD        # broadcast [out, group, word, element]: no gathered copies
    k = np.arange(GROUP, dtype=np.uint32).reshape(per_group, Q4_PER_WORD)
    w = dequant_q4_expr(packed.reshape(out, -1, per_group, 1), k, scale.reshape(out, -1, 1, 1), np.uint32, np.float32)
    return w.reshape(out, words * Q4_PER_WORD)


def unpack_int8(q8: np.ndarray, scale: np.ndarray) -> np.ndarray:
    out, n = q8.shape
    return dequant_q8_expr(q8.reshape(out, -1, GROUP), scale.reshape(out, -1, 1), np.float32).reshape(out, n)


def encode(values: torch.Tensor, bits: int) -> np.ndarray:
    """Grid values [out, in] (integers in GRIDS[bits]) -> stored data: int4 packed codes
    (value + Q4_ZERO, uint32 [out, in/8]) or int8 [out, in]."""
    if bits == 4:
        return pack_codes((values + Q4_ZERO).to(torch.uint8).numpy())
    return values.to(torch.int8).numpy()


def _grid(grid: "int | Grid") -> Grid:
    return GRIDS[grid] if isinstance(grid, int) else grid


def _search_scales_reference(w: torch.Tensor, importance: torch.Tensor | None, grid: "int | Grid") -> torch.Tensor:
    """Per-group scale minimising importance-weighted squared error over CLIP_GRID. w: [R, G, 32].
    The obvious version of csrc/qsearch.c (which the quantizer runs: ~40x faster)."""
    qmin, qmax = _grid(grid).qmin, _grid(grid).qmax
    absmax = w.abs().amax(-1).clamp_min(1e-8)
    imp = torch.ones(w.shape[1:], dtype=w.dtype) if importance is None else importance
    best_err = torch.full(absmax.shape, float("inf"))
    best = absmax / (-qmin)
    for ratio in CLIP_GRID:
        s = (absmax * float(ratio) / (-qmin)).half().float().clamp_min(1e-8)
        deq = (w / s[..., None]).round().clamp(qmin, qmax) * s[..., None]
        err = ((deq - w).pow(2) * imp).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


@cache
def _search_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(SEARCH_THREADS, thread_name_prefix="qsearch")   # one for the process


def _search_scales(w: torch.Tensor, importance: torch.Tensor | None, grid: "int | Grid",
                   threads: int = SEARCH_THREADS) -> torch.Tensor:
    """csrc/qsearch.c over row blocks on ``threads`` threads (ctypes releases the GIL); threads=1 runs
    in the caller's thread (callers that are themselves pool workers)."""
    lib = native.load("qsearch")
    qmin, qmax = _grid(grid).qmin, _grid(grid).qmax
    rows, groups, _ = w.shape
    w = np.ascontiguousarray(w.numpy(), dtype=np.float32)
    imp = np.ones((groups, GROUP), np.float32) if importance is None else \
        np.ascontiguousarray(importance.numpy(), dtype=np.float32)
    grid = np.ascontiguousarray(CLIP_GRID, dtype=np.float32)
    out = np.empty((rows, groups), np.float32)
    ptr = lambda a, off=0: ctypes.c_void_p(a.ctypes.data + off)  # noqa: E731

    def block(r0: int, r1: int) -> None:
        lib.qsearch(ptr(w, r0 * w.strides[0]), ptr(imp), ctypes.c_int64(r1 - r0), ctypes.c_int64(groups),
                    ptr(grid), ctypes.c_int(len(grid)), ctypes.c_float(qmin), ctypes.c_float(qmax),
                    ptr(out, r0 * out.strides[0]))

    if threads <= 1 or rows < 64:
        block(0, rows)
        return torch.from_numpy(out)
    step = -(-rows // threads)
    list(_search_pool().map(lambda r0: block(r0, min(rows, r0 + step)), range(0, rows, step)))
    return torch.from_numpy(out)


def quantize_weight(w: torch.Tensor, bits: int, importance: torch.Tensor | None = None,
                    search: bool = True, rows_per_chunk: int = 4096):
    """w: [out, in] float -> (codes/values, fp16 scales). int4: (uint32 [out,in/8], f16 [out,in/32]);
    int8: (int8 [out,in], f16 [out,in/32]). importance: E[x^2] per input channel, shape [in]."""
    out, n = w.shape
    if n % GROUP:
        raise ValueError(f"input dim {n} is not a multiple of the group size {GROUP}")
    imp = None if importance is None else importance.float().reshape(n // GROUP, GROUP)
    if imp is not None:
        imp = imp / imp.mean().clamp_min(1e-12)
    packs, scales = [], []
    for r0 in range(0, out, rows_per_chunk):
        wc = w[r0:r0 + rows_per_chunk].float().reshape(-1, n // GROUP, GROUP)
        g = GRIDS[bits]
        if search:
            s = _search_scales(wc, imp, g)
        else:
            s = (wc.abs().amax(-1) / -g.qmin).half().float().clamp_min(1e-8)
        packs.append(encode((wc / s[..., None]).round().clamp(g.qmin, g.qmax).reshape(-1, n), bits))
        scales.append(s.half().numpy())
    return np.concatenate(packs), np.concatenate(scales)


@dataclass
class QTensor:
    """One quantized weight. bits 4: data uint32 [out, in/8]; bits 8: data int8 [out, in]."""
    bits: int
    data: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        out = self.data.shape[0]
        return (out, self.data.shape[1] * (Q4_PER_WORD if self.bits == 4 else 1))

    def dequantize(self) -> np.ndarray:
        return unpack_int4(self.data, self.scale) if self.bits == 4 else unpack_int8(self.data, self.scale)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes


class Encoded(Protocol):
    """A stored tensor: QTensor, or a target's own encoding (targets/coreml/palettize.Lut6)."""
    nbytes: int

    def dequantize(self) -> np.ndarray: ...


def dequantize(t: "Encoded | np.ndarray") -> np.ndarray:
    """float32 values of a stored tensor (an encoded one, or a float16 array)."""
    return t.dequantize() if hasattr(t, "dequantize") else t.astype(np.float32)


@dataclass
class QuantizedModel:
    """Canonical-name tensors: QTensor for quantized weights, fp16 numpy arrays for the rest (and a
    target codec's Encoded tensors, see exporter/streaming.py)."""
    scheme: Scheme
    tensors: dict[str, "Encoded | np.ndarray"] = field(default_factory=dict)
    quantizer: str = "rtn"       # which exporter/quantizers.py method chose the values

    def dequantized(self) -> dict[str, torch.Tensor]:
        """The float32 state dict the reference model runs for 'PyTorch int4'."""
        return {k: torch.from_numpy(dequantize(v)) for k, v in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.tensors.values())


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and (".attention.w" in name or ".feed_forward.w" in name)


def is_embedding(name: str) -> bool:
    return name in ("tok_embeddings.weight", "output.weight")


def quantize_state_dict(state: dict[str, torch.Tensor], scheme: str | Scheme,
                        importance: dict[str, torch.Tensor] | None = None,
                        search: bool = True, on_tensor=None) -> QuantizedModel:
    """Quantize every linear weight and the embedding/head per the scheme; the rest goes fp16.

    importance maps a canonical weight name to E[x^2] of its input channels (from calibration).
    on_tensor(name) is called after each tensor (progress)."""
    scheme = SCHEMES[scheme] if isinstance(scheme, str) else scheme
    qm = QuantizedModel(scheme, quantizer="clip" if search else "rtn")
    for name, w in state.items():
        bits = scheme.bits_for(name)
        if bits is None:
            qm.tensors[name] = w.to(torch.float16).numpy()
        else:
            imp = (importance or {}).get(name)
            qm.tensors[name] = QTensor(bits, *quantize_weight(w, bits, imp, search))
        if on_tensor:
            on_tensor(name)
    return qm
