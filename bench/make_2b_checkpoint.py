"""Write a MiniCPM-2B-shaped Hugging Face checkpoint with random bf16 weights (for speed benchmarks).

    python3.11 bench/make_2b_checkpoint.py [OUT_DIR]     (default $MCPM_EXPORT_CACHE/bench/minicpm-2b-random)

Shapes of openbmb/MiniCPM-2B (hidden 2304, 40 layers, 36 heads, inter 5760, vocab 122753, tied), HF
names and layout (sharded safetensors + index), the SentencePiece tokenizer of models/tinycpm-docs
(converters pad the vocabulary to vocab_size). Weights ~ N(0, 0.02), norms 1. About 5.4 GB, ~1 min.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.cache import cache_dir  # noqa: E402
from exporter.recipes import EMBEDDED_DIR  # noqa: E402

TINY = EMBEDDED_DIR / "tinycpm-docs"
DEFAULT_OUT = cache_dir("bench") / "minicpm-2b-random"
SHARD_BYTES = 2 << 30

CONFIG_2B = {
    "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2304, "intermediate_size": 5760, "num_hidden_layers": 40,
    "num_attention_heads": 36, "num_key_value_heads": 36, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None, "vocab_size": 122753,
    "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "initializer_range": 0.1, "attention_bias": False, "use_cache": True,
}


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, v, d = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    return shapes


def make_checkpoint(out: Path = DEFAULT_OUT, config: dict = CONFIG_2B, seed: int = 0) -> Path:
    """Write the checkpoint unless ``out`` already holds a complete one; returns ``out``."""
    out = Path(out)
    if (out / "model.safetensors.index.json").exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards, cur, size = [], {}, 0
    for name, shape in tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        cur[name] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * 2 for s in shards for t in s.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (TINY / f).exists():
            shutil.copy(TINY / f, tmp / f)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(make_checkpoint(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
