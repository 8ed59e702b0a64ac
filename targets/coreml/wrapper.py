"""A Core ML-friendly forward of the reference MiniCPM: fixed-size KV cache held in buffers.

Core ML states are fixed-shape tensors updated in place, so the cache lives in two buffers
``key_cache`` / ``value_cache`` of shape [layers, kv_heads, context, head_dim] that the forward
writes with a slice assignment at ``start_pos`` (converted to ``slice_update`` + state write).
Weights and maths are the reference model's own modules (exporter/model.py); only the cache
handling and the attention layout (grouped heads, additive mask over the whole window) differ.
"""
from __future__ import annotations

import torch
from torch import nn

from exporter.model import MiniCPM, apply_rope, rope_tables

MASK_VALUE = -1.0e4  # additive mask; fits float16, exp() of it is 0


class CoreMLMiniCPM(nn.Module):
    """forward(input_ids[1,T] int32, start_pos[1] int32, last_index[1] int32 | None) -> logits.

    ``last_index`` given (prefill): logits [1, 1, vocab] of that row of the chunk.
    ``last_index`` None (decode): logits [1, T, vocab].
    """

    def __init__(self, ref: MiniCPM, context: int):
        super().__init__()
        cfg = ref.cfg
        self.cfg, self.context = cfg, context
        self.tok_embeddings, self.layers, self.norm = ref.tok_embeddings, ref.layers, ref.norm
        self.output = ref.output
        cache_shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, context, cfg.head_dim)
        # float32 here; the converter stores them as float16 Core ML states.
        self.register_buffer("key_cache", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("value_cache", torch.zeros(cache_shape), persistent=False)
        cos, sin = rope_tables(cfg, torch.arange(context))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def _attention(self, i: int, attn, x, cos, sin, start: int, pos):
        c, hd = self.cfg, self.cfg.head_dim
        T = x.shape[1]
        kvh, rep = c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads
        q = attn.wq(x).view(1, T, c.num_attention_heads, hd).transpose(1, 2)
        k = attn.wk(x).view(1, T, kvh, hd).transpose(1, 2)
        v = attn.wv(x).view(1, T, kvh, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.key_cache[i:i + 1, :, start:start + T] = k
        self.value_cache[i:i + 1, :, start:start + T] = v
        keys = self.key_cache[i:i + 1]            # [1, kvh, context, hd]
        values = self.value_cache[i:i + 1]
        # grouped-query attention without copying K/V: heads j*rep..j*rep+rep-1 share kv head j
        qg = q.reshape(1, kvh, rep * T, hd)
        scores = torch.matmul(qg, keys.transpose(2, 3)) * (hd ** -0.5)   # [1, kvh, rep*T, context]
        visible = torch.arange(self.context, dtype=torch.int32)[None, :] <= pos[:, None]  # [T, ctx]
        mask = torch.where(visible, 0.0, MASK_VALUE).repeat(rep, 1)
        probs = torch.softmax(scores + mask, dim=-1)
        out = torch.matmul(probs, values).reshape(1, c.num_attention_heads, T, hd)
        return attn.wo(out.transpose(1, 2).reshape(1, T, c.num_attention_heads * hd))

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor,
                last_index: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        start = start_pos.item()
        torch._check(start >= 0)
        torch._check(start + T <= self.context)
        pos = start_pos + torch.arange(T, dtype=torch.int32)
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        h = self.tok_embeddings(input_ids) * self.cfg.scale_emb
        for i, layer in enumerate(self.layers):
            a = self._attention(i, layer.attention, layer.attention_norm(h), cos, sin, start, pos)
            h = h + a * layer.residual_scale
            h = h + layer.feed_forward(layer.ffn_norm(h)) * layer.residual_scale
        if last_index is not None:
            h = torch.index_select(h, 1, last_index)
        h = self.norm(h) / self.cfg.logit_scale
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        return torch.nn.functional.linear(h, head)
