"""PyTorch reference of the MiniCPM-V vision path, plus the export form traced for TVM and ONNX.

Reference (``MiniCPMVVision.reference_embed``) follows OpenBMB's published code: timm's SigLIP
VisionTransformer (dynamic_img_size, class-token free, attention-pool head removed, last block
dropped; position grid resampled with bicubic antialias) then the perceiver Resampler
(nn.MultiheadAttention over 64 learnable queries; V2 adaptive 2D sin-cos key positions,
V1 bicubic-resized learned grid). Parameter names are the checkpoint's (vpm.*, resampler.*).

Export form (``VisionEncoder``): the same maths on the same parameters, written with plain
matmuls so one traced graph serves every slice shape. Patch embedding is a matmul over
pre-cut patches and the position-grid resample is one matmul with the interpolation operator
kron(interp_h, interp_w) computed outside (preprocess.py); so the token count N = h*w is the
only dynamic dimension (one symbolic var keeps TVM's memory planning bounded).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .preprocess import sincos_2d


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))   # timm so400m uses exact (erf) GELU


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = Mlp(cfg.width, cfg.mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch, cfg.patch)


class SigLIPViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_grid ** 2, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """timm forward_features with dynamic_img_size / dynamic_img_pad: [B,3,H,W] -> [B,N,C]."""
        p, P = self.cfg.patch, self.cfg.pos_grid
        H, W = pixels.shape[-2:]
        pixels = F.pad(pixels, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.patch_embed.proj(pixels)                        # [B, C, h, w]
        B, C, h, w = x.shape
        pos = self.pos_embed
        if not (h == w == P):
            grid = pos.reshape(1, P, P, C).permute(0, 3, 1, 2).float()
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, C)
        x = x.flatten(2).transpose(1, 2) + pos
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Resampler(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        D = cfg.hidden
        self.cfg = cfg
        self.query = nn.Parameter(torch.zeros(cfg.query_num, D))
        self.pos_embed = nn.Parameter(torch.from_numpy(
            sincos_2d(D, cfg.query_grid, cfg.query_grid).reshape(-1, D)).clone())
        self.kv_proj = nn.Linear(cfg.width, D, bias=False) if cfg.has_kv_proj else nn.Identity()
        self.attn = nn.MultiheadAttention(D, cfg.resampler_heads)
        self.ln_q = nn.LayerNorm(D, eps=cfg.eps)
        self.ln_kv = nn.LayerNorm(D, eps=cfg.eps)
        self.ln_post = nn.LayerNorm(D, eps=cfg.eps)
        self.proj = nn.Parameter(torch.zeros(D, D))

    def key_pos(self, h: int, w: int) -> torch.Tensor:
        """[h*w, D] key positions: V2 sin-cos of the slice grid; V1 the learned grid resized (get_abs_pos)."""
        D = self.cfg.hidden
        if self.cfg.adaptive:
            return torch.from_numpy(sincos_2d(D, h, w).reshape(-1, D))
        g = self.cfg.query_grid
        if g == h == w:
            return self.pos_embed.detach().float()
        grid = self.pos_embed.detach().float().reshape(1, g, g, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(h * w, D)

    def forward(self, x: torch.Tensor, tgt: tuple[int, int]) -> torch.Tensor:
        """x [B, N, width] -> [B, query_num, D] (OpenBMB's Resampler.forward)."""
        pos = self.key_pos(*tgt).to(x.dtype)
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        B = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, B, 1) + self.pos_embed.unsqueeze(1),
                        x + pos.unsqueeze(1), x, need_weights=False)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


class MiniCPMVVision(nn.Module):
    """vpm + resampler with the checkpoint's parameter names."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.vpm = SigLIPViT(cfg)
        self.resampler = Resampler(cfg)

    @classmethod
    def from_state_dict(cls, cfg: VisionConfig, state: dict[str, torch.Tensor]) -> "MiniCPMVVision":
        model = cls(cfg)
        model.load_state_dict(state, strict=True)
        return model.eval()

    @torch.no_grad()
    def reference_embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """[3, H, W] normalised pixels of one image -> [query_num, hidden] (get_vision_embedding)."""
        p = self.cfg.patch
        tgt = (math.ceil(pixels.shape[-2] / p), math.ceil(pixels.shape[-1] / p))
        feats = self.vpm.forward_features(pixels.unsqueeze(0).float())
        return self.resampler(feats, tgt)[0]


class VisionEncoder(nn.Module):
    """Export form: (patches [N,3pp], pos_interp [N,P*P], key_pos [N,D]) -> [Q, D], N = h*w dynamic."""

    def __init__(self, vision: MiniCPMVVision):
        super().__init__()
        self.cfg = vision.cfg
        self.vpm = vision.vpm
        self.resampler = vision.resampler

    def forward(self, patches, pos_interp, key_pos):
        cfg, vpm, rs = self.cfg, self.vpm, self.resampler
        C, P, D = cfg.width, cfg.pos_grid, cfg.hidden
        x = F.linear(patches, vpm.patch_embed.proj.weight.reshape(C, -1), vpm.patch_embed.proj.bias)
        x = (x + torch.matmul(pos_interp, vpm.pos_embed.reshape(P * P, C))).unsqueeze(0)
        for blk in vpm.blocks:
            x = blk(x)
        kv = rs.ln_kv(rs.kv_proj(vpm.norm(x)[0]))                      # [N, D]
        q = rs.ln_q(rs.query) + rs.pos_embed                            # [Q, D]
        wq, wk, wv = rs.attn.in_proj_weight.chunk(3)
        bq, bk, bv = rs.attn.in_proj_bias.chunk(3)
        H = cfg.resampler_heads
        qh = F.linear(q, wq, bq).reshape(-1, H, D // H).transpose(0, 1)
        kh = F.linear(kv + key_pos, wk, bk).reshape(-1, H, D // H).transpose(0, 1)
        vh = F.linear(kv, wv, bv).reshape(-1, H, D // H).transpose(0, 1)
        out = F.scaled_dot_product_attention(qh, kh, vh).transpose(0, 1).reshape(-1, D)
        out = F.linear(out, rs.attn.out_proj.weight, rs.attn.out_proj.bias)
        return rs.ln_post(out) @ rs.proj


def key_pos_table(vision: MiniCPMVVision, h: int, w: int) -> np.ndarray:
    """[h, w, D] float32 key positions (the V1 fixed table stored in bundles)."""
    return vision.resampler.key_pos(h, w).reshape(h, w, -1).numpy().astype(np.float32)
