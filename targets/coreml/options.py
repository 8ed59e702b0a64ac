"""ios options and the Core ML constants they name (light: no coremltools import, so the CLI can build
its flags from them)."""
from __future__ import annotations

from dataclasses import dataclass

from exporter.quant import GROUP
from targets.base import option

from .palettize import LUT_BITS, LUT_GROUP

MIN_IOS = 18
BLOCK_SIZE = GROUP          # int4 / int8 weights: one float16 scale per block of 32 inputs
ANE_MAX_DIM = 16384         # the Neural Engine's largest tensor dimension (--ane-head splits below it)

# Representations of the tied embedding / LM head: "lut6" (default of q4f16_e8), "int8", "int4".
EMBEDDINGS = {
    "lut6": {"scheme": "palettized", "bits": LUT_BITS, "op": "constexpr_lut_to_dense",
             "lut": f"per_grouped_channel (axis 1): one table of {1 << LUT_BITS} float16 values "
                    f"per {LUT_GROUP} hidden columns, 1-D k-means",
             "row_scale": "float16 max|row| per token, multiplied after the gather and on the logits",
             "tool": "targets/coreml/palettize.py Lut6Codec (gated centrally), coremltools palettize pass"},
    "int8": {"scheme": "linear_symmetric", "bits": 8, "op": "constexpr_blockwise_shift_scale",
             "granularity": f"per_block {BLOCK_SIZE} (exporter/quant.py int8 codes and scales)",
             "tool": "targets/coreml/shipped.py (the central quantizer's codes)"},
    "int4": {"scheme": "linear_symmetric", "bits": 4, "op": "constexpr_blockwise_shift_scale",
             "granularity": f"per_block {BLOCK_SIZE} (exporter/quant.py q4f16 codes and scales)",
             "tool": "targets/coreml/shipped.py (the central quantizer's codes)"},
}


@dataclass(frozen=True)
class IOSOptions:
    """ios options (exporter/cli.py makes each CLI field a flag)."""
    deployment_target: str | int = option("iOS18", "Minimum iOS of the .mlpackage; int4 weights and the "
                                                   "KV-cache states need iOS18 or newer (docs/ios.md).")
    embedding: str | None = option(None, "Tied embedding/head: 6-bit palettized (default for q4f16_e8 "
                                         "recipes), int8 or int4 (docs/ios.md).", tuple(EMBEDDINGS))
    ane_head: bool = option(False, "Split the tied embedding/head into pieces of <= 16384 rows so that every "
                                   "tensor fits the Neural Engine (.cpuAndNeuralEngine; docs/ios.md).")
    ane_head_rows: int | None = option(None, "Rows per head piece (default ANE_MAX_DIM; the tests use a "
                                             "smaller one on tiny's 8192-token vocabulary).", cli=False)


@dataclass(frozen=True)
class IOSSettings:
    deployment_target: int          # iOS major version
    embedding: str | None           # a kind of convert.EMBEDDINGS, None = float16 weights
    head_rows: int | None = None    # --ane-head: rows per head/embedding piece (ANE_MAX_DIM)
