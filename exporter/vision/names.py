"""Name table of OpenBMB MiniCPM-V / MiniCPM-V-2 checkpoints (vpm.*, resampler.*, llm.*).

Vision keys keep their checkpoint names (they are the state-dict keys of model.MiniCPMVVision);
the text part ``llm.model.*`` / ``llm.lm_head.weight`` maps to DESIGN.md's canonical names through
exporter/names.py with the prefix ``llm.``. Every checkpoint key must be consumed or ignored.
"""
from __future__ import annotations

import re

from .. import names as text_names

LLM_PREFIX = "llm."

# Vision keys, as regular expressions (b = ViT block index).
VISION_TABLE: list[str] = [
    r"vpm\.patch_embed\.proj\.(weight|bias)",          # Conv2d 3 -> width, kernel = stride = patch
    r"vpm\.pos_embed",                                 # [1, P*P, width] learned grid (P=27 for 384/14)
    r"vpm\.blocks\.\d+\.norm[12]\.(weight|bias)",      # pre-norm LayerNorms (eps 1e-6)
    r"vpm\.blocks\.\d+\.attn\.qkv\.(weight|bias)",     # fused q,k,v [3*width, width]
    r"vpm\.blocks\.\d+\.attn\.proj\.(weight|bias)",
    r"vpm\.blocks\.\d+\.mlp\.fc[12]\.(weight|bias)",   # GELU MLP width -> 4304 -> width
    r"vpm\.norm\.(weight|bias)",                       # final LayerNorm (forward_features)
    r"resampler\.query",                               # [64, hidden] learnable queries
    r"resampler\.pos_embed",                           # [64, hidden] 2D sin-cos of the 8x8 query grid
    r"resampler\.kv_proj\.weight",                     # [hidden, width], no bias; absent if equal
    r"resampler\.attn\.in_proj_(weight|bias)",         # nn.MultiheadAttention packed q,k,v
    r"resampler\.attn\.out_proj\.(weight|bias)",
    r"resampler\.ln_(q|kv|post)\.(weight|bias)",
    r"resampler\.proj",                                # [hidden, hidden], applied as x @ proj
]

# Present in some checkpoints and deliberately unused.
VISION_IGNORED: list[str] = [
    r"vpm\.attn_pool\..*",      # SigLIP attention-pool head: replaced by Identity in MiniCPM-V
    r"vpm\.head\..*",           # classifier head (num_classes=0)
    r"vpm\.fc_norm\..*",
    r"vpm\.cls_token",
]

_TABLE = [re.compile("^" + p + "$") for p in VISION_TABLE]
_IGNORED = [re.compile("^" + p + "$") for p in VISION_IGNORED]


def classify(key: str) -> str:
    """'vision', 'text', 'ignored' or 'unknown' for one checkpoint key."""
    if any(p.match(key) for p in _TABLE):
        return "vision"
    if any(p.match(key) for p in _IGNORED):
        return "ignored"
    if key.startswith(LLM_PREFIX):
        if text_names.canonical_name(key, LLM_PREFIX) is not None:
            return "text"
        if text_names.is_ignored(key, LLM_PREFIX):
            return "ignored"
    return "unknown"
