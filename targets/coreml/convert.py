"""PyTorch (CoreMLMiniCPM) -> stateful, int4, two-function Core ML ML Program (.mlpackage).

Steps: torch.export each function at its fixed token count (``prefill``: the recipe's
prefill_chunk, ``decode``: 1) -> ct.convert with the KV cache as float16 states -> weight
compression (linear weights int4 per-block 32; embedding / tied head 8-bit) -> one multifunction
package whose functions share one copy of the weights (save_multifunction dedups constants).
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


def compression_config(mlmodel, embed_bits: int = 8) -> "cto.OptimizationConfig":
    """int4 per-block for every 2-D linear weight; the embedding/head at ``embed_bits``; rest untouched."""
    int4 = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4",
                                       granularity="per_block", block_size=BLOCK_SIZE,
                                       weight_threshold=0)
    if embed_bits == 8:
        embed = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                            granularity="per_channel", weight_threshold=0)
    elif embed_bits == 4:
        embed = int4
    else:
        raise ExportError(f"ios: embedding bits must be 4 or 8, got {embed_bits}")
    names: dict = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type != "const":
            continue
        val = op.outputs[0].val
        users = {c.op_type for c in op.outputs[0].child_ops}
        if op.name in EMBED_NAMES:
            names[op.name] = embed
        elif isinstance(val, np.ndarray) and val.ndim == 2 and users == {"linear"}:
            names[op.name] = int4
        else:
            names[op.name] = None
    if not any(n in names for n in EMBED_NAMES):
        raise ExportError(f"ios: converted program has no embedding constant {EMBED_NAMES[0]} "
                          f"(coremltools/torch naming changed?)")
    return cto.OptimizationConfig(global_config=None, op_name_configs=names)


def compress(mlmodel, embed_bits: int = 8):
    with quiet():
        return cto.linear_quantize_weights(mlmodel, compression_config(mlmodel, embed_bits))


def build_mlpackage(model: CoreMLMiniCPM, chunk: int, out: Path, embed_bits: int | None = 8,
                    progress=lambda stage, msg: None) -> Path:
    """Write ``out`` (an .mlpackage with functions ``prefill`` and ``decode``).

    embed_bits None keeps every weight float16 (scheme fp16)."""
    if chunk > model.context:
        raise ExportError(f"ios: prefill_chunk {chunk} exceeds the context window {model.context}")
    with tempfile.TemporaryDirectory(prefix="mcpm-coreml-") as tmp:
        parts = {}
        for name, tokens, prefill in (("prefill", chunk, True), ("decode", 1, False)):
            progress("coreml", f"converting function '{name}' ({tokens} token(s))")
            mlmodel = convert_function(model, tokens, prefill)
            if embed_bits is not None:
                progress("coreml", f"compressing '{name}' weights (int4 per-block {BLOCK_SIZE}, "
                                   f"embedding {embed_bits}-bit)")
                mlmodel = compress(mlmodel, embed_bits)
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
