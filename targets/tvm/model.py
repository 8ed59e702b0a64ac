"""MiniCPM decoder for TVM Relax (``tvm.relax.frontend.nn``, MLC style, TIR paged KV cache).

Same maths as exporter/model.py (the PyTorch reference, see docs/DESIGN.md); tests/test_tvm_model.py
ties the two together so they cannot drift.

Module functions: MLC-LLM's model-library contract (docs/DESIGN.md; all params "packed" = one tuple, last
argument; every forward returns (logits, kv_cache) as MLC's engine expects):
  embed(input_ids int32[n], params)                       -> embeds float32[n, hidden]  (already * scale_emb)
  prefill(embeds[1, n, hidden], kv_cache, params)         -> (logits float32[1, 1, vocab] of the last position, kv)
  decode(embeds[1, 1, hidden], kv_cache, params)          -> (logits float32[1, 1, vocab], kv)
  batch_prefill(embeds[1, n, hidden], logit_positions int32[b], kv_cache, params)
                                                          -> (logits float32[1, b, vocab], kv)
  batch_decode(embeds[b, 1, hidden], kv_cache, params)    -> (logits float32[b, 1, vocab], kv)
  create_tir_paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                            support_sliding_window)       -> PagedKVCache (RoPE applied inside, rotate-half)
(pipeline.export_ir adds _metadata, alloc_embedding_tensor and the sampling helpers of targets/tvm/mlc.py.)

The dequantize pattern (for targets/tvm/kernels.py, the fused int4 kernels)
---------------------------------------------------------------------------
Every linear layer ``y = x @ W.T`` with a q4f16 weight is emitted as exactly two steps:

  w  = call_tir(dequantize, (q_weight uint32[out, in/8], q_scale float16[out, in/32])) -> float32[out, in]
       # TE: w[o, k] = (float((q_weight[o, k//8] >> 4*(k%8)) & 15) - 7) * float(q_scale[o, k//32])
  y  = matmul(x, permute_dims(w))          # x float32[1, n, in] -> y float32[1, n, out]

(the int8 variant ``dequantize_q8`` takes int8[out, in] and computes q8 * scale; fp16 weights use
``dequantize_f16`` = a cast). The tied LM head reuses the embedding's q_weight/q_scale in the same
pattern. Linear layers sharing an input are row-concatenated at pack time: ``attention.wqkv`` = wq;wk;wv
and ``feed_forward.w13`` = w1;w3 (rows are independent in q4f16, so this is exact).
Activations and norms are float32 on every backend; the paged KV cache is ``kv_dtype`` (KV_DTYPE =
float16 by default: half the bytes decode reads at depth; float32 for exact-parity builds). With float16
the attention's q/k/v are rounded to it before RoPE and the cache append, and its output is cast back
to float32 (the attention kernels accumulate in float32).
"""
from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from exporter.config import MiniCPMConfig
from exporter.quant import GROUP, Q4_PER_WORD, dequant_q4_expr, dequant_q8_expr

DTYPE = "float32"
KV_DTYPE = "float16"       # paged KV cache (issue 11: float32 before)


def kv_cache_bytes(cfg: MiniCPMConfig, tokens: int, dtype: str = KV_DTYPE) -> int:
    """Bytes of the K and V caches of every layer holding ``tokens`` positions."""
    per = {"float16": 2, "float32": 4}[dtype]
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * tokens * per

# weight kinds: how a weight matrix is stored in the bundle
Q4, Q8, F16, F32 = "q4", "q8", "f16", "f32"


def weight_kinds(scheme: str | None) -> dict[str, str]:
    """Storage kind of linear layers, the embedding (and tied head) and an untied head, per scheme."""
    if scheme is None:
        return {"linear": F32, "embed": F32, "output": F32}
    if scheme == "q4f16":
        return {"linear": Q4, "embed": Q4, "output": Q4}
    if scheme == "q4f16_e8":
        return {"linear": Q4, "embed": Q8, "output": Q8}
    if scheme == "fp16":
        return {"linear": F16, "embed": F16, "output": F16}
    raise ValueError(f"unknown quantization scheme '{scheme}'")


def u32(v):
    return tirx.Cast("uint32", v)


