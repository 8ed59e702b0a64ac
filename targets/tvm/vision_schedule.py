"""CPU schedule for the fp32 matmuls of the vision graph (targets/tvm/vision.py).

Relax's default lowering of ``matmul`` is the textbook ``for i, j, k`` nest: the reduction is the
innermost loop and walks B[k, j] column-wise, one thread, no SIMD. Every matmul-like block
(``C[b.., i, j] += A[b.., i, k] * B[b.., k, j]``, including the attention products whose i, j or
k is the dynamic patch count N) is rescheduled here as::

    parallel(b.., i_block)            # BLOCK*ROWS rows; a T.where guard covers a dynamic N
      for j_block                     # JBLOCK*COLS columns (guarded: 4304 = 16 * 269)
        init the C block
        for k_block                   # KC (static K divisible by KC, KC/2 or KC/4)
          for j_outer                 # COLS (static J divisible by COLS)
            for i_tile                # BLOCK tiles of ROWS rows reuse the [KC, COLS] slice of B
              for k_inner
                for i_inner (unrolled)       # ROWS
                  for j_inner (vectorized)   # B[k, j..] and C[i, j..] contiguous
    other blocks (bias add, layer norm, softmax, transposes): outermost loop parallel

Matmuls with a dynamic or odd J (attention scores) get ``parallel(i_outer) / k / i_inner / j``
(j contiguous, vectorised when static and small). ``TVM_NUM_THREADS`` sets the thread count.
Funcs with several matmul blocks, or where a primitive refuses, keep the default lowering.
Applied as a module pass after FuseTIR, before Relax's TIR lowering, on llvm targets only.
"""
from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule
from tvm.tirx.analysis import undefined_vars

ROWS = 4          # rows of C per micro tile (unrolled)
COLS = 16         # columns of C per micro tile (vectorized: 4 NEON / 2 AVX2 float32 registers)
BLOCK = 32        # micro tiles per row block: a [KC, COLS] slice of B is reused by BLOCK * ROWS rows
JBLOCK = 16       # column tiles per column block: the [BLOCK * ROWS, JBLOCK * COLS] block of C stays in L2
KC = 64           # reduction block: the [BLOCK * ROWS, KC] slice of A stays in L1/L2


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _matmul_block(sch: Schedule, block) -> bool:
    """True when ``block`` is C[s.., i, j] = sum_k A[s.., i, k] * B[s.., k, j] with k the only R iter."""
    b = sch.get(block)
    kinds = [iv.iter_type for iv in b.iter_vars]
    if len(kinds) < 3 or kinds[-1] != tirx.IterVar.CommReduce or any(k != tirx.IterVar.DataPar for k in kinds[:-1]):
        return False
    if len(b.reads) != 2 or len(b.writes) != 1 or b.init is None or len(sch.get_loops(block)) != len(kinds):
        return False
    i, j, k = (iv.var.name for iv in b.iter_vars[-3:])
    uses = [_vars(r) for r in b.reads]
    return _vars(b.writes[0]) >= {i, j} and k not in _vars(b.writes[0]) and any(
        {i, k} <= a and j not in a and {k, j} <= w and i not in w for a, w in (uses, uses[::-1]))


def _vars(region) -> set:
    """Names of the block iter vars used by the index expressions of a buffer region."""
    return {v.name for r in region.region for v in undefined_vars(r.min)}


def _schedule_matmul(sch: Schedule, block) -> None:
    loops = sch.get_loops(block)
    *batch, i, j, k = loops
    n_j = _static(sch.get(j).extent)
    n_k = _static(sch.get(k).extent)
    kc = next((f for f in (KC, KC // 2, KC // 4) if n_k is not None and n_k % f == 0 and n_k > f), None)
    if n_j is not None and n_j % COLS == 0 and n_j > COLS and kc is not None:
        io, i2, ii = sch.split(i, [None, BLOCK, ROWS])
        j1, jo, ji = sch.split(j, [None, JBLOCK, COLS])
        ko, ki = sch.split(k, [None, kc])
        sch.reorder(*batch, io, j1, ko, jo, i2, ki, ii, ji)
        k = ko
    elif n_j is not None and n_j % COLS == 0 and n_j > COLS:
        io, ii = sch.split(i, [None, ROWS])
        jo, ji = sch.split(j, [None, COLS])
        sch.reorder(*batch, io, jo, k, ii, ji)
    else:
        io, ii = sch.split(i, [None, ROWS])
        jo, ji = None, j
        sch.reorder(*batch, io, k, ii, ji)
    outer = sch.fuse(*batch, io) if batch else io
    sch.parallel(outer)
    sch.unroll(ii)
    if n_j is not None and (n_j % COLS == 0 or n_j <= 64):
        sch.vectorize(ji)
    sch.decompose_reduction(block, k)


def _parallel_outer(sch: Schedule, block) -> None:
    """Parallel outermost loop when it only drives a spatial iter (rows of a layer norm, ...)."""
    loops = sch.get_loops(block)
    if loops:
        try:
            sch.parallel(loops[0])
        except Exception:   # noqa: BLE001 - reduction or opaque outer loop: leave it serial
            pass


def schedule_func(func: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """Scheduled copy of ``func`` (its matmul block tiled, other blocks' outer loops parallel), or
    None when it has several matmul blocks or a primitive refuses."""
    sch = Schedule(func)
    try:
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
    except Exception:   # noqa: BLE001 - no root block: not a legalized op
        return None
    mm = [b for b in blocks if _matmul_block(sch, b)]
    if len(mm) > 1:
        return None
    try:
        for b in blocks:
            if mm and sch.get(b).same_as(sch.get(mm[0])):
                _schedule_matmul(sch, b)
            else:
                _parallel_outer(sch, b)
    except Exception:   # noqa: BLE001 - schedule primitive refused: keep the default lowering
        return None
    return sch.mod["main"]


@tvm.transform.module_pass(opt_level=0, name="mcpm_vision_cpu_matmul_schedule")
def schedule_matmuls(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Module pass: reschedule every matmul-like PrimFunc of ``mod`` (after FuseTIR)."""
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            new = schedule_func(func)
            if new is not None:
                updates[gv] = new
    for gv, func in updates.items():
        mod[gv] = func
    return mod
