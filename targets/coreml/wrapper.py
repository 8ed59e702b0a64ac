"""A Core ML-friendly forward of the reference MiniCPM: fixed-size KV cache held in buffers.

Core ML states are fixed-shape tensors updated in place, so the cache lives in two buffers
``key_cache`` / ``value_cache`` of shape [layers, kv_heads, context, head_dim] that the forward
writes with a slice assignment at ``start_pos`` (converted to ``slice_update`` + state write).
Weights and maths are the reference model's own modules (exporter/model.py); only the cache
handling and the attention layout (grouped heads, additive mask over the whole window) differ.

``row_scaled_embedding``: the tied embedding is held as ``embed_rows`` (every row divided by its
float16 max |w|, the matrix the converter palettizes, see palettize.py) times ``embed_row_scale``,
applied after the gather and on the logits. Same maths; it keeps one look-up table per group of
columns valid for all rows, which Core ML on iOS 18 cannot express as a constexpr scale.

``head_rows`` (``--ane-head``): the tied embedding / head is held as P pieces ``embed_piece_{p}`` of at
most ``head_rows`` rows (convert.ANE_MAX_DIM = 16384, the Neural Engine's largest tensor dimension), so
no tensor of the program has a dimension over it: the gather reads every piece (clamped index, masked
sum) and the head returns logits [1, P, R] (R = ceil(vocab / P); token id = p * R + r; the last piece's
missing rows are filled with MASK_VALUE, so they never win an argmax).
"""
from __future__ import annotations

import torch
from torch import nn

from exporter.errors import ExportError
from exporter.model import MiniCPM, apply_rope, rope_tables

MASK_VALUE = -1.0e4  # additive mask; fits float16, exp() of it is 0


