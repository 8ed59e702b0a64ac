"""One decode protocol, one greedy loop and one parity checker for every engine the project runs.

An :class:`Engine` is anything with ``prefill(ids) -> logits`` (a fresh sequence: the logits of the
prompt's last position) and ``decode(token) -> logits`` (append one token, its logits); logits are a
1-D NumPy array or torch tensor over the vocabulary. Engines: the PyTorch reference
(exporter/model.py ReferenceEngine), the TVM host build (targets/tvm/runner.py TVMModel), the Core ML
interpreter (targets/coreml/verify.py over session.py's ChatSession), the numpy dev model
(runner/devmodel.py). :func:`greedy` is the one greedy loop over them.

:func:`check_parity` runs an engine and a reference through it and checks the engine against the
reference with a :class:`Tolerance` (per target / per part); :func:`compare` is the measurement
underneath, also used for outputs that are not a generation (the vision encoder's features per image,
a recorded on-device run). :meth:`ParityReport.check` raises ExportError naming the first step that
differs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from .errors import ExportError


class Engine(Protocol):
    def prefill(self, ids: list[int]) -> Any:
        """Start a fresh sequence with ``ids``; the logits of its last position."""

    def decode(self, token: int) -> Any:
        """Append ``token`` to the sequence; its logits."""


@dataclass
class Generation:
    tokens: list[int]
    logits: list = field(repr=False)   # logits that chose each new token (as the engine returned them)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_len: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_len / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = max(len(self.tokens) - 1, 0)      # the first new token comes from prefill
        return n / self.decode_s if self.decode_s else 0.0


def greedy(engine: Engine, prompt: list[int], max_new_tokens: int, stop_ids: Sequence[int] | set[int] = (),
           forced: Sequence[int] | None = None) -> Generation:
    """The greedy loop: prefill, then argmax (first maximum) and decode until ``max_new_tokens`` or a
    stop token (kept as the last token). ``forced`` (teacher forcing): decode ``forced[i]`` instead of
    the engine's own choice, so one near-tie cannot derail a comparison of logits."""
    stop = set(stop_ids)
    t0 = time.perf_counter()
    logits = engine.prefill(list(prompt))
    t1 = time.perf_counter()
    out, steps = [], []
    for i in range(max_new_tokens):
        steps.append(logits)
        nxt = int(logits.argmax())
        out.append(nxt)
        if nxt in stop or i == max_new_tokens - 1:
            break
        logits = engine.decode(int(forced[i]) if forced is not None else nxt)
    t2 = time.perf_counter()
    return Generation(out, steps, prefill_s=t1 - t0, decode_s=t2 - t1, prompt_len=len(prompt))


@dataclass(frozen=True)
class Tolerance:
    """What an engine must reproduce of its reference. Bounds are on every compared step:
    ``logit_atol`` max |engine - reference|, ``rtol`` max |engine - reference| / max |reference|
    (None: not checked). ``reference`` names what the bounds are measured against (messages, manifests)."""
    logit_atol: float | None = None
    rtol: float | None = None
    tokens_must_match: bool = True
    teacher_forced: bool = False         # the engine decodes the reference's tokens (check_parity)
    reference: str = "the reference"
    quantity: str = "logits"             # what is compared: logits, features


def _as_array(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float32)


@dataclass
class ParityReport:
    tolerance: Tolerance
    tokens: list[int] | None            # the engine's greedy tokens (None: not a generation)
    ref_tokens: list[int] | None
    abs_diff: list[float]               # per compared step: max |engine - reference|
    rel_err: list[float]                # per compared step: max |engine - reference| / max |reference|

    @property
    def steps(self) -> int:
        return len(self.abs_diff)

    @property
    def tokens_match(self) -> bool:
        return self.tokens == self.ref_tokens

    @property
    def max_abs_diff(self) -> float:
        return max(self.abs_diff, default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max(self.rel_err, default=0.0)

    def first_token_diff(self) -> int | None:
        if self.tokens_match or self.tokens is None or self.ref_tokens is None:
            return None
        return next((i for i, (a, b) in enumerate(zip(self.tokens, self.ref_tokens)) if a != b),
                    min(len(self.tokens), len(self.ref_tokens)))

    def check(self, label: str) -> "ParityReport":
        """ExportError ``"<label>: ..."`` naming the first differing step; else self."""
        tol, what = self.tolerance, self.tolerance.quantity
        first = self.first_token_diff() if tol.tokens_must_match else None
        if first is not None:
            got = self.tokens[first] if first < len(self.tokens) else "nothing"
            want = self.ref_tokens[first] if first < len(self.ref_tokens) else "nothing"
            raise ExportError(f"{label}: greedy tokens differ from {tol.reference} at step {first} "
                              f"({got} vs {want}; max |{what} diff| {self.max_abs_diff:.2e})")
        for name, values, bound, kind in (("logit_atol", self.abs_diff, tol.logit_atol, ""),
                                          ("rtol", self.rel_err, tol.rtol, "relative; ")):
            if bound is None:
                continue
            bad = next((i for i, v in enumerate(values) if not v <= bound), None)   # NaN fails too
            if bad is not None:
                at = f" at step {bad}" if len(values) > 1 else ""
                raise ExportError(f"{label}: {what} differ from {tol.reference} by {values[bad]:.2e}{at} "
                                  f"({kind}bound {bound:g})")
        return self


def compare(got: Sequence, ref: Sequence, tol: Tolerance, got_tokens: list[int] | None = None,
            ref_tokens: list[int] | None = None) -> ParityReport:
    """Measure outputs step by step (the shorter sequence's steps); nothing raised (see .check)."""
    abs_diff, rel_err = [], []
    for g, r in zip(got, ref):
        g, r = _as_array(g), _as_array(r)
        if g.shape != r.shape:
            raise ExportError(f"parity: {tol.quantity} of shape {g.shape} against the reference's {r.shape}")
        d = float(np.abs(g - r).max()) if g.size else 0.0
        abs_diff.append(d)
        rel_err.append(d / max(float(np.abs(r).max()) if r.size else 0.0, 1e-6))
    return ParityReport(tol, got_tokens, ref_tokens, abs_diff, rel_err)


def check_parity(engine: Engine, reference: Engine | Generation, prompt: list[int], steps: int,
                 tolerance: Tolerance, label: str) -> ParityReport:
    """Greedy ``steps`` tokens of ``engine`` against ``reference`` (an engine, or its Generation already
    run on ``prompt``); ExportError naming the first differing step beyond ``tolerance``."""
    ref = reference if isinstance(reference, Generation) else greedy(reference, prompt, steps)
    got = greedy(engine, prompt, steps, forced=ref.tokens if tolerance.teacher_forced else None)
    return compare(got.logits, ref.logits, tolerance, got.tokens, ref.tokens).check(label)
