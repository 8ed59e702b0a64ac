"""HF -> canonical tensor names for the MiniCPM text model, as a data table.

Every key of a checkpoint must be consumed by a row of NAME_TABLE or matched by IGNORED;
anything left over is an error (see checkpoint.py). ``{i}`` is the layer index.
"""
from __future__ import annotations

import re

# (Hugging Face name,                               canonical name)
NAME_TABLE: list[tuple[str, str]] = [
    ("model.embed_tokens.weight",                     "tok_embeddings.weight"),              # [vocab, hidden], times scale_emb at run time
    ("model.layers.{i}.input_layernorm.weight",       "layers.{i}.attention_norm.weight"),   # RMSNorm before attention
    ("model.layers.{i}.self_attn.q_proj.weight",      "layers.{i}.attention.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight",      "layers.{i}.attention.wk.weight"),     # GQA: kv_heads * head_dim rows
    ("model.layers.{i}.self_attn.v_proj.weight",      "layers.{i}.attention.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight",      "layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),      # RMSNorm before the MLP
    ("model.layers.{i}.mlp.gate_proj.weight",         "layers.{i}.feed_forward.w1.weight"),  # SwiGLU gate
    ("model.layers.{i}.mlp.up_proj.weight",           "layers.{i}.feed_forward.w3.weight"),  # SwiGLU up
    ("model.layers.{i}.mlp.down_proj.weight",         "layers.{i}.feed_forward.w2.weight"),
    ("model.norm.weight",                             "norm.weight"),                         # final RMSNorm
    ("lm_head.weight",                                "output.weight"),                       # absent when tied
]

# Keys that are present in some checkpoints and deliberately not used.
IGNORED: list[str] = [
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",  # recomputed from rope_theta
]


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_COMPILED = [(_pattern(hf), canon) for hf, canon in NAME_TABLE]
_IGNORED = [re.compile("^" + p + "$") for p in IGNORED]


def canonical_name(hf_name: str, prefix: str = "") -> str | None:
    """Canonical name for ``hf_name`` (after stripping ``prefix``), or None if no row matches."""
    if not hf_name.startswith(prefix):
        return None
    name = hf_name[len(prefix):]
    for pat, canon in _COMPILED:
        m = pat.match(name)
        if m:
            return canon.replace("{i}", m.group("i")) if "i" in m.groupdict() else canon
    return None


def is_ignored(hf_name: str, prefix: str = "") -> bool:
    name = hf_name[len(prefix):] if hf_name.startswith(prefix) else hf_name
    return any(p.match(name) for p in _IGNORED)


def expected_names(num_layers: int, tied: bool) -> set[str]:
    """The canonical names a complete text checkpoint provides."""
    out = set()
    for _, canon in NAME_TABLE:
        if canon == "output.weight" and tied:
            continue
        if "{i}" in canon:
            out.update(canon.replace("{i}", str(i)) for i in range(num_layers))
        else:
            out.add(canon)
    return out
