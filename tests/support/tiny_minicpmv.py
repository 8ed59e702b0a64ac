"""Tiny random MiniCPM-V checkpoints in exactly OpenBMB's layout (vpm.*, resampler.*, llm.*).

The vision part is random (width 64, 2 ViT blocks kept, 27x27 position grid, patch 14, so every
slice shape of the real model appears); the text part is the trained tinycpm-docs model (hidden
256) with its vocabulary grown by the MiniCPM-V image pieces, so text-quality gates still mean
something (version 2 unties llm.lm_head.weight like MiniCPM-V-2). Sharded bf16 safetensors + index,
config.json, SentencePiece tokenizer.

    python -m tests.support.tiny_minicpmv OUT_DIR [--version 1|2]
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from exporter.recipes import EMBEDDED_DIR, Recipe  # noqa: E402

TEXT_MODEL = EMBEDDED_DIR / "tinycpm-docs"
IMAGE_PIECES = ["<image>", "</image>", "<slice>", "</slice>", "<ref>", "</ref>", "<box>", "</box>"]
VISION = dict(width=64, depth=2, heads=4, mlp=240, patch=14, pos_grid=27)


def _tokenizer_bytes() -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb
    m = pb.ModelProto()
    m.ParseFromString((TEXT_MODEL / "tokenizer.model").read_bytes())
    for piece in IMAGE_PIECES:
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
    return m.SerializeToString()


def _text_state(vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(TEXT_MODEL.glob("*.safetensors")):
        state.update(load_file(shard))
    emb = state["model.embed_tokens.weight"].float()
    extra = torch.randn(vocab - emb.shape[0], emb.shape[1], generator=g) * emb.std()
    state["model.embed_tokens.weight"] = torch.cat([emb, extra]).to(torch.bfloat16)
    return {"llm." + k: v for k, v in state.items()}


def _vision_state(version: int, hidden: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    from exporter.vision.config import VisionConfig
    from exporter.vision.model import MiniCPMVVision
    cfg = VisionConfig(version=version, hidden=hidden, **{k: VISION[k] for k in
                       ("width", "depth", "heads", "mlp", "patch", "pos_grid")}, slicing=version >= 2)
    model = MiniCPMVVision(cfg)
    out = {}
    for name, t in model.state_dict().items():
        if name == "resampler.pos_embed":
            val = t.clone()                                          # sin-cos table, as OpenBMB inits it
        elif name.endswith("bias"):
            val = 0.05 * torch.randn(t.shape, generator=g)
        elif t.dim() == 1:                                           # LayerNorm gains
            val = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        elif name in ("vpm.pos_embed", "resampler.query"):
            val = 0.5 * torch.randn(t.shape, generator=g)
        else:                                                        # matrices: unit-variance outputs
            fan_in = t[0].numel() if name != "resampler.proj" else t.shape[0]
            val = torch.randn(t.shape, generator=g) / fan_in ** 0.5
        out[name] = val.to(torch.bfloat16)
    return out


def write_tiny_minicpmv(out: Path, version: int = 2, seed: int = 0) -> Path:
    """Write a tiny MiniCPM-V (version 1 or 2) checkpoint directory; returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    text_cfg = json.loads((TEXT_MODEL / "config.json").read_text())
    vocab = text_cfg["vocab_size"] + len(IMAGE_PIECES)
    cfg = {k: v for k, v in text_cfg.items() if k not in ("architectures", "model_type")}
    cfg.update({
        "architectures": ["MiniCPMV"], "model_type": "minicpmv", "vocab_size": vocab,
        "vision_encoder": "mcpm_tiny_siglip", "drop_vision_last_layer": True, "query_num": 64,
        "patch_size": 14, "image_size": 448, "slice_mode": version >= 2,
    })
    if version >= 2:
        cfg.update({"max_slice_nums": 9, "scale_resolution": 448})
    vision = _vision_state(version, text_cfg["hidden_size"], g)
    text = _text_state(vocab, g)
    if version >= 2:   # MiniCPM-V-2 ships an untied llm.lm_head.weight: same values, other code path
        cfg["tie_word_embeddings"] = False
        text["llm.lm_head.weight"] = text["llm.model.embed_tokens.weight"].clone()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    shards = {"model-00001-of-00002.safetensors": text, "model-00002-of-00002.safetensors": vision}
    weight_map = {}
    for fname, tensors in shards.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=1) + "\n")
    (out / "tokenizer.model").write_bytes(_tokenizer_bytes())
    for f in ("special_tokens_map.json", "generation_config.json"):
        if (TEXT_MODEL / f).is_file():
            shutil.copy(TEXT_MODEL / f, out / f)
    tok_cfg = json.loads((TEXT_MODEL / "tokenizer_config.json").read_text())
    tok_cfg["added_tokens_decoder"] = {str(text_cfg["vocab_size"] + i): {"content": p, "special": True}
                                       for i, p in enumerate(IMAGE_PIECES)}   # as MiniCPM-V-2 lists them
    tok_cfg["additional_special_tokens"] = IMAGE_PIECES
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out


def tiny_recipe(recipe: Recipe) -> Recipe:
    """The recipe with its dims replaced by the tiny model's, so open_checkpoint's checks pass."""
    cfg = json.loads((TEXT_MODEL / "config.json").read_text())
    dims = {k: cfg[k] for k in recipe.dims if k in cfg}
    if "vocab_size" in dims and recipe.is_vision:
        dims["vocab_size"] += len(IMAGE_PIECES)
    return dataclasses.replace(recipe, dims=dims)


def tiny_model_for(recipe: Recipe, workdir: Path) -> Path:
    """A tiny checkpoint standing in for ``recipe`` (every registered family must have one)."""
    if recipe.family == "minicpm":
        return TEXT_MODEL
    if recipe.family == "minicpmv":
        return write_tiny_minicpmv(workdir / f"tiny-{recipe.name}", version=int(recipe.vision.get("version", 2)))
    raise KeyError(f"no tiny test model for family '{recipe.family}' (recipe {recipe.name})")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--version", type=int, default=2)
    a = ap.parse_args()
    print(write_tiny_minicpmv(Path(a.out), a.version))
