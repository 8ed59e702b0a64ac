"""PyTorch (CoreMLMiniCPM) -> stateful, int4, two-function Core ML ML Program (.mlpackage).

Steps: torch.export each function at its fixed token count (``prefill``: the recipe's
prefill_chunk, ``decode``: 1) -> ct.convert with the KV cache as float16 states -> weight
compression (linear weights int4 per-block 32; embedding / tied head 6-bit palettized, or int8 / int4)
-> one multifunction package whose functions share one copy of the weights (save_multifunction dedups
constants).

Memory (docs/ios.md, bench/RESULTS.md): the float32 torch weights can be mapped from files
(spill_weights), two coremltools helpers that make full-size temporaries of every weight are swapped
for sliced equivalents (patches.py, which declares every coremltools patch and checks the pinned
version), and compression reloads the package once for both passes.
"""
from __future__ import annotations

import gc
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from exporter.errors import ExportError

from .palettize import LUT_BITS, LUT_GROUP, lut_function
from .patches import patched
from .wrapper import CoreMLMiniCPM

logging.getLogger("coremltools").setLevel(logging.ERROR)
import coremltools as ct  # noqa: E402  (after quieting its import-time logging)
import coremltools.optimize.coreml as cto  # noqa: E402

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


def convert_function(model: CoreMLMiniCPM, tokens: int, prefill: bool,
                     progress=lambda stage, msg: None) -> "ct.models.MLModel":
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
    with torch.no_grad(), patched():
        progress("export", "torch.export + run_decompositions")
        program = torch.export.export(model, example).run_decompositions({})
        progress("convert", "ct.convert")
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
    """The passes of cto.linear_quantize_weights and cto.palettize_weights, run together.

    Each public function reloads the whole float16 program from the saved package while the caller's
    model still holds its own in-memory copy, and writes a new package. Here the in-memory program
    is dropped first (only its op names are needed, for the config), the package is reloaded once,
    both passes run on it and it is serialized once: one float16 copy of the weights alive instead
    of up to three. ``mlmodel`` is spent. Same program as the two calls in sequence (the reload
    keeps the ops of the saved package; weight.bin byte-identical on tiny)."""
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    config = compression_config(mlmodel, embedding)
    passes = [PASS_REGISTRY["compression::linear_quantize_weights"]]
    passes[0].set_options([PassOption("config", config), PassOption("joint_compression", False)])
    if embedding == "lut6":
        passes.append(PASS_REGISTRY["compression::palettize_weights"])
        passes[1].set_options([PassOption("config", palettize_config()),
                               PassOption("joint_compression", False)])
    mlmodel._mil_program = None
    gc.collect()
    with patched():
        return _apply_graph_pass(mlmodel, passes)


SPILL_MIN = 1 << 20     # parameters with at least this many values are spilled


def spill_tensor(t: torch.Tensor, directory: Path | None = None) -> torch.Tensor:
    """A copy of ``t`` mapped from a file (same values, dtype, shape). The file is unlinked at once:
    the mapping keeps it alive until the tensor is freed, so nothing is left to clean up.

    The pages are clean page cache, read back on demand and dropped under memory pressure, not
    anonymous memory the machine must hold. (A shared mapping, so the storage knows its file name,
    see _is_mapped; nothing writes to these weights.)"""
    fd, path = tempfile.mkstemp(prefix="mcpm-spill-", suffix=".bin", dir=directory)
    try:
        with open(fd, "wb") as f:
            t.detach().contiguous().numpy().tofile(f)
        mapped = torch.from_file(path, shared=True, size=t.numel(), dtype=t.dtype)
    finally:
        Path(path).unlink()
    return mapped.view(t.shape)


def _is_mapped(t: torch.Tensor) -> bool:
    """True when ``t``'s storage is already a file mapping made by spill_tensor."""
    return getattr(t.untyped_storage(), "filename", None) is not None


def spill_large(t: torch.Tensor) -> torch.Tensor:
    """spill_tensor for tensors of SPILL_MIN values or more; smaller ones are returned as they are."""
    return spill_tensor(t) if t.numel() >= SPILL_MIN else t


def spill_weights(model: torch.nn.Module, directory: Path | None = None) -> int:
    """Replace the model's large parameters (SPILL_MIN values or more) by spill_tensor copies.

    ct.convert needs the float32 torch weights (4 bytes per parameter, 10.9 GB for MiniCPM-2B) while
    it builds its own float16 copy, for each function; mapped, they need not stay in memory. Modules
    are modified in place (also where shared with the caller's model), values unchanged, parameters
    used twice stay one. Returns the bytes spilled."""
    done: dict[int, torch.nn.Parameter] = {}
    total = 0
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or p.numel() < SPILL_MIN or _is_mapped(p):
                continue
            if id(p) not in done:
                done[id(p)] = torch.nn.Parameter(spill_tensor(p, directory), requires_grad=False)
                total += p.numel() * p.element_size()
            mod._parameters[name] = done[id(p)]
    gc.collect()
    return total


def build_mlpackage(model: CoreMLMiniCPM, chunk: int, out: Path, embedding: str | None = "lut6",
                    progress=lambda stage, msg: None, spill: bool = False) -> Path:
    """Write ``out`` (an .mlpackage with functions ``prefill`` and ``decode``).

    embedding None keeps every weight float16 (scheme fp16), else see EMBEDDINGS. ``spill``: first
    move the model's large weights to mapped files (spill_weights: the model's modules are changed
    in place, same values)."""
    if (embedding == "lut6") != (model.embed_rows is not None):
        raise ExportError("ios: the palettized embedding needs CoreMLMiniCPM(row_scaled_embedding=True) "
                          "and only it")
    if chunk > model.context:
        raise ExportError(f"ios: prefill_chunk {chunk} exceeds the context window {model.context}")
    with tempfile.TemporaryDirectory(prefix="mcpm-coreml-") as tmp:
        if spill:
            progress("spill", "moving the float32 weights to memory-mapped files")
            spill_weights(model, Path(tmp))
        parts = {}
        for name, tokens, prefill in (("prefill", chunk, True), ("decode", 1, False)):
            progress(name, f"converting function '{name}' ({tokens} token(s))")
            mlmodel = convert_function(model, tokens, prefill, progress)
            if embedding is not None:
                progress("compress", f"compressing '{name}' weights (int4 per-block {BLOCK_SIZE}, "
                                   f"embedding {embedding})")
                mlmodel = compress(mlmodel, embedding)
                gc.collect()
            parts[name] = Path(tmp) / f"{name}.mlpackage"
            progress("save", f"saving '{name}'")
            mlmodel.save(str(parts[name]))
            del mlmodel
            gc.collect()
        progress("merge", "merging into one multifunction package (shared weights)")
        desc = ct.utils.MultiFunctionDescriptor()
        for name, path in parts.items():
            desc.add_function(str(path), src_function_name="main", target_function_name=name)
        desc.default_function_name = "decode"
        if out.exists():
            shutil.rmtree(out)
        with patched():
            ct.utils.save_multifunction(desc, str(out))
    model.reset()
    return out


def weight_file(package: Path) -> Path:
    return package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
