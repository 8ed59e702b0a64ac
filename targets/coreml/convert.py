"""PyTorch (CoreMLMiniCPM) -> stateful, int4, two-function Core ML ML Program (.mlpackage).

Steps: torch.export each function at its fixed token count (``prefill``: the recipe's
prefill_chunk, ``decode``: 1) -> ct.convert with the KV cache as float16 states -> weight
compression (linear weights int4 per-block 32; embedding / tied head 6-bit palettized, or int8 / int4)
-> one multifunction package whose functions share one copy of the weights (save_multifunction dedups
constants).
"""
from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from exporter.errors import ExportError

from .palettize import LUT_BITS, LUT_GROUP, lut_function
from .wrapper import CoreMLMiniCPM

logging.getLogger("coremltools").setLevel(logging.ERROR)
import coremltools as ct  # noqa: E402  (after quieting its import-time logging)
import coremltools.optimize.coreml as cto  # noqa: E402

@contextmanager
def quiet():
    """Silence coremltools' tqdm bars and warnings (progress is reported through rich instead)."""
    import tqdm
    from coremltools.converters.mil.frontend.torch import ops as torch_ops
    from coremltools.converters.mil.mil.passes import pass_pipeline
    from coremltools.optimize.coreml import _quantization_passes

    silent = functools.partial(tqdm.tqdm, disable=True)
    saved = (torch_ops._tqdm, pass_pipeline.tqdm, _quantization_passes.tqdm)
    torch_ops._tqdm = pass_pipeline.tqdm = _quantization_passes.tqdm = silent
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_ops._tqdm, pass_pipeline.tqdm, _quantization_passes.tqdm = saved


MIN_IOS = 18
BLOCK_SIZE = 32
EMBED_NAMES = ("p_tok_embeddings_weight_to_fp16", "p_output_weight_to_fp16")
LUT_EMBED_NAME = "p_embed_rows_to_fp16"      # CoreMLMiniCPM(row_scaled_embedding=True).embed_rows
STATE_NAMES = ("key_cache", "value_cache")


def io_spec(cfg, context: int, chunk: int) -> dict:
    """Input/output/state names and shapes of both functions (written into the manifest)."""
    cache = [cfg.num_hidden_layers, cfg.num_key_value_heads, context, cfg.head_dim]
    states = {n: {"shape": cache, "dtype": "float16"} for n in STATE_NAMES}
    return {
        "prefill": {
            "inputs": {"input_ids": {"shape": [1, chunk], "dtype": "int32"},
                       "start_pos": {"shape": [1], "dtype": "int32"},
                       "last_index": {"shape": [1], "dtype": "int32"}},
            "outputs": {"logits": {"shape": [1, 1, cfg.vocab_size], "dtype": "float16"}},
            "states": states,
        },
        "decode": {
            "inputs": {"input_ids": {"shape": [1, 1], "dtype": "int32"},
                       "start_pos": {"shape": [1], "dtype": "int32"}},
            "outputs": {"logits": {"shape": [1, 1, cfg.vocab_size], "dtype": "float16"}},
            "states": states,
        },
    }


def convert_function(model: CoreMLMiniCPM, tokens: int, prefill: bool) -> "ct.models.MLModel":
    """One fixed-shape function, float16, KV cache as states (not yet compressed)."""
    zeros = lambda *s: torch.zeros(*s, dtype=torch.int32)  # noqa: E731
    example = (zeros(1, tokens), zeros(1)) + ((zeros(1),) if prefill else ())
    inputs = [ct.TensorType(name="input_ids", shape=(1, tokens), dtype=np.int32),
              ct.TensorType(name="start_pos", shape=(1,), dtype=np.int32)]
    if prefill:
        inputs.append(ct.TensorType(name="last_index", shape=(1,), dtype=np.int32))
    states = [ct.StateType(wrapped_type=ct.TensorType(shape=tuple(getattr(model, n).shape),
                                                      dtype=np.float16), name=n)
              for n in STATE_NAMES]
    model.reset()
    with torch.no_grad(), quiet():
        program = torch.export.export(model, example).run_decompositions({})
        return ct.convert(program, inputs=inputs, states=states,
                          outputs=[ct.TensorType(name="logits", dtype=np.float16)],
                          minimum_deployment_target=ct.target.iOS18,
                          compute_precision=ct.precision.FLOAT16)


