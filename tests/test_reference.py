"""The PyTorch reference model on the real trained tiny checkpoint."""
import math

import pytest
import torch

from exporter import api
from exporter.model import KVCache
from exporter.quality import perplexity

EVAL = "../shared/eval/python-tutorial.txt"
PROMPT = "The for statement in Python"
# Greedy continuation of PROMPT by tinycpm-docs in fp32 (recorded with torch 2.13.0 CPU).
GOLDEN_PREFIX = "2.0.\n\n\n.. _class-objects:"


def test_greedy_generation_is_deterministic_and_golden(tiny):
    ids = tiny.tokenizer.encode(PROMPT)
    assert ids[0] == 1  # BOS added, LlamaTokenizer conventions
    a, _ = tiny.model.generate(ids, 24)
    b, _ = tiny.model.generate(ids, 24)
    assert a == b
    assert tiny.tokenizer.decode(a).startswith(GOLDEN_PREFIX)


def test_kv_cache_matches_full_forward(tiny):
    ids = tiny.tokenizer.encode(PROMPT)
    out, steps = tiny.model.generate(ids, 8, prefill_chunk=3)
    full = tiny.model(torch.tensor([ids + out[:-1]]))
    torch.testing.assert_close(full[0, -1], steps[-1], atol=1e-4, rtol=1e-4)


def test_minicpm_scalings_are_applied(tiny):
    """Recompute one forward by hand from the raw tensors: scale_emb, depth scale, logit scale."""
    cfg, sd = tiny.config, tiny.state
    assert cfg.scale_emb == 12 and cfg.residual_scale == pytest.approx(1.4 / math.sqrt(8))
    assert cfg.logit_scale == pytest.approx(256 / 64)
    ids = torch.tensor([[1, 500, 42]])
    h = sd["tok_embeddings.weight"][ids] * 12.0
    emb = tiny.model.embed(ids)
    torch.testing.assert_close(emb, h)
    logits = tiny.model(ids)
    final = tiny.model.forward_embeds(h)  # same path
    torch.testing.assert_close(logits, final)
    # The head: logits = norm(h) / 4 @ E^T  -> scaling the norm weight by 4 scales logits by 4
    cache = KVCache(cfg, 8)
    last = tiny.model(ids, cache, last_only=True)
    torch.testing.assert_close(last[0, -1], logits[0, -1], atol=1e-4, rtol=1e-4)


def test_perplexity_in_expected_range(tiny):
    ids = tiny.tokenizer.encode(open(EVAL).read())
    ppl = perplexity(tiny.model, ids, count=4)
    assert 20 < ppl < 45


def test_generate_api_int4(tiny):
    res = api.generate("tiny", PROMPT, 12, quant="int4")
    assert len(res["tokens"]) == 12 and isinstance(res["text"], str)
