"""Byte-reproducible TVM builds: put Relax VM shape functions in a canonical statement order.

Relax's VMShapeLower emits each ``shape_func*`` (the host code computing symbolic shapes such as
``4 * seq_len * 256`` into shape-heap slots) by iterating a hash set keyed by object addresses, so the
order of its independent ``H[k] = ...`` stores changes from process to process; LLVM then schedules the
instructions differently and model.tar / model.so differ between two identical exports. This pass sorts
every run of such stores by slot when no store in the run reads a slot the run writes (then the order
cannot matter); anything it does not understand is left as it is.
"""
from __future__ import annotations

import tvm
from tvm import tirx

_LEAVES = (tirx.IntImm, tirx.FloatImm, tirx.Var)
_BINARY = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Mod, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max,
           tirx.EQ, tirx.NE, tirx.LT, tirx.LE, tirx.GT, tirx.GE, tirx.And, tirx.Or)


def _slot(indices) -> int | None:
    return int(indices[0].value) if len(indices) == 1 and isinstance(indices[0], tirx.IntImm) else None


def _reads(expr, out: set) -> bool:
    """Add (buffer name, slot or None) of every load in ``expr``; False on a node kind not handled here."""
    if isinstance(expr, _LEAVES):
        return True
    if isinstance(expr, tvm.ir.TensorLoad):          # what tirx.BufferLoad(...) builds
        out.add((getattr(expr.source, "name", str(expr.source)), _slot(expr.indices)))
        return all(_reads(i, out) for i in expr.indices)
    if isinstance(expr, _BINARY):
        return _reads(expr.a, out) and _reads(expr.b, out)
    if isinstance(expr, (tirx.Cast, tirx.Not)):
        return _reads(expr.value if isinstance(expr, tirx.Cast) else expr.a, out)
    if isinstance(expr, tirx.Select):
        return all(_reads(e, out) for e in (expr.condition, expr.true_value, expr.false_value))
    if isinstance(expr, tvm.ir.Call):
        return all(_reads(a, out) for a in expr.args)
    return False


def _sorted_run(run: list) -> list:
    writes = {(s.buffer.name, _slot(s.indices)) for s in run}
    for s in run:
        reads: set = set()
        if not _reads(s.value, reads) or any((b, k) in writes or (k is None and any(b == w for w, _ in writes))
                                             for b, k in reads):
            return run
    return sorted(run, key=lambda s: (s.buffer.name, _slot(s.indices)))


def canonical_order(body):
    if not isinstance(body, tirx.SeqStmt):
        return body
    out, run = [], []
    for stmt in list(body.seq) + [None]:
        if isinstance(stmt, tirx.BufferStore) and _slot(stmt.indices) is not None:
            run.append(stmt)
            continue
        out += _sorted_run(run)
        run = []
        if stmt is not None:
            out.append(stmt)
    return tirx.SeqStmt(out)


@tvm.transform.module_pass(opt_level=0, name="mcpm_canonical_shape_funcs")
def canonical_shape_funcs(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("shape_func"):
            mod[gv] = func.with_body(canonical_order(func.body))
    return mod