class CoreMLMiniCPM(nn.Module):
    """forward(input_ids[1,T] int32, start_pos[1] int32, last_index[1] int32 | None) -> logits.

    ``last_index`` given (prefill): logits [1, 1, vocab] of that row of the chunk.
    ``last_index`` None (decode): logits [1, T, vocab].
    """

    def __init__(self, ref: MiniCPM, context: int, row_scaled_embedding: bool = False,
                 head_rows: int | None = None, row_split: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        cfg = ref.cfg
        self.cfg, self.context = cfg, context
        self.tok_embeddings, self.layers, self.norm = ref.tok_embeddings, ref.layers, ref.norm
        self.output = ref.output
        self.embed_rows = None
        self.row_scaled = row_scaled_embedding
        self.pieces: list[tuple[int, int]] = []      # (first row, rows) of each embed_piece_{p}
        if (row_scaled_embedding or head_rows) and self.output is not None:
            raise ExportError("ios: the palettized embedding (lut6) and --ane-head need tied "
                              "embeddings (tie_word_embeddings); use embedding='int8' without --ane-head")
        if row_scaled_embedding:
            # row_split: (rows, scale) already chosen (the shipped Lut6: table values, row scales)
            rows, scale = row_split or split_row_scale(ref.tok_embeddings.weight.detach())
            self.embed_rows = nn.Parameter(rows, requires_grad=False)
            self.register_buffer("embed_row_scale", scale, persistent=False)
            self.tok_embeddings = None
        if head_rows:
            self._split_head(head_rows)
        cache_shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, context, cfg.head_dim)
        # float32 here; the converter stores them as float16 Core ML states.
        self.register_buffer("key_cache", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("value_cache", torch.zeros(cache_shape), persistent=False)
        cos, sin = rope_tables(cfg, torch.arange(context))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _split_head(self, head_rows: int) -> None:
        """Replace the tied matrix (and its row scales) by pieces of at most head_rows rows."""
        scaled = self.embed_rows is not None
        weight = (self.embed_rows if scaled else self.tok_embeddings.weight).detach()
        count, rows = head_pieces(weight.shape[0], head_rows)
        for p in range(count):
            first = p * rows
            part = weight[first:first + rows]
            self.register_parameter(f"embed_piece_{p}", nn.Parameter(part.clone(), requires_grad=False))
            if scaled:
                self.register_buffer(f"embed_piece_scale_{p}",
                                     self.embed_row_scale[first:first + rows].clone(), persistent=False)
            self.pieces.append((first, part.shape[0]))
        self.embed_rows = self.tok_embeddings = None
        if scaled:
            del self.embed_row_scale

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
        if self.pieces:
            h = self._embed_pieces(input_ids)
        elif self.embed_rows is None:
            h = self.tok_embeddings(input_ids) * self.cfg.scale_emb
        else:
            rows = torch.nn.functional.embedding(input_ids, self.embed_rows)
            h = rows * (self.embed_row_scale[input_ids] * self.cfg.scale_emb)[..., None]
        for i, layer in enumerate(self.layers):
            a = self._attention(i, layer.attention, layer.attention_norm(h), cos, sin, start, pos)
            h = h + a * layer.residual_scale
            h = h + layer.feed_forward(layer.ffn_norm(h)) * layer.residual_scale
        if last_index is not None:
            h = torch.index_select(h, 1, last_index)
        h = self.norm(h) / self.cfg.logit_scale
        if self.pieces:
            return self._head_pieces(h)
        if self.embed_rows is not None:
            return torch.nn.functional.linear(h, self.embed_rows) * self.embed_row_scale
        head = self.tok_embeddings.weight if self.output is None else self.output.weight
        return torch.nn.functional.linear(h, head)

    def _piece(self, p: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return getattr(self, f"embed_piece_{p}"), getattr(self, f"embed_piece_scale_{p}", None)

    def _embed_pieces(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows (times their row scales, with the unsplit forward's order of operations)
        gathered piece by piece: each piece reads a clamped index, masked out unless the id falls
        inside it (the masked sum adds exact zeros)."""
        rows = scales = None
        for p, (first, count) in enumerate(self.pieces):
            weight, scale = self._piece(p)
            local = input_ids - first
            index = torch.clamp(local, 0, count - 1)
            inside = (index == local).to(weight.dtype)                  # not clamped
            part = torch.nn.functional.embedding(index, weight) * inside[..., None]
            rows = part if rows is None else rows + part
            if scale is not None:
                part = scale[index] * inside
                scales = part if scales is None else scales + part
        if scales is None:
            return rows * self.cfg.scale_emb
        return rows * (scales * self.cfg.scale_emb)[..., None]

    def _head_pieces(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [1, T * P, R]: piece p's logits in row p (T = 1 in both functions)."""
        width = self.pieces[0][1]
        outs = []
        for p, (_first, rows) in enumerate(self.pieces):
            weight, scale = self._piece(p)
            y = torch.nn.functional.linear(h, weight)
            if scale is not None:
                y = y * scale
            if rows < width:
                y = torch.cat([y, torch.full((*y.shape[:-1], width - rows), MASK_VALUE)], dim=-1)
            outs.append(y)
        out = torch.stack(outs, dim=-2)                                   # [1, T, P, R]
        return out.reshape(1, out.shape[1] * out.shape[2], width)


def head_pieces(vocab: int, max_rows: int) -> tuple[int, int]:
    """(pieces P, rows per piece R): the fewest pieces of at most max_rows rows, sizes balanced."""
    if max_rows < 1:
        raise ExportError(f"ios: head piece rows must be positive, got {max_rows}")
    count = -(-vocab // max_rows)
    return count, -(-vocab // count)


def flat_logits(logits, vocab: int):
    """The [vocab] logits of one position from either output layout ([1, 1, vocab] or [1, P, R])."""
    return logits.reshape(-1)[:vocab]


def split_row_scale(weight: torch.Tensor, rows_per_step: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [rows, cols] -> (weight / max|row|, max|row|), both float16-exact (returned as float32).

    Computed a block of rows at a time into the float32 result: the float16 temporaries of a whole
    2B embedding (2 x 0.57 GB) are not needed at once."""
    rows = torch.empty(weight.shape, dtype=torch.float32)
    scales = torch.empty(weight.shape[0], dtype=torch.float32)
    for s in range(0, weight.shape[0], rows_per_step):
        w = weight[s:s + rows_per_step].half()
        scale = w.abs().amax(1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        rows[s:s + rows_per_step] = w / scale[:, None]
        scales[s:s + rows_per_step] = scale
    return rows, scales
