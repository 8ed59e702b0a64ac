"""The PyTorch reference MiniCPM text model: the numerical reference for every exported artifact.

Llama-like blocks with MiniCPM's three scalings (see docs/DESIGN.md):
embeddings * scale_emb; each residual branch * scale_depth/sqrt(L); logits = head(h / (hidden/dim_model_base)).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import MiniCPMConfig
from .errors import ExportError
from .parity import greedy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(cfg: MiniCPMConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, head_dim] (HF Llama rotate-half convention)."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    freqs = positions.float()[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache: "KVCache | None", layer: int, start: int):
        B, T, _ = x.shape
        c, hd = self.cfg, self.cfg.head_dim
        q = self.wq(x).view(B, T, c.num_attention_heads, hd).transpose(1, 2)
        k = self.wk(x).view(B, T, c.num_key_value_heads, hd).transpose(1, 2)
        v = self.wv(x).view(B, T, c.num_key_value_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)
        rep = c.num_attention_heads // c.num_key_value_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        S = k.shape[2]
        # causal mask for queries at positions start..start+T-1 over keys 0..S-1
        qpos = torch.arange(start, start + T)[:, None]
        mask = torch.arange(S)[None, :] <= qpos
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.residual_scale = cfg.residual_scale

    def forward(self, h, cos, sin, cache, layer, start):
        h = h + self.attention(self.attention_norm(h), cos, sin, cache, layer, start) * self.residual_scale
        return h + self.feed_forward(self.ffn_norm(h)) * self.residual_scale


class KVCache:
    """Contiguous per-layer cache of shape [B, kv_heads, max_len, head_dim]."""

    def __init__(self, cfg: MiniCPMConfig, max_len: int, batch: int = 1, dtype=torch.float32):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class MiniCPM(nn.Module):
    def __init__(self, cfg: MiniCPMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @classmethod
    def from_state_dict(cls, cfg: MiniCPMConfig, state: dict[str, torch.Tensor]) -> "MiniCPM":
        model = cls(cfg)
        model.load_state_dict(state, strict=True)
        return model.eval()

    def head_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(ids) * self.cfg.scale_emb

    def forward_embeds(self, h: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                       last_only: bool = False) -> torch.Tensor:
        """h: [B, T, hidden] embeddings (already times scale_emb). Returns logits [B, T|1, vocab]."""
        T = h.shape[1]
        cos, sin = rope_tables(self.cfg, torch.arange(start, start + T))
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache, i, start)
        if cache is not None:
            cache.length = start + T
        if last_only:
            h = h[:, -1:]
        h = self.norm(h) / self.cfg.logit_scale
        return F.linear(h, self.head_weight())

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        return self.forward_embeds(self.embed(ids), cache, start, last_only)

    @torch.no_grad()
    def generate(self, prompt: list[int], max_new_tokens: int, eos_id: int | None = None,
                 prefill_chunk: int | None = None) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy KV-cached generation (exporter/parity.greedy). Returns (new token ids, logits of each step)."""
        engine = ReferenceEngine(self, len(prompt) + max_new_tokens, prefill_chunk)
        gen = greedy(engine, prompt, max_new_tokens, () if eos_id is None else (eos_id,))
        return gen.tokens, gen.logits


class ReferenceEngine:
    """The PyTorch reference as an exporter/parity Engine: a KV cache of ``max_len`` positions, prefill
    in chunks of ``prefill_chunk`` (default: the whole prompt). ``embed_hook`` may rewrite the prompt's
    embeddings [1, n, hidden] (after scale_emb) before prefill (the vision splice)."""

    def __init__(self, model: MiniCPM, max_len: int, prefill_chunk: int | None = None,
                 embed_hook: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model, self.max_len, self.chunk, self.embed_hook = model, max_len, prefill_chunk, embed_hook
        self.cache: KVCache | None = None

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        self.cache = KVCache(self.model.cfg, self.max_len)
        h = self.model.embed(torch.tensor([ids]))
        if self.embed_hook is not None:
            h = self.embed_hook(h)
        chunk = self.chunk or len(ids)
        for s in range(0, len(ids), chunk):
            logits = self.model.forward_embeds(h[:, s:s + chunk], self.cache, start=s, last_only=True)
        return logits[0, -1]

    @torch.no_grad()
    def decode(self, token: int) -> torch.Tensor:
        return self.model(torch.tensor([[token]]), self.cache, start=self.cache.length, last_only=True)[0, -1]


def check_generation(max_new_tokens: int, prompt_len: int | None = None, context_window: int | None = None,
                     what: str = "prompt") -> None:
    """The one length check of every generation (`generate`, `run`, `run --image`): at least one new
    token, and the prompt plus the new tokens within the context window."""
    if max_new_tokens < 1:
        raise ExportError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    if prompt_len is not None and context_window is not None and prompt_len + max_new_tokens > context_window:
        raise ExportError(f"{what} ({prompt_len} tokens) + --max-new-tokens {max_new_tokens} exceeds "
                          f"the context window {context_window}")


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MiniCPM", "KVCache", "ReferenceEngine", "check_generation", "RMSNorm", "rope_tables", "apply_rope", "param_count", "math"]
