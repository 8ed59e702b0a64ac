"""VisionConfig: everything the vision path needs, from config.json, the recipe and tensor shapes.

Widths, depth, MLP size, patch size and the ViT position grid are read off the checkpoint's
tensor shapes (so a tiny test checkpoint needs no special fields); the number of ViT heads
cannot be, so it comes from the table of known encoders keyed by config.json "vision_encoder".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import ExportError

# config.json "vision_encoder" -> number of attention heads of the ViT
ENCODER_HEADS: dict[str, int] = {
    "vit_so400m_patch14_siglip_384.webli": 16,   # MiniCPM-V 1.0 / 2.0 (SigLIP so400m, width 1152)
    "vit_so400m_patch14_siglip_384": 16,
    "mcpm_tiny_siglip": 4,                        # tests/support/tiny_minicpmv.py
}


@dataclass(frozen=True)
class VisionConfig:
    version: int              # 1: fixed 448x448 image; 2: LLaVA-UHD slices, adaptive resampler
    width: int                # ViT width (1152)
    depth: int                # ViT blocks actually used (26 of 27)
    heads: int                # ViT heads (16)
    mlp: int                  # ViT MLP width (4304)
    patch: int                # 14
    pos_grid: int             # side of the learned ViT position grid (27 for 384/14)
    hidden: int               # LLM hidden size = resampler width
    query_num: int = 64
    image_size: int = 448     # V1 input side
    scale_resolution: int = 448
    max_slice_nums: int = 9
    slicing: bool = True
    has_kv_proj: bool = True  # absent (identity) when ViT width == LLM hidden
    eps: float = 1e-6         # LayerNorm eps of ViT and resampler
    mean: float = 0.5         # IMAGENET_INCEPTION mean/std, every channel
    std: float = 0.5

    @property
    def resampler_heads(self) -> int:
        return max(self.hidden // 128, 1)

    @property
    def query_grid(self) -> int:
        return int(math.isqrt(self.query_num))

    @property
    def adaptive(self) -> bool:
        return self.version >= 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, raw: dict, shapes: dict[str, tuple], recipe_vision: dict | None = None,
                        where: str = "config.json") -> "VisionConfig":
        rv = dict(recipe_vision or {})
        enc = raw.get("vision_encoder")
        if enc not in ENCODER_HEADS:
            raise ExportError(f"{where}: vision_encoder '{enc}' is not a known encoder "
                              f"(known: {', '.join(ENCODER_HEADS)})")

        def shape(name):
            if name not in shapes:
                raise ExportError(f"{where}: checkpoint lacks tensor '{name}'")
            return shapes[name]

        width, _, patch, _ = shape("vpm.patch_embed.proj.weight")
        npos = shape("vpm.pos_embed")[1]
        grid = math.isqrt(npos)
        if grid * grid != npos:
            raise ExportError(f"{where}: vpm.pos_embed has {npos} positions, not a square grid")
        blocks = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("vpm.blocks.")})
        if blocks != list(range(len(blocks))) or not blocks:
            raise ExportError(f"{where}: vpm.blocks are not numbered 0..N-1 ({blocks[:5]}...)")
        # drop_vision_last_layer is applied when OpenBMB's model is built, so its saved
        # checkpoints hold only the kept blocks (26 of so400m's 27): use every block present.
        depth = len(blocks)
        mlp = shape("vpm.blocks.0.mlp.fc1.weight")[0]
        q, hidden = shape("resampler.query")
        version = int(rv.get("version", 2 if raw.get("slice_mode", False) else 1))
        cfg = cls(
            version=version, width=int(width), depth=depth, heads=ENCODER_HEADS[enc], mlp=int(mlp),
            patch=int(patch), pos_grid=grid, hidden=int(hidden),
            query_num=int(raw.get("query_num", rv.get("query_num", q))),
            image_size=int(rv.get("image_size", raw.get("image_size", 448))),
            scale_resolution=int(rv.get("scale_resolution", raw.get("scale_resolution", 448))),
            max_slice_nums=int(rv.get("max_slice_nums", raw.get("max_slice_nums", 9))),
            slicing=bool(rv.get("slicing", raw.get("slice_mode", version >= 2))),
            has_kv_proj="resampler.kv_proj.weight" in shapes,
        )
        if cfg.query_num != q:
            raise ExportError(f"{where}: query_num={cfg.query_num} but resampler.query has {q} rows")
        if cfg.patch != int(rv.get("patch_size", raw.get("patch_size", cfg.patch))):
            raise ExportError(f"{where}: patch_size disagrees with vpm.patch_embed ({cfg.patch})")
        if cfg.width % cfg.heads or cfg.hidden % cfg.resampler_heads:
            raise ExportError(f"{where}: widths {cfg.width}/{cfg.hidden} do not split into heads")
        if not cfg.has_kv_proj and cfg.width != cfg.hidden:
            raise ExportError(f"{where}: resampler.kv_proj.weight missing but ViT width "
                              f"{cfg.width} != LLM hidden {cfg.hidden}")
        return cfg
