"""What an iOS app needs to hold an exported package: memory budget and compute-unit recommendation.

Memory (bytes, estimates from the shapes; nothing here was measured on a device):
- weights: weight.bin as exported (compressed: Core ML on iOS 18 keeps constexpr weights compressed
  and decompresses them per use; a runtime that materializes them needs more, docs/ios.md);
- KV state: key_cache + value_cache, float16 [L, KV, N, D] each, at full context; one per
  conversation (one MLState each);
- working memory: one transient copy of one cache (a state read/updated in the program) plus the
  largest prefill intermediates (attention scores and probabilities [heads, C, N], the MLP's
  [C, intermediate] x3, a few [C, hidden], the logits), float16;
- peak: weights + one KV state + working memory.

Compute units: per-block int4 weights are what the GPU runs well (coremltools' performance guide
recommends per-channel int4/int8 for the Neural Engine), and the Neural Engine rejects tensors with a
dimension over 16384 (the vocabulary of the MiniCPM-2B head: 122753), so ``.cpuAndGPU`` is the
default; a package whose every dimension fits (``--ane-head``, or a small vocabulary) may try
``.cpuAndNeuralEngine``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .options import ANE_MAX_DIM, BLOCK_SIZE
from .palettize import packed_bytes

FP16 = 2


@dataclass(frozen=True)
class MemoryBudget:
    weights_bytes: int
    kv_state_bytes: int
    working_bytes: int
    peak_bytes: int
    weights_source: str          # "weight.bin" (measured size) or "estimate"

    def to_dict(self) -> dict:
        return {**asdict(self), "note": "estimate from shapes, not measured on a device (docs/ios.md)"}

    def summary(self) -> str:
        gb = human_bytes
        return (f"weights {gb(self.weights_bytes)} + KV state {gb(self.kv_state_bytes)} (full context) "
                f"+ working {gb(self.working_bytes)} = peak ~{gb(self.peak_bytes)}")


def human_bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def kv_state_bytes(cfg, context: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * context * cfg.head_dim * FP16


def working_bytes(cfg, context: int, chunk: int) -> int:
    cache = kv_state_bytes(cfg, context) // 2
    attention = 2 * cfg.num_attention_heads * chunk * context * FP16
    mlp = 3 * chunk * cfg.intermediate_size * FP16
    hidden = 4 * chunk * cfg.hidden_size * FP16
    return cache + attention + mlp + hidden + cfg.vocab_size * FP16


def estimate_weight_bytes(cfg, embedding: str | None, context: int, chunk: int) -> int:
    """weight.bin of a package (blob headers ignored): linears int4 per-block BLOCK_SIZE with float16
    scales, the tied embedding per ``embedding`` (lut6 / int8 / int4, None = everything float16), and
    the float16 constants the conversion adds: norms, a zero bias per linear, RoPE tables, the prefill
    mask's [C, N] constants."""
    L, h, i = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    linear = L * (h * q + 2 * h * kv + q * h + 3 * h * i)
    small = ((2 * L + 1) * h + L * (q + 2 * kv + 2 * h + 2 * i) + cfg.vocab_size
             + 2 * context * cfg.head_dim + 2 * chunk * context) * FP16
    vocab_params = cfg.vocab_size * h
    if embedding is None:
        return (linear + vocab_params) * FP16 + small
    int4 = lambda n: n // 2 + n // BLOCK_SIZE * FP16  # noqa: E731
    embed = {"lut6": packed_bytes(cfg.vocab_size, h), "int8": vocab_params + vocab_params // BLOCK_SIZE * FP16,
             "int4": int4(vocab_params)}[embedding]
    return int4(linear) + embed + small


def memory_budget(cfg, context: int, chunk: int, weights: int | None = None,
                  embedding: str | None = None) -> MemoryBudget:
    """``weights``: weight.bin's size when the package exists, else estimated for ``embedding``."""
    source = "weight.bin" if weights is not None else "estimate"
    weights = weights if weights is not None else estimate_weight_bytes(cfg, embedding, context, chunk)
    kv, work = kv_state_bytes(cfg, context), working_bytes(cfg, context, chunk)
    return MemoryBudget(weights, kv, work, weights + kv + work, source)


@dataclass(frozen=True)
class ComputeUnits:
    recommended: str             # the MLComputeUnits case to set in MLModelConfiguration
    reason: str
    max_tensor_dim: int
    neural_engine_max_dim: int = ANE_MAX_DIM

    def to_dict(self) -> dict:
        return asdict(self)


def compute_units(max_tensor_dim: int, embedding: str | None, ane_head: bool) -> ComputeUnits:
    weights = "per-block int4" if embedding else "float16"
    if ane_head and max_tensor_dim <= ANE_MAX_DIM:
        return ComputeUnits(".cpuAndNeuralEngine", (
            f"--ane-head: the tied head/embedding is split so that no tensor dimension exceeds "
            f"{ANE_MAX_DIM} (largest: {max_tensor_dim}); the Neural Engine can take the whole program. "
            f"Its {weights} weights may still run faster on the GPU: measure both on the device."),
            max_tensor_dim)
    fits = max_tensor_dim <= ANE_MAX_DIM
    return ComputeUnits(".cpuAndGPU", (
        f"{weights} weights run best on the GPU (coremltools recommends per-channel quantization for "
        f"the Neural Engine); "
        + (f"every tensor dimension fits the Neural Engine (largest {max_tensor_dim}), so "
           f".cpuAndNeuralEngine may also be tried" if fits else
           f"a tensor dimension of {max_tensor_dim} exceeds the Neural Engine's {ANE_MAX_DIM}, so the "
           f"embedding and head would fall back to the CPU every token there (export with --ane-head "
           f"to split them)")), max_tensor_dim)
