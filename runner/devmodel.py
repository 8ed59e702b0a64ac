"""A tiny random MiniCPM-style decoder, compiled to an aarch64 bundle, to exercise mcpm-run.

It follows the DESIGN.md "TVM model library conventions" (MLC-LLM's embed -> [n, hidden], prefill /
decode -> (logits, kv_cache), create_tir_paged_kv_cache; tensor-cache.json next to mlc-chat-config.json) so the
runner can be tested without the real export pipeline. `reference_greedy` is the numpy
reference the runner's tokens are compared against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from exporter.parity import greedy

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, LAYERS = 64, 4, 2, 128, 256, 2
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA = 10000.0
SCALE_EMB, SCALE_DEPTH, DIM_BASE = 12.0, 1.4, 16
EPS = 1e-5


def random_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, s=0.32):
        return (rng.standard_normal(shape) * s).astype("float32")

    p = {"tok_embeddings.weight": w(VOCAB, HIDDEN, s=0.05), "norm.weight": 1 + w(HIDDEN, s=0.1)}
    for i in range(LAYERS):
        p[f"layers.{i}.attention_norm.weight"] = 1 + w(HIDDEN, s=0.1)
        p[f"layers.{i}.attention.wqkv.weight"] = w((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
        p[f"layers.{i}.attention.wo.weight"] = w(HIDDEN, HEADS * HEAD_DIM)
        p[f"layers.{i}.ffn_norm.weight"] = 1 + w(HIDDEN, s=0.1)
        p[f"layers.{i}.feed_forward.w13.weight"] = w(2 * INTER, HIDDEN)
        p[f"layers.{i}.feed_forward.w2.weight"] = w(HIDDEN, INTER)
    return p


# ---------------------------------------------------------------- numpy reference
def _rms(x, g):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * g


def _rope(x, pos):  # x [n, h, d], rotate-half
    half = HEAD_DIM // 2
    inv = 1.0 / ROPE_THETA ** (np.arange(half, dtype=np.float64) * 2 / HEAD_DIM)
    ang = np.outer(pos, inv)
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def _forward(p, ids):
    n = len(ids)
    h = p["tok_embeddings.weight"][ids].astype(np.float64) * SCALE_EMB
    pos = np.arange(n)
    res = SCALE_DEPTH / math.sqrt(LAYERS)
    for i in range(LAYERS):
        x = _rms(h, p[f"layers.{i}.attention_norm.weight"])
        qkv = x @ p[f"layers.{i}.attention.wqkv.weight"].T
        q = qkv[:, : HEADS * HEAD_DIM].reshape(n, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].reshape(n, KV_HEADS, HEAD_DIM)
        v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].reshape(n, KV_HEADS, HEAD_DIM)
        q, k = _rope(q, pos), _rope(k, pos)
        rep = HEADS // KV_HEADS
        k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM)
        s = s + np.triu(np.full((n, n), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", s, v).reshape(n, HIDDEN)
        h = h + (o @ p[f"layers.{i}.attention.wo.weight"].T) * res
        x = _rms(h, p[f"layers.{i}.ffn_norm.weight"])
        gu = x @ p[f"layers.{i}.feed_forward.w13.weight"].T
        g, u = gu[:, :INTER], gu[:, INTER:]
        h = h + ((g / (1 + np.exp(-g)) * u) @ p[f"layers.{i}.feed_forward.w2.weight"].T) * res
    h = _rms(h[-1:], p["norm.weight"]) / (HIDDEN / DIM_BASE)
    return (h @ p["tok_embeddings.weight"].T)[0]


class ReferenceEngine:
    """The numpy reference as an exporter/parity Engine (no KV cache: every step runs the whole sequence)."""

    def __init__(self, p):
        self.p, self.ids = p, []

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.ids = list(ids)
        return _forward(self.p, self.ids)

    def decode(self, token: int) -> np.ndarray:
        self.ids.append(token)
        return _forward(self.p, self.ids)


def reference_greedy(p, prompt: list[int], gen_len: int) -> list[int]:
    return greedy(ReferenceEngine(p), prompt, gen_len).tokens


# ---------------------------------------------------------------- TVM module
def _build_module():
    from tvm import relax as rx
    from tvm import tirx
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

    class Attn(nn.Module):
        def __init__(self):
            self.wqkv = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False)
            self.wo = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

        def forward(self, x, kv, layer):
            b, s, _ = x.shape
            qkv = nn.op.reshape(self.wqkv(x), (b, s, HEADS + 2 * KV_HEADS, HEAD_DIM))
            o = kv.attention_with_fused_qkv(layer, qkv, HEADS, sm_scale=HEAD_DIM**-0.5)
            return self.wo(nn.op.reshape(o, (b, s, HIDDEN)))

    class FFN(nn.Module):
        def __init__(self):
            self.w13 = nn.Linear(HIDDEN, 2 * INTER, bias=False)
            self.w2 = nn.Linear(INTER, HIDDEN, bias=False)

        def forward(self, x):
            g, u = nn.op.split(self.w13(x), 2, axis=-1)
            return self.w2(nn.op.silu(g) * u)

    class Layer(nn.Module):
        def __init__(self):
            self.attention_norm = nn.RMSNorm(HIDDEN, -1, EPS, bias=False)
            self.attention = Attn()
            self.ffn_norm = nn.RMSNorm(HIDDEN, -1, EPS, bias=False)
            self.feed_forward = FFN()

    class Model(nn.Module):
        def __init__(self):
            self.tok_embeddings = nn.Embedding(VOCAB, HIDDEN)
            self.layers = nn.ModuleList([Layer() for _ in range(LAYERS)])
            self.norm = nn.RMSNorm(HIDDEN, -1, EPS, bias=False)

        def embed(self, input_ids):
            return self.tok_embeddings(input_ids) * SCALE_EMB

        def _body(self, h, kv):
            res = SCALE_DEPTH / math.sqrt(LAYERS)
            for i, layer in enumerate(self.layers):
                h = h + layer.attention(layer.attention_norm(h), kv, i) * res
                h = h + layer.feed_forward(layer.ffn_norm(h)) * res
            from tvm import te

            last = nn.op.tensor_expr_op(
                lambda x: te.compute((1, 1, HIDDEN), lambda i, j, k: x[i, x.shape[1] - 1, k]),
                "take_last", [h])
            last = self.norm(last) / (HIDDEN / DIM_BASE)
            return nn.op.matmul(last, nn.op.permute_dims(self.tok_embeddings.weight), out_dtype="float32")

        def prefill(self, input_embed, kv):
            return self._body(input_embed, kv), kv

        def decode(self, input_embed, kv):
            return self._body(input_embed, kv), kv

        def create_tir_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size,
                                      page_size, support_sliding_window):
            import tvm

            return TIRPagedKVCache(
                attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size, page_size=page_size,
                support_sliding_window=support_sliding_window,
                layer_partition=rx.ShapeExpr([0, LAYERS]), num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, qk_head_dim=HEAD_DIM,
                v_head_dim=HEAD_DIM, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=ROPE_THETA, rope_scaling={},
                rope_ext_factors=rx.prim_value(0), rotary_dim=HEAD_DIM, enable_disaggregation=False,
                dtype="float32", target=tvm.target.Target.current(),
            )

    model = Model()
    mode = {"param_mode": "packed", "effect_mode": "none"}
    spec = {
        "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": mode},
        "prefill": {"input_embed": nn.spec.Tensor([1, "seq_len", HIDDEN], "float32"),
                    "kv": nn.spec.Object(object_type=PagedKVCache), "$": mode},
        "decode": {"input_embed": nn.spec.Tensor([1, 1, HIDDEN], "float32"),
                   "kv": nn.spec.Object(object_type=PagedKVCache), "$": mode},
        "create_tir_paged_kv_cache": {
            "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
            "page_size": int, "support_sliding_window": int,
            "$": {"param_mode": "none", "effect_mode": "none"}},
    }
    mod, named, _ = model.export_tvm(spec=spec, allow_extern=True)
    return mod, named


def build_bundle(out: Path, seed: int = 0, prefix: str | None = None) -> dict[str, np.ndarray]:
    """Compile the dev model for aarch64-linux-gnu into `out` (lib/model.so, tensor cache, config).
    With ``prefix`` the library is a TVM system library with that symbol prefix (as the android
    target builds it), named in mlc-chat-config.json like the android target does."""
    import tvm
    from tvm import relax
    from tvm.contrib import tvmjs
    from tvm.support import cc

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    with target:
        mod, named = _build_module()
    if prefix is not None:
        mod = mod.with_attr("system_lib_prefix", prefix)
    ex = relax.build(mod, target=target, system_lib=prefix is not None)
    out = Path(out)
    (out / "lib").mkdir(parents=True, exist_ok=True)
    ex.export_library(str(out / "lib" / "model.so"), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    p = random_params(seed)
    order = [name for name, _ in named]
    tvmjs.dump_tensor_cache({n: p[n] for n in order}, str(out), encode_format="raw",
                            show_progress=False)
    cfg = {"model_type": "minicpm", "vocab_size": VOCAB, "hidden_size": HIDDEN,
           "context_window_size": 512, "prefill_chunk_size": 128,
           "mcpm": {"libs": {"cpu": {"so": "lib/model.so", **({"prefix": prefix} if prefix else {})}}}}
    if prefix is not None:
        cfg["model_lib"] = prefix.rstrip("_")
    (out / "mlc-chat-config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
    return p
