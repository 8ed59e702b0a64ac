"""Numpy helpers every runtime needs before calling the compiled vision function.

The compiled function (see model.VisionEncoder) takes, per encoded image of h x w patches:
  patches    float32 [N, 3*p*p]  normalised pixels, N = h*w patches row-major, each patch
                                 flattened channel-major (c, y, x)
  pos_interp float32 [N, P*P]    kron(interp_h [h,P], interp_w [w,P]): antialiased-bicubic
                                 resample of the ViT position grid (P = 27 for so400m-384)
  key_pos    float32 [N, D]      resampler key position embedding (2D sin-cos for V2)
These are small, shape-only (or pixel-only) computations; a phone runner must port them.
"""
from __future__ import annotations

import numpy as np


def normalise(image, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """PIL RGB image -> float32 [3, H, W], (x/255 - mean)/std like torchvision ToTensor+Normalize."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    arr = (arr - np.float32(mean)) / np.float32(std)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[3, H, W] -> [H/p, W/p, 3*p*p]; flattening order matches Conv2d weight [C, 3, p, p]."""
    c, H, W = pixels.shape
    if H % patch or W % patch:
        raise ValueError(f"image {W}x{H} is not a multiple of the patch size {patch}")
    h, w = H // patch, W // patch
    x = pixels.reshape(c, h, patch, w, patch).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(x.reshape(h, w, c * patch * patch))


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def aa_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of antialiased bicubic resampling (PyTorch antialias=True == PIL).

    timm resamples the ViT position grid with F.interpolate(bicubic, antialias=True); this is
    that 1D operator, so the 2D resample is interp_h @ grid @ interp_w.T.
    """
    if n_in == n_out:
        return np.eye(n_out, dtype=np.float32)
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        j = np.arange(lo, hi)
        w = _cubic((j - center + 0.5) * invscale)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m.astype(np.float32)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, h: int, w: int) -> np.ndarray:
    """[h, w, dim] 2D sin-cos table of OpenBMB's resampler (first half: column index, second: row)."""
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return emb.reshape(h, w, dim).astype(np.float32)


def encoder_inputs(image, vcfg, key_pos_fixed: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """All inputs of the compiled vision function for one (already resized) PIL image.

    key_pos_fixed: V1 only, the resampler's learned grid bicubic-resized to the fixed patch grid
    (stored in the bundle as vision/key_pos.bin); V2 computes the sin-cos table per slice.
    """
    pixels = normalise(image, vcfg.mean, vcfg.std)
    patches = patchify(pixels, vcfg.patch)
    h, w = patches.shape[:2]
    if vcfg.adaptive:
        key_pos = sincos_2d(vcfg.hidden, h, w)
    else:
        key_pos = None if key_pos_fixed is None else np.asarray(key_pos_fixed).reshape(-1, vcfg.hidden)
        if key_pos is None or key_pos.shape[0] != h * w:
            raise ValueError(f"V1 key position table does not fit a {h}x{w} patch grid")
    return {"patches": patches.reshape(h * w, -1),
            "pos_interp": np.kron(aa_bicubic_matrix(vcfg.pos_grid, h), aa_bicubic_matrix(vcfg.pos_grid, w)),
            "key_pos": np.ascontiguousarray(key_pos.reshape(h * w, -1), dtype=np.float32)}


INPUT_NAMES = ("patches", "pos_interp", "key_pos")
