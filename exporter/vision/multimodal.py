"""Image prompts through the PyTorch reference: features replace the <unk> embeddings, then greedy.

    h = tok_embeddings[ids] * scale_emb;  h[start_k : start_k + Q] = features of image k
(OpenBMB's get_vllm_embedding scatters the resampler output over the image bounds after the
scale_emb multiply.)
"""
from __future__ import annotations

import numpy as np
import torch

from ..model import MiniCPM, ReferenceEngine
from ..parity import greedy


def splice(embeds: np.ndarray | torch.Tensor, starts: list[int], feats, query_num: int):
    """Write image k's ``query_num`` feature rows at ``starts[k]`` of embeds [n, D] (or [1, n, D])."""
    view = embeds[0] if embeds.ndim == 3 else embeds
    for k, s in enumerate(starts):
        view[s:s + query_num] = feats[k * query_num:(k + 1) * query_num]
    return embeds


def reference_generate(model: MiniCPM, ids: list[int], starts: list[int], feats: np.ndarray,
                       query_num: int, max_new_tokens: int, eos_id: int | None = None,
                       prefill_chunk: int | None = None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits that chose them, for a prompt with image features spliced in."""
    feats_t = torch.from_numpy(np.asarray(feats, dtype=np.float32))
    engine = ReferenceEngine(model, len(ids) + max_new_tokens, prefill_chunk,
                             embed_hook=lambda h: splice(h, starts, feats_t, query_num))
    gen = greedy(engine, ids, max_new_tokens, () if eos_id is None else (eos_id,))
    return gen.tokens, [step.numpy() for step in gen.logits]
