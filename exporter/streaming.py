"""Layer-by-layer calibration, quantization and quality gate in one bounded-memory pass.

A 2B checkpoint in fp32 is 11 GB; this never holds more than the embedding, one decoder layer in
fp32 and the (small) quantized result. Pass 1 runs the calibration windows through the fp layers one
at a time, recording E[x^2] of every linear's input (activation-aware clipping) and quantizing each
layer as soon as its statistics are known (with the recipe's quantizer, exporter/quantizers.py: X^T X
per linear input for GPTQ, E[x^2] for the clipping search); the LM head's statistics come last, so
the embedding is quantized at the end. With a sequential quantizer (GPTQ) the calibration activations
passed on to the next layer are this layer's quantized output (one more layer forward). Pass 2 runs
the gate windows through the dequantized layers, and the two perplexities are compared.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Protocol

import torch
import torch.nn.functional as F

from .config import MiniCPMConfig
from .errors import ExportError
from .model import Block, RMSNorm, rope_tables
from .quality import WINDOW, windows
from .quant import QuantizedModel, Scheme, dequantize
from .quantizers import InputRecorder, InputStats, Quantizer

TensorGetter = Callable[[str], torch.Tensor]   # canonical name -> float32 tensor


class Codec(Protocol):
    def encode(self, weight: torch.Tensor) -> "quant.Encoded": ...  # noqa: F821


def _layer(cfg: MiniCPMConfig, get: TensorGetter, i: int) -> Block:
    with torch.device("meta"):      # no random initialisation of weights about to be replaced
        block = Block(cfg)
    block.load_state_dict({k: get(f"layers.{i}.{k}") for k in block.state_dict()}, strict=True, assign=True)
    return block.eval()


def _forward_layer(block: Block, h: torch.Tensor, cos, sin) -> torch.Tensor:
    return block(h, cos, sin, None, 0, 0)


def _nll(cfg: MiniCPMConfig, norm: RMSNorm, head: torch.Tensor, h: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    total = 0.0
    for w in range(h.shape[0]):  # one window at a time: logits of a 120k vocabulary are large
        logits = F.linear(norm(h[w]) / cfg.logit_scale, head)
        total += F.cross_entropy(logits[:-1], ids[w, 1:], reduction="sum").item()
    return total, h.shape[0] * (h.shape[1] - 1)


@torch.no_grad()
def quantize_streaming(cfg: MiniCPMConfig, get: TensorGetter, names: list[str], scheme: Scheme,
                       quantizer: Quantizer, calib_ids: list[int], importance_windows: int, gate_windows: int,
                       on_step: Callable[[str], None] = lambda s: None,
                       codecs: Mapping[str, "Codec"] | None = None) -> tuple[QuantizedModel, dict | None]:
    """Quantize every tensor in ``names``; returns (model, {"ppl_fp", "ppl_int4", "tokens"} or None).
    ``codecs``: a target's own encoding of tensors the scheme keeps float16 (name -> codec); the gate
    measures the encoded tensors."""
    codecs = codecs or {}
    qm = QuantizedModel(scheme, quantizer=quantizer.name)
    imp_ids = torch.tensor(windows(calib_ids, WINDOW, importance_windows))
    gate_ids = torch.tensor(windows(calib_ids[len(imp_ids) * WINDOW:], WINDOW, gate_windows))
    if len(imp_ids) == 0:
        raise ExportError(f"calibration text is shorter than one {WINDOW}-token window")
    emb = get("tok_embeddings.weight")
    cos, sin = rope_tables(cfg, torch.arange(WINDOW))
    h_imp = emb[imp_ids] * cfg.scale_emb
    h_gate = emb[gate_ids] * cfg.scale_emb if len(gate_ids) else None
    stats: dict[str, InputStats] = {}

    def keep(name, t):
        bits = scheme.bits_for(name)
        if name in codecs and bits is None:
            qm.tensors[name] = codecs[name].encode(t)
        elif bits is None:
            qm.tensors[name] = t.to(torch.float16).numpy()
        else:
            qm.tensors[name] = quantizer.run(t, bits, stats.pop(name, None))

    for i in range(cfg.num_hidden_layers):
        block = _layer(cfg, get, i)
        with InputRecorder(block, quantizer.full_covariance, f"layers.{i}.") as rec:
            h_next = _forward_layer(block, h_imp, cos, sin)
        stats.update(rec.stats)
        if h_gate is not None:
            h_gate = _forward_layer(block, h_gate, cos, sin)
        for k, v in block.state_dict().items():
            keep(f"layers.{i}.{k}", v)
        if quantizer.sequential:   # the next layer's statistics see this layer's quantized output
            deq = _layer(cfg, lambda n: torch.from_numpy(_deq(qm.tensors[n])), i)
            h_next = _forward_layer(deq, h_imp, cos, sin)
            del deq
        h_imp = h_next
        on_step(f"layer {i}")
        del block, rec

    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    norm.weight.copy_(get("norm.weight"))
    head_name = "tok_embeddings.weight" if cfg.tie_word_embeddings else "output.weight"
    head = emb if cfg.tie_word_embeddings else get("output.weight")
    stats[head_name] = InputStats.of(norm(h_imp) / cfg.logit_scale, quantizer.full_covariance)
    quality = None
    if h_gate is not None:
        nll_fp, n = _nll(cfg, norm, head, h_gate, gate_ids)
    keep("norm.weight", norm.weight)
    keep("tok_embeddings.weight", emb)
    if not cfg.tie_word_embeddings:
        keep("output.weight", head)
    del emb, head
    on_step("embedding")
    missing = set(names) - set(qm.tensors)
    if missing:
        raise ExportError(f"tensors not quantized: {sorted(missing)[:3]}")

    if h_gate is not None and scheme.linear_bits is not None:
        deq = lambda name: torch.from_numpy(_deq(qm.tensors[name]))  # noqa: E731
        qemb = deq("tok_embeddings.weight")      # dequantized once: 1.1 GB at 2B
        hq = qemb[gate_ids] * cfg.scale_emb
        for i in range(cfg.num_hidden_layers):
            hq = _forward_layer(_layer(cfg, deq, i), hq, cos, sin)
        qnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        qnorm.weight.copy_(deq("norm.weight"))
        qhead = qemb if cfg.tie_word_embeddings else deq("output.weight")
        nll_q, _ = _nll(cfg, qnorm, qhead, hq, gate_ids)
        quality = {"ppl_fp": math.exp(nll_fp / n), "ppl_int4": math.exp(nll_q / n), "tokens": int(gate_ids.numel())}
        on_step("quality gate")
    return qm, quality


def _deq(t) -> "numpy.ndarray":  # noqa: F821
    return dequantize(t)
