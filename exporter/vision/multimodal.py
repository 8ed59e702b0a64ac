"""Image prompts through the PyTorch reference: features replace the <unk> embeddings, then greedy.

    h = tok_embeddings[ids] * scale_emb;  h[start_k : start_k + Q] = features of image k
(OpenBMB's get_vllm_embedding scatters the resampler output over the image bounds after the
scale_emb multiply.)
"""
from __future__ import annotations

import numpy as np
import torch

from ..model import KVCache, MiniCPM


def splice(embeds: np.ndarray | torch.Tensor, starts: list[int], feats, query_num: int):
    """Write image k's ``query_num`` feature rows at ``starts[k]`` of embeds [n, D] (or [1, n, D])."""
    view = embeds[0] if embeds.ndim == 3 else embeds
    for k, s in enumerate(starts):
        view[s:s + query_num] = feats[k * query_num:(k + 1) * query_num]
    return embeds


@torch.no_grad()
def reference_generate(model: MiniCPM, ids: list[int], starts: list[int], feats: np.ndarray,
                       query_num: int, max_new_tokens: int, eos_id: int | None = None,
                       prefill_chunk: int | None = None) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits that chose them, for a prompt with image features spliced in."""
    h = model.embed(torch.tensor([ids]))
    splice(h, starts, torch.from_numpy(np.asarray(feats, dtype=np.float32)), query_num)
    cache = KVCache(model.cfg, len(ids) + max_new_tokens)
    chunk = prefill_chunk or len(ids)
    for s in range(0, len(ids), chunk):
        logits = model.forward_embeds(h[:, s:s + chunk], cache, start=s, last_only=True)
    out, steps = [], []
    for i in range(max_new_tokens):
        step = logits[0, -1]
        steps.append(step.numpy())
        out.append(int(step.argmax()))
        if (eos_id is not None and out[-1] == eos_id) or i == max_new_tokens - 1:
            break
        logits = model(torch.tensor([[out[-1]]]), cache, start=cache.length, last_only=True)
    return out, steps