# Representations of the tied embedding / LM head: "lut6" (default of q4f16_e8), "int8", "int4".
EMBEDDINGS = {
    "lut6": {"scheme": "palettized", "bits": LUT_BITS, "op": "constexpr_lut_to_dense",
             "lut": f"per_grouped_channel (axis 1): one table of {1 << LUT_BITS} float16 values "
                    f"per {LUT_GROUP} hidden columns, 1-D k-means",
             "row_scale": "float16 max|row| per token, multiplied after the gather and on the logits",
             "tool": "coremltools.optimize.coreml.palettize_weights"},
    "int8": {"scheme": "linear_symmetric", "bits": 8, "op": "constexpr_blockwise_shift_scale",
             "granularity": "per_channel (row)",
             "tool": "coremltools.optimize.coreml.linear_quantize_weights"},
    "int4": {"scheme": "linear_symmetric", "bits": 4, "op": "constexpr_blockwise_shift_scale",
             "granularity": f"per_block {BLOCK_SIZE}",
             "tool": "coremltools.optimize.coreml.linear_quantize_weights"},
}


def _int4_config():
    return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                       block_size=BLOCK_SIZE, weight_threshold=0)


def compression_config(mlmodel, embedding: str = "lut6") -> "cto.OptimizationConfig":
    """int4 per-block for every 2-D linear weight; the embedding/head per ``embedding`` (None when it
    is palettized by a separate pass, see palettize_config); everything else untouched."""
    if embedding not in EMBEDDINGS:
        raise ExportError(f"ios: embedding must be one of {', '.join(EMBEDDINGS)}, got '{embedding}'")
    embed = {"lut6": None, "int4": _int4_config(),
             "int8": cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                 granularity="per_channel", weight_threshold=0),
             }[embedding]
    names: dict = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type != "const":
            continue
        val = op.outputs[0].val
        users = {c.op_type for c in op.outputs[0].child_ops}
        if op.name in EMBED_NAMES or op.name == LUT_EMBED_NAME:
            names[op.name] = embed
        elif isinstance(val, np.ndarray) and val.ndim == 2 and users == {"linear"}:
            names[op.name] = _int4_config()
        else:
            names[op.name] = None
    want = (LUT_EMBED_NAME,) if embedding == "lut6" else EMBED_NAMES
    if not any(n in names for n in want):
        raise ExportError(f"ios: converted program has no embedding constant {want[0]} "
                          f"(coremltools/torch naming changed?)")
    return cto.OptimizationConfig(global_config=None, op_name_configs=names)


def palettize_config() -> "cto.OptimizationConfig":
    """6-bit tables per group of LUT_GROUP hidden columns (axis 1), values from our own k-means.

    No enable_per_channel_scale: for iOS < 26 coremltools folds that scale into the tables, repeating
    them per row (8.4 MB of tables for tiny). The row scale is applied in the graph instead."""
    lut = cto.OpPalettizerConfig(mode="custom", lut_function=lut_function,
                                 granularity="per_grouped_channel", group_size=LUT_GROUP,
                                 channel_axis=1, weight_threshold=0)
    return cto.OptimizationConfig(global_config=None, op_name_configs={LUT_EMBED_NAME: lut})


def compress(mlmodel, embedding: str = "lut6"):
    config = compression_config(mlmodel, embedding)
    with quiet():
        mlmodel = cto.linear_quantize_weights(mlmodel, config)
        if embedding == "lut6":
            mlmodel = cto.palettize_weights(mlmodel, palettize_config())
    return mlmodel


def build_mlpackage(model: CoreMLMiniCPM, chunk: int, out: Path, embedding: str | None = "lut6",
                    progress=lambda stage, msg: None) -> Path:
    """Write ``out`` (an .mlpackage with functions ``prefill`` and ``decode``).

    embedding None keeps every weight float16 (scheme fp16), else see EMBEDDINGS."""
    if (embedding == "lut6") != (model.embed_rows is not None):
        raise ExportError("ios: the palettized embedding needs CoreMLMiniCPM(row_scaled_embedding=True) "
                          "and only it")
    if chunk > model.context:
        raise ExportError(f"ios: prefill_chunk {chunk} exceeds the context window {model.context}")
    with tempfile.TemporaryDirectory(prefix="mcpm-coreml-") as tmp:
        parts = {}
        for name, tokens, prefill in (("prefill", chunk, True), ("decode", 1, False)):
            progress("coreml", f"converting function '{name}' ({tokens} token(s))")
            mlmodel = convert_function(model, tokens, prefill)
            if embedding is not None:
                progress("coreml", f"compressing '{name}' weights (int4 per-block {BLOCK_SIZE}, "
                                   f"embedding {embedding})")
                mlmodel = compress(mlmodel, embedding)
            parts[name] = Path(tmp) / f"{name}.mlpackage"
            mlmodel.save(str(parts[name]))
            del mlmodel
        progress("coreml", "merging into one multifunction package (shared weights)")
        desc = ct.utils.MultiFunctionDescriptor()
        for name, path in parts.items():
            desc.add_function(str(path), src_function_name="main", target_function_name=name)
        desc.default_function_name = "decode"
        if out.exists():
            shutil.rmtree(out)
        with quiet():
            ct.utils.save_multifunction(desc, str(out))
    model.reset()
    return out


def weight_file(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