def f32(v):
    return tirx.Cast(DTYPE, v)


def q4_at(q_weight: te.Tensor, q_scale: te.Tensor, row, k):
    """Element [row, k] of a q4f16 weight (exporter/quant.py's dequantize expression, in TE)."""
    return dequant_q4_expr(q_weight[row, k // Q4_PER_WORD], k, q_scale[row, k // GROUP], u32, f32)


def q8_at(q_weight: te.Tensor, q_scale: te.Tensor, row, k):
    return dequant_q8_expr(q_weight[row, k], q_scale[row, k // GROUP], f32)


def _dequant_q4(q_weight: te.Tensor, q_scale: te.Tensor) -> te.Tensor:
    out, words = q_weight.shape
    return te.compute((out, words * Q4_PER_WORD), lambda o, k: q4_at(q_weight, q_scale, o, k), name="dequantize")


def _dequant_q8(q_weight: te.Tensor, q_scale: te.Tensor) -> te.Tensor:
    return te.compute(q_weight.shape, lambda o, k: q8_at(q_weight, q_scale, o, k), name="dequantize_q8")


def _cast(w: te.Tensor) -> te.Tensor:
    return te.compute(w.shape, lambda o, k: w[o, k].astype(DTYPE), name="dequantize_f16")


class QWeight(nn.Module):
    """A [out, in] weight matrix in one of the storage kinds; ``dequantize()`` gives float32[out, in]."""

    def __init__(self, out_f: int, in_f: int, kind: str):
        self.kind, self.out_f, self.in_f = kind, out_f, in_f
        if kind == Q4:
            self.q_weight = nn.Parameter((out_f, in_f // Q4_PER_WORD), "uint32")
            self.q_scale = nn.Parameter((out_f, in_f // GROUP), "float16")
        elif kind == Q8:
            self.q_weight = nn.Parameter((out_f, in_f), "int8")
            self.q_scale = nn.Parameter((out_f, in_f // GROUP), "float16")
        else:
            self.weight = nn.Parameter((out_f, in_f), "float16" if kind == F16 else DTYPE)

    def dequantize(self) -> Tensor:
        if self.kind == Q4:
            return op.tensor_expr_op(_dequant_q4, "dequantize", [self.q_weight, self.q_scale])
        if self.kind == Q8:
            return op.tensor_expr_op(_dequant_q8, "dequantize_q8", [self.q_weight, self.q_scale])
        if self.kind == F16:
            return op.tensor_expr_op(_cast, "dequantize_f16", [self.weight])
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        return op.matmul(x, op.permute_dims(self.dequantize()))

    def rows(self, ids: Tensor) -> Tensor:
        """Dequantized rows ``ids`` (int32[n]) -> float32[n, in] without dequantizing the whole table."""
        def f(ids_t, *ws):
            n = ids_t.shape[0]
            if self.kind in (Q4, Q8):
                at = q4_at if self.kind == Q4 else q8_at
                return te.compute((n, self.in_f), lambda i, k: at(*ws, ids_t[i], k), name="embed_rows")
            (w,) = ws
            return te.compute((n, self.in_f), lambda i, k: w[ids_t[i], k].astype(DTYPE), name="embed_rows")

        ws = [self.q_weight, self.q_scale] if self.kind in (Q4, Q8) else [self.weight]
        return op.tensor_expr_op(f, "embed_rows", [ids, *ws])


class Attention(nn.Module):
    def __init__(self, cfg: MiniCPMConfig, kind: str, kv_dtype: str):
        self.hq, self.hkv, self.d, self.kv_dtype = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, kv_dtype
        self.wqkv = QWeight((self.hq + 2 * self.hkv) * self.d, cfg.hidden_size, kind)
        self.wo = QWeight(cfg.hidden_size, self.hq * self.d, kind)

    def forward(self, x: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.wqkv(x), (b, s, self.hq + 2 * self.hkv, self.d)).astype(self.kv_dtype)
        o = kv.attention_with_fused_qkv(layer_id, qkv, self.hq, sm_scale=self.d ** -0.5).astype(DTYPE)
        return self.wo(op.reshape(o, (b, s, self.hq * self.d)))


class FeedForward(nn.Module):
    def __init__(self, cfg: MiniCPMConfig, kind: str):
        self.w13 = QWeight(2 * cfg.intermediate_size, cfg.hidden_size, kind)
        self.w2 = QWeight(cfg.hidden_size, cfg.intermediate_size, kind)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.w13(x), 2, axis=-1)
        return self.w2(op.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: MiniCPMConfig, kind: str, kv_dtype: str):
        self.attention_norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=DTYPE)
        self.attention = Attention(cfg, kind, kv_dtype)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=DTYPE)
        self.feed_forward = FeedForward(cfg, kind)
        self.residual_scale = cfg.residual_scale

    def forward(self, h: Tensor, kv: PagedKVCache, layer_id: int) -> Tensor:
        h = h + self.attention(self.attention_norm(h), kv, layer_id) * self.residual_scale
        return h + self.feed_forward(self.ffn_norm(h)) * self.residual_scale


class MiniCPMTVM(nn.Module):
    def __init__(self, cfg: MiniCPMConfig, scheme: str | None, target, kv_dtype: str = KV_DTYPE):
        kinds = weight_kinds(scheme)
        self.cfg, self.target, self.kv_dtype = cfg, target, kv_dtype
        self.tok_embeddings = QWeight(cfg.vocab_size, cfg.hidden_size, kinds["embed"])
        self.layers = nn.ModuleList([Block(cfg, kinds["linear"], kv_dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = nn.RMSNorm(cfg.hidden_size, -1, cfg.rms_norm_eps, bias=False, dtype=DTYPE)
        if not cfg.tie_word_embeddings:
            self.output = QWeight(cfg.vocab_size, cfg.hidden_size, kinds["output"])

    def _logits(self, h: Tensor) -> Tensor:
        h = self.norm(h) * (1.0 / self.cfg.logit_scale)
        head = self.tok_embeddings if self.cfg.tie_word_embeddings else self.output
        return head(h)

    def _body(self, h: Tensor, kv: PagedKVCache) -> Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, kv, i)
        return h

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.tok_embeddings.rows(input_ids) * float(self.cfg.scale_emb)

    def prefill(self, embeds: Tensor, kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        def last(x: te.Tensor):
            b, s, d = x.shape
            return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="last_position")

        h = op.tensor_expr_op(last, "last_position", [self._body(embeds, kv)])
        return self._logits(h), kv

    def decode(self, embeds: Tensor, kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self._logits(self._body(embeds, kv)), kv

    def batch_prefill(self, embeds: Tensor, logit_positions: Tensor,
                      kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        """Several sequences' chunks concatenated along dim 1; logits at ``logit_positions`` (each
        sequence's last token)."""
        h = op.take(self._body(embeds, kv), logit_positions, axis=1)
        return self._logits(h), kv

    def batch_decode(self, embeds: Tensor, kv: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self._logits(self._body(embeds, kv)), kv

    def create_tir_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                                  prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                                  support_sliding_window: tirx.Var) -> PagedKVCache:
        c = self.cfg
        from tvm import relax as rx
        return TIRPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, c.num_hidden_layers]),
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, qk_head_dim=c.head_dim, v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=c.rope_theta, rope_scaling={},
            rope_ext_factors=rx.prim_value(0), rotary_dim=c.head_dim, enable_disaggregation=False,
            dtype=self.kv_dtype, target=self.target)

    def spec(self) -> dict:
        packed = {"$": {"param_mode": "packed", "effect_mode": "none"}}
        kv = nn.spec.Object(object_type=PagedKVCache)
        h = self.cfg.hidden_size
        return {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), **packed},
            "prefill": {"embeds": nn.spec.Tensor([1, "seq_len", h], DTYPE), "kv": kv, **packed},
            "decode": {"embeds": nn.spec.Tensor([1, 1, h], DTYPE), "kv": kv, **packed},
            "batch_prefill": {"embeds": nn.spec.Tensor([1, "seq_len", h], DTYPE),
                              "logit_positions": nn.spec.Tensor(["batch_size"], "int32"), "kv": kv, **packed},
            "batch_decode": {"embeds": nn.spec.Tensor(["batch_size", 1, h], DTYPE), "kv": kv, **packed},
            "create_tir_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                "page_size": int, "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
