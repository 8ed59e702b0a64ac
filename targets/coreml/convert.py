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
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from exporter.errors import ExportError

from .options import BLOCK_SIZE, EMBEDDINGS
from .palettize import LUT_GROUP, Lut6, table_lut_function
from .patches import patched
from .shipped import ShippedWeights, shipped_constants
from .wrapper import CoreMLMiniCPM

logging.getLogger("coremltools").setLevel(logging.ERROR)
import coremltools as ct  # noqa: E402  (after quieting its import-time logging)
import coremltools.optimize.coreml as cto  # noqa: E402

EMBED_NAMES = ("p_tok_embeddings_weight_to_fp16", "p_output_weight_to_fp16")
LUT_EMBED_NAME = "p_embed_rows_to_fp16"      # CoreMLMiniCPM(row_scaled_embedding=True).embed_rows
STATE_NAMES = ("key_cache", "value_cache")
PIECE_NAME = re.compile(r"p_embed_piece_(\d+)_to_fp16")  # CoreMLMiniCPM(head_rows=...) pieces


def io_spec(cfg, context: int, chunk: int, logits_shape: list[int] | None = None) -> dict:
    """Input/output/state names and shapes of both functions (written into the manifest).

    ``logits_shape`` [1, P, R] for an --ane-head package (token id = p * R + r), else [1, 1, vocab]."""
    cache = [cfg.num_hidden_layers, cfg.num_key_value_heads, context, cfg.head_dim]
    states = {n: {"shape": cache, "dtype": "float16"} for n in STATE_NAMES}
    logits = {"shape": logits_shape or [1, 1, cfg.vocab_size], "dtype": "float16"}
    return {
        "prefill": {
            "inputs": {"input_ids": {"shape": [1, chunk], "dtype": "int32"},
                       "start_pos": {"shape": [1], "dtype": "int32"},
                       "last_index": {"shape": [1], "dtype": "int32"}},
            "outputs": {"logits": logits},
            "states": states,
        },
        "decode": {
            "inputs": {"input_ids": {"shape": [1, 1], "dtype": "int32"},
                       "start_pos": {"shape": [1], "dtype": "int32"}},
            "outputs": {"logits": logits},
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


def palettize_config(names, lut_fn) -> "cto.OptimizationConfig":
    """6-bit tables per group of LUT_GROUP hidden columns (axis 1), values from ``lut_fn``.

    No enable_per_channel_scale: for iOS < 26 coremltools folds that scale into the tables, repeating
    them per row (8.4 MB of tables for tiny). The row scale is applied in the graph instead."""
    lut = cto.OpPalettizerConfig(mode="custom", lut_function=lut_fn,
                                 granularity="per_grouped_channel", group_size=LUT_GROUP,
                                 channel_axis=1, weight_threshold=0)
    return cto.OptimizationConfig(global_config=None, op_name_configs={n: lut for n in names})


def compress(mlmodel, embedding: str, constants: dict, lut: "Lut6 | None" = None):
    """Swap the float16 weights for the shipped ones: ``constants`` (program constant name -> QTensor,
    shipped.shipped_constants) as constexpr_blockwise_shift_scale, and with ``embedding`` "lut6" the
    embedding (or its --ane-head pieces) palettized with ``lut``'s tables.

    The program is reloaded from the saved package once, both passes run on it and it is serialized
    once: the in-memory program is dropped first, so one float16 copy of the weights is alive instead
    of up to three. ``mlmodel`` is spent."""
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    if embedding not in EMBEDDINGS:
        raise ExportError(f"ios: embedding must be one of {', '.join(EMBEDDINGS)}, got '{embedding}'")
    names = [op.name for op in mlmodel._mil_program.functions["main"].operations if op.op_type == "const"]
    passes = [ShippedWeights(constants)]
    if embedding == "lut6":
        lut_names = sorted((n for n in names if PIECE_NAME.fullmatch(n)),
                           key=lambda n: int(PIECE_NAME.fullmatch(n).group(1))) \
            or [n for n in names if n == LUT_EMBED_NAME]
        if not lut_names or lut is None:
            raise ExportError(f"ios: converted program has no embedding constant {LUT_EMBED_NAME} "
                              f"(coremltools/torch naming changed?) or no palettized embedding to ship")
        passes.append(PASS_REGISTRY["compression::palettize_weights"])
        passes[1].set_options([PassOption("config", palettize_config(lut_names, table_lut_function(lut.tables))),
                               PassOption("joint_compression", False)])
    elif not any(n in constants for n in (*EMBED_NAMES, "p_embed_piece_0_to_fp16")):
        raise ExportError(f"ios: converted program has no embedding constant {EMBED_NAMES[0]} "
                          f"(coremltools/torch naming changed?)")
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
                    progress=lambda stage, msg: None, spill: bool = False, weights: dict | None = None) -> Path:
    """Write ``out`` (an .mlpackage with functions ``prefill`` and ``decode``).

    embedding None keeps every weight float16 (scheme fp16), else see EMBEDDINGS: the package then
    holds ``weights`` (the shipped QuantizedModel.tensors: QTensor codes and scales, the Lut6
    embedding) exactly. ``spill``: first move the model's large weights to mapped files
    (spill_weights: the model's modules are changed in place, same values)."""
    if (embedding == "lut6") != model.row_scaled:
        raise ExportError("ios: the palettized embedding needs CoreMLMiniCPM(row_scaled_embedding=True) "
                          "and only it")
    if chunk > model.context:
        raise ExportError(f"ios: prefill_chunk {chunk} exceeds the context window {model.context}")
    if embedding is not None and weights is None:
        raise ExportError("ios: a compressed package needs the shipped (quantized) weights")
    constants = shipped_constants(weights, model.pieces) if embedding is not None else {}
    lut = weights.get("tok_embeddings.weight") if embedding == "lut6" else None
    with tempfile.TemporaryDirectory(prefix="mcpm-coreml-") as tmp:
        if spill:
            progress("spill", "moving the float32 weights to memory-mapped files")
            spill_weights(model, Path(tmp))
        parts = {}
        for name, tokens, prefill in (("prefill", chunk, True), ("decode", 1, False)):
            progress(name, f"converting function '{name}' ({tokens} token(s))")
            mlmodel = convert_function(model, tokens, prefill, progress)
            if embedding is not None:
                progress("compress", f"'{name}': the shipped int4 per-block {BLOCK_SIZE} weights, "
                                     f"embedding {embedding}")
                mlmodel = compress(mlmodel, embedding, constants, lut)
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
