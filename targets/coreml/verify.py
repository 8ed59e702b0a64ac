"""Check a saved .mlpackage on Linux: structure, then numbers via the NumPy MIL interpreter.

Structure: functions ``prefill``/``decode`` present, the KV-cache states present in both, int4
weights held as constexpr_blockwise_shift_scale, the embedding as one of those or as a palettized
constexpr_lut_to_dense, no float32 weight blobs left.

Numbers: prefill (in chunks, the way an app drives it, see docs/ios.md) then greedy decode steps
through the package's own states, compared with the PyTorch reference model loaded with the
package's weights decompressed exactly as Core ML does ("PyTorch int4 reference").
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from coremltools.converters.mil.mil import types

from exporter.config import MiniCPMConfig
from exporter.errors import ExportError
from exporter.model import MiniCPM, ReferenceEngine
from exporter.parity import ParityReport, Tolerance, compare, greedy

from .convert import LUT_EMBED_NAME, PIECE_NAME, STATE_NAMES, spill_large
from .mil_interp import Interpreter
from .palettize import LUT_BITS
from .session import ChatSession, Contract
from .shipped import mil_const_name
from .wrapper import flat_logits

FUNCTIONS = ("prefill", "decode")
# Core ML computes activations in float16; the reference in float32 with identical weights.
# Measured on tiny: ~0.03; a wiring mistake (wrong scale, cache slot, rope) gives >1.
LOGIT_BOUND = 0.25


def max_tensor_dim(interp: Interpreter) -> tuple[int, str]:
    """The largest dimension of any tensor (inputs, states, every op's outputs) in any function,
    and where it is ("function:name shape")."""
    best, where = 0, ""
    for fname, fn in interp.program.functions.items():
        vars_ = list(fn.inputs.values()) + [o for op in fn.operations for o in op.outputs]
        for var in vars_:
            sym = var.sym_type
            if types.is_state(sym):
                sym = sym.wrapped_type()
            shape = getattr(sym, "get_shape", lambda: ())()
            dims = [int(d) for d in shape if isinstance(d, (int, np.integer))]
            if dims and max(dims) > best:
                best, where = max(dims), f"{fname}:{var.name} {list(shape)}"
    return best, where


def structure(interp: Interpreter, embedding: str | None = None, max_dim: int | None = None) -> dict:
    """Structural facts about the program; raises ExportError when something required is absent.

    ``embedding`` "lut6" also requires the 6-bit palettized embedding, "int8" an int8 one.
    ``max_dim`` (--ane-head): no tensor of either function may have a dimension above it."""
    prog = interp.program
    for name in FUNCTIONS:
        if name not in prog.functions:
            raise ExportError(f"Core ML package lacks function '{name}' "
                              f"(has: {', '.join(prog.functions)})")
    facts = {"functions": sorted(prog.functions), "int4_weights": 0, "int8_weights": 0,
             "lut_weights": {}, "fp32_constants": []}
    for name in FUNCTIONS:
        fn = prog.functions[name]
        states = [n for n, v in fn.inputs.items() if types.is_state(v.sym_type)]
        if sorted(states) != sorted(STATE_NAMES):
            raise ExportError(f"Core ML function '{name}' has states {states}, expected {list(STATE_NAMES)}")
        for op in fn.operations:
            if op.op_type == "constexpr_blockwise_shift_scale" and name == "decode":
                bits = op.data.dtype.get_bitwidth() if types.is_int(op.data.dtype) else None
                if bits in (4, 8):
                    facts[f"int{bits}_weights"] += 1
            elif op.op_type == "constexpr_lut_to_dense" and name == "decode":
                facts["lut_weights"][op.name] = {"bits": op.indices.dtype.get_bitwidth(),
                                                 "lut_shape": list(op.lut.shape)}
            elif op.op_type == "const":
                val = op.outputs[0].val
                if isinstance(val, np.ndarray) and val.dtype == np.float32 and val.size > 1:
                    facts["fp32_constants"].append(f"{name}:{op.name}")
    if facts["fp32_constants"]:
        raise ExportError(f"Core ML package keeps float32 weights: {facts['fp32_constants'][:3]}")
    if facts["int4_weights"] == 0:
        raise ExportError("Core ML package has no int4 (constexpr_blockwise_shift_scale) weights")
    pieces = sorted(n for n in facts["lut_weights"] if PIECE_NAME.fullmatch(n.removesuffix("_palettized")))
    luts = ([facts["lut_weights"][n] for n in pieces]
            or [facts["lut_weights"].get(LUT_EMBED_NAME + "_palettized", {})])
    if embedding == "lut6" and any(lut.get("bits") != LUT_BITS for lut in luts):
        raise ExportError(f"Core ML package lacks the {LUT_BITS}-bit palettized embedding "
                          f"(constexpr_lut_to_dense '{LUT_EMBED_NAME}_palettized'): {luts}")
    if embedding == "int8" and facts["int8_weights"] == 0:
        raise ExportError("Core ML package lacks the int8 embedding (constexpr_blockwise_shift_scale)")
    facts["max_tensor_dim"], where = max_tensor_dim(interp)
    if max_dim is not None and facts["max_tensor_dim"] > max_dim:
        raise ExportError(f"Core ML package has a tensor dimension {facts['max_tensor_dim']} > {max_dim} "
                          f"({where}): not Neural Engine friendly")
    return facts


def model_from_state(cfg: MiniCPMConfig, state: dict[str, torch.Tensor]) -> MiniCPM:
    """MiniCPM holding ``state``'s tensors themselves: no randomly initialised copy first (for
    MiniCPM-2B, MiniCPM.from_state_dict briefly holds two float32 models, 2 x 10.9 GB)."""
    with torch.device("meta"):
        model = MiniCPM(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def package_state_dict(interp: Interpreter, names: list[str], function: str = "decode",
                       store=None) -> dict:
    """Canonical-name float32 weights as Core ML materialises them (int4/int8 decompressed).

    The decompressed float16 values are not kept in the interpreter's cache (each is converted
    to float32 and dropped), so the model's weights exist once in float32 here, not also in float16.
    ``store(tensor) -> tensor`` is applied to each (numerics maps the large ones from files:
    convert.spill_large)."""
    store = store or (lambda t: t)
    by_name = {}
    for op in interp.program.functions[function].operations:
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            by_name[op.outputs[0].name] = op
    out = {}
    for canon in names:
        base = mil_const_name(canon)
        op = by_name.get(base + "_quantized", by_name.get(base))
        if canon == "tok_embeddings.weight" and _piece_count(by_name):
            out[canon] = store(torch.from_numpy(_embedding_from_pieces(interp, function, by_name)))
            continue
        if canon == "tok_embeddings.weight" and LUT_EMBED_NAME + "_palettized" in by_name:
            rows = interp.constant(function, by_name[LUT_EMBED_NAME + "_palettized"], cache=False)
            scale = interp.constant(function, by_name["b_embed_row_scale_to_fp16"], cache=False)
            dense = np.asarray(rows, np.float32)
            del rows
            dense *= np.asarray(scale, np.float32)[:, None]
            out[canon] = store(torch.from_numpy(dense))
            del dense
            continue
        if op is None:
            raise ExportError(f"Core ML package has no constant for weight '{canon}' ({base})")
        out[canon] = store(torch.from_numpy(np.asarray(interp.constant(function, op, cache=False),
                                                       dtype=np.float32)))
    return out


def _piece_count(by_name) -> int:
    return len({n.removesuffix("_palettized").removesuffix("_quantized") for n in by_name
                if PIECE_NAME.fullmatch(n.removesuffix("_palettized").removesuffix("_quantized"))})


def _embedding_from_pieces(interp: Interpreter, function: str, by_name: dict) -> np.ndarray:
    """The --ane-head pieces (each palettized with its row scales, or int4/int8, or float16) as one
    float32 [vocab, hidden] matrix."""
    parts = []
    for p in range(_piece_count(by_name)):
        base = f"p_embed_piece_{p}_to_fp16"
        op = next((by_name[k] for k in (base + "_palettized", base + "_quantized", base) if k in by_name), None)
        if op is None:
            raise ExportError(f"Core ML package has no constant for head piece {p} ({base})")
        part = np.asarray(interp.constant(function, op, cache=False), np.float32)
        scale = by_name.get(f"b_embed_piece_scale_{p}_to_fp16")
        if scale is not None:
            part = part * np.asarray(interp.constant(function, scale, cache=False), np.float32)[:, None]
        parts.append(part)
    return np.concatenate(parts)


# Core ML vs the PyTorch int4 reference (exporter/parity): teacher forced, so one near-tie cannot
# derail the comparison of logits; every greedy token must still match.
TOLERANCE = Tolerance(logit_atol=LOGIT_BOUND, tokens_must_match=True, teacher_forced=True,
                      reference="the PyTorch int4 reference")


@dataclass
class NumericReport:
    prompt_tokens: int
    parity: ParityReport

    @property
    def steps(self) -> int:
        return self.parity.steps

    @property
    def tokens_coreml(self) -> list[int]:
        return self.parity.tokens

    @property
    def tokens_reference(self) -> list[int]:
        return self.parity.ref_tokens

    @property
    def max_abs_logit_diff(self) -> float:
        return self.parity.max_abs_diff

    @property
    def logit_bound(self) -> float:
        return self.parity.tolerance.logit_atol

    @property
    def tokens_match(self) -> bool:
        return self.parity.tokens_match

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "steps": self.steps,
                "max_abs_logit_diff": round(self.max_abs_logit_diff, 4), "logit_bound": self.logit_bound,
                "tokens_match": self.tokens_match}


@dataclass
class SessionEngine:
    """session.py's ChatSession (the app's loop: chunked prefill, then decode) as an exporter/parity Engine."""
    session: ChatSession
    vocab: int
    progress: Callable[[str, str], None] = lambda s, m: None
    steps: int = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.session.reset()
        self.progress("verify", f"Core ML prefill of {len(ids)} tokens (NumPy MIL interpreter)")
        return flat_logits(self.session.feed(ids), self.vocab).astype(np.float32)

    def decode(self, token: int) -> np.ndarray:
        self.steps += 1
        if self.steps % 8 == 0:
            self.progress("verify", f"decode step {self.steps}")
        return flat_logits(self.session.step(token), self.vocab).astype(np.float32)


def numerics(interp: Interpreter, cfg: MiniCPMConfig, state_names: list[str], prompt: list[int],
             context: int, chunk: int, steps: int = 32, progress=lambda s, m: None) -> NumericReport:
    """Greedy prefill + ``steps`` decode steps: Core ML program vs PyTorch with the same weights."""
    if len(prompt) + steps > context:
        raise ExportError(f"verify: prompt {len(prompt)} + {steps} steps exceeds context {context}")
    ref = model_from_state(cfg, package_state_dict(interp, state_names, store=spill_large))
    reference = greedy(ReferenceEngine(ref, len(prompt) + steps, chunk), prompt, steps)
    del ref     # the float32 reference goes before the interpreter materialises its float16 weights
    gc.collect()
    cache_shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, context, cfg.head_dim)
    # the app's loop (docs/ios.md's Swift, transcribed in session.py): chunked prefill, then decode
    session = ChatSession(interp, Contract(chunk, context, cfg.vocab_size, cfg.bos_token_id,
                                           cfg.eos_token_id, cache_shape))
    got = greedy(SessionEngine(session, cfg.vocab_size, progress), prompt, steps, forced=reference.tokens)
    return NumericReport(len(prompt), compare(got.logits, reference.logits, TOLERANCE, got.tokens, reference.tokens))


def check(report: NumericReport, where: Path) -> None:
    report.parity.check(f"{where}: Core ML")
