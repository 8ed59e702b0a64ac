"""Fused int4 (q4f16) matmul kernels for the TVM CPU build (issue 3).

``optimize_for_cpu(mod, target)`` takes the Relax module exported from targets/tvm/model.py (before
``tvm.compile`` / LegalizeOps) and rewrites every quantized linear layer, emitted there as

    w = call_tir(dequantize, (q_weight uint32[out, in/8], q_scale float16[out, in/32])) -> float32[out, in]
    y = matmul(x, permute_dims(w))

(and the int8 ``dequantize_q8`` of scheme q4f16_e8's embedding/tied head the same way), found with a
Relax dataflow pattern, into two opaque ``call_tir``s that never materialise ``w``:

    (xq, nb, xd) = call_tir(mcpm_q4_quant, (x2,))       # activations -> int8 per group of 32
    (y2, _)      = call_tir(mcpm_q4_rows, (q_weight, q_scale, xq, nb, xd))  # + a scratch row counter

When x is the MLP's ``silu(gate) * up`` of a split ``h`` (w2's input), the quantiser is
``mcpm_q4_quant_swiglu(h)``, which computes it as it reads h (the silu and multiply disappear); when x is
``rms_norm(r, w)`` (a block's wqkv and w13 inputs), it is ``mcpm_q4_quant_rmsnorm(r, w)`` (the norm
disappears: one serial pass and one kernel call less per norm of a decode step). The head's input is the
final norm divided by hidden_size / dim_model_base, so that norm stays.

The TIR wrappers call the C microkernels of microkernels/q4_matmul.c with ``T.call_extern`` (their
names carry ``kernel_prefix(target)``, a hash of source and flags); the
threads of a ``T.parallel`` loop (TVM's thread pool, TVM_NUM_THREADS) take weight rows in chunks from
an atomic counter (dynamic split: a slow or descheduled core does not stall the others). The C is compiled by clang
for the build target (ISA from its mtriple/mcpu/mattr: AVX-512 VNNI, AVX-512BW, AVX2, NEON,
NEON+dotprod, NEON+dotprod+i8mm (prefill), portable C; see ``isa_of``) and attached to the module as an
external object (``external_mods``), so ``export_library`` links it into the model library, .so or system-lib .tar.

Numerics: like llama.cpp's Q4_0 x Q8_0 the activations are rounded to int8 per 32-group (relative
error ~ 5e-3 on random data); tests/test_tvm_kernels.py states the tolerance against numpy
dequant+matmul. Matmuls with fp16/fp32 weights or non-float32 activations are left to the stock
pipeline.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import tvm
from tvm import relax, tirx
from tvm.relax.dpl import is_op, is_tuple, rewrite_call, wildcard
from tvm.script import tirx as T

from exporter.cache import cache_dir
from exporter.errors import ExportError
from exporter.quant import GROUP, Q4_PER_WORD

from . import kv_kernels

SOURCE = Path(__file__).parent / "microkernels" / "q4_matmul.c"     # includes the other microkernels/*.c
ROWS_PER_TASK = 16           # min weight rows per task (q4_matmul.c raises it to TASK_BYTES of weights)
PARALLEL_SLOTS = 64          # parallel-loop extent: >= the thread count of any CPU we target
CACHE = cache_dir("kernels")


# ---------------------------------------------------------------- compiling the microkernels
def _attr(target: tvm.target.Target, key: str, default=None):
    value = target.attrs.get(key) if key in target.attrs else None
    return default if value is None else value


def _is_aarch64(triple: str) -> bool:
    return triple.startswith(("aarch64", "arm64"))


def host_triple() -> str:
    machine = platform.machine()
    return "aarch64-linux-gnu" if machine in ("aarch64", "arm64") else f"{machine}-linux-gnu"


def host_target() -> tvm.target.Target:
    """An llvm Target for this machine with its CPU name (so the kernels use its full ISA)."""
    cpu = tvm.get_global_func("target.llvm_get_system_cpu")()
    return tvm.target.Target({"kind": "llvm", "mtriple": host_triple(), "mcpu": cpu})


# LLVM aarch64 feature names (TVM mattr) -> clang -march extensions the kernels care about
_ARM_EXT = {"dotprod": "dotprod", "i8mm": "i8mm", "fullfp16": "fp16", "bf16": "bf16"}


def clang_flags(target: tvm.target.Target) -> list[str]:
    """clang options selecting the ISA of ``target`` (an llvm Target: mtriple, mcpu, mattr).

    aarch64: -march=armv8.x-a plus the dotprod/i8mm/fp16/bf16 extensions listed in mattr (the mcpu
    name is not passed: the system clang may not know recent cores).  x86_64: -march=<mcpu> and
    -m<feature> for mattr; without an mcpu a host-arch target gets -march=native (host builds run
    where they are built; pass an mcpu to pin the ISA)."""
    if target.kind.name != "llvm":
        raise ExportError(f"kernels: optimize_for_cpu needs an llvm target, got '{target.kind.name}'")
    triple = str(_attr(target, "mtriple", "") or host_triple())
    cpu = str(_attr(target, "mcpu", "") or "")
    feats = [str(f) for f in _attr(target, "mattr", [])]
    flags = [f"--target={triple}", "-O3", "-ffreestanding", "-fPIC", "-fno-math-errno", "-c"]
    if _is_aarch64(triple):
        ext = [_ARM_EXT[f[1:]] for f in feats if f.startswith("+") and f[1:] in _ARM_EXT]
        base = "armv8.6-a" if "i8mm" in ext else ("armv8.2-a" if ext else "armv8-a")
        flags += ["-march=" + "+".join([base, *ext]), "-mno-outline-atomics"]   # no libgcc helper calls
    elif triple.startswith("x86_64"):
        if cpu and cpu != "generic":
            flags += _x86_cpu_flags(target, cpu)
        elif platform.machine() == "x86_64" and not feats:
            flags.append("-march=native")
        flags += [("-m" if f[0] == "+" else "-mno-") + f[1:] for f in feats if f[:1] in "+-"]
    return flags


# x86 ISA extensions (LLVM feature name = clang -m<name>) the kernels can use, for CPUs clang does not know
_X86_ISA = ("sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi", "bmi2",
            "lzcnt", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512vnni",
            "avx512vbmi", "avx512bf16", "avxvnni")


@functools.lru_cache(maxsize=None)
def clang_knows_cpu(cpu: str) -> bool:
    """Whether the installed clang accepts ``-march=<cpu>`` (TVM's LLVM may be newer than it)."""
    clang = shutil.which("clang")
    if clang is None:
        return False
    proc = subprocess.run([clang, "--target=x86_64-linux-gnu", f"-march={cpu}", "-x", "c", "-E", "-"],
                          input="", capture_output=True, text=True)
    return proc.returncode == 0


def _x86_cpu_flags(target: tvm.target.Target, cpu: str) -> list[str]:
    """``-march=<cpu>`` when clang knows the CPU, else the ISA extensions TVM's LLVM lists for it
    (a baseline -march=x86-64 plus -m<feature>): same code paths, any clang version."""
    if clang_knows_cpu(cpu):
        return [f"-march={cpu}"]
    have = {str(k) for k in tvm.get_global_func("target.llvm_get_cpu_features")(target)}
    return ["-march=x86-64", *[f"-m{f}" for f in _X86_ISA if f in have]]


def _key(target: tvm.target.Target) -> str:
    srcs = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.[ch]")))
    return hashlib.sha256(srcs + " ".join(clang_flags(target)).encode()).hexdigest()


def kernel_prefix(target: tvm.target.Target) -> str:
    """``mcpm_k<hash>_``: the prefix of the microkernels' exported names for ``target``.

    A hash of the source and the compile flags, so two model libraries in one app cannot clash: the
    same name means the same code (the symbols are weak and hidden, see microkernels/common.h)."""
    return f"mcpm_k{_key(target)[:12]}_"


def compile_microkernels(target: tvm.target.Target) -> Path:
    """The microkernel object for ``target`` (cached by source + flags under exporter.cache.cache_root())."""
    clang = shutil.which("clang")
    if clang is None:
        raise ExportError("kernels: 'clang' not found on PATH (needed to compile targets/tvm/microkernels)")
    flags = [*clang_flags(target), f"-DMCPM_KPREFIX={kernel_prefix(target)}"]
    obj = CACHE / f"q4_matmul-{_key(target)[:16]}.o"
    if not obj.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            out = Path(tmp) / obj.name
            proc = subprocess.run([clang, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["?"])[0]
                raise ExportError(f"kernels: clang failed on {SOURCE.name} with {' '.join(flags)}: {first}")
            os.replace(out, obj)
    return obj


def isa_of(target: tvm.target.Target) -> str:
    """Which microkernel path ``target`` compiles to (for logs and the manifest)."""
    out = subprocess.run(["clang", *[f for f in clang_flags(target) if f != "-c"], "-dM", "-E", "-x", "c",
                          "/dev/null"], capture_output=True, text=True).stdout
    has = lambda m: f"#define {m} " in out  # noqa: E731
    if has("__AVX512BW__"):
        return "avx512-vnni" if has("__AVX512VNNI__") else "avx512bw"
    if has("__AVX2__") and has("__FMA__") and has("__F16C__"):
        return "avx2"
    if has("__aarch64__"):
        if has("__ARM_FEATURE_MATMUL_INT8"):
            return "neon-i8mm"
        return "neon-dotprod" if has("__ARM_FEATURE_DOTPROD") else "neon"
    return "portable-c"


# ---------------------------------------------------------------- the TIR wrappers
# Parameters are plain handles (TVM passes a DLTensor* for each); the C side reads data and shapes.
# Buffer pointers (``A.data``) in a call would make TVM 0.27's AttachGlobalSymbol fail on system-lib
# builds (those with a ``system_lib_prefix``).
def quant_act_func(kind: str, prefix: str, swiglu: bool = False) -> tirx.PrimFunc:
    """x float32 [m, k] -> the int8 activation buffers of <prefix>{kind}_quant_act (any m, k); with
    ``swiglu`` (q4 only) x is h [m, 2k] and the activations are those of silu(h[:, :k]) * h[:, k:]."""
    sym = f"{prefix}{kind}_quant_{'swiglu' if swiglu else 'act'}"
    if kind == "q4":
        @T.prim_func(private=True)
        def q4_quant(x: T.handle, xq: T.handle, nb: T.handle, xd: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
            T.evaluate(T.call_extern("int32", sym, x, xq, nb, xd))

        return q4_quant

    @T.prim_func(private=True)
    def q8_quant(x: T.handle, xq: T.handle, xd: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
        T.evaluate(T.call_extern("int32", sym, x, xq, xd))

    return q8_quant


def quant_rmsnorm_func(prefix: str, eps: float) -> tirx.PrimFunc:
    """x float32 [m, k], w float32 [k] -> the int8 activation buffers of RMSNorm(x) * w (epsilon eps)."""
    sym = f"{prefix}q4_quant_rmsnorm"

    @T.prim_func(private=True)
    def q4_quant_rmsnorm(x: T.handle, w: T.handle, xq: T.handle, nb: T.handle, xd: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
        T.evaluate(T.call_extern("int32", sym, x, w, xq, nb, xd, T.float32(eps)))

    return q4_quant_rmsnorm


def matmul_rows_func(kind: str, prefix: str) -> tirx.PrimFunc:
    """y[m, n_out] (and a scratch row counter) from the weights and the quantised activations.

    Rows are handed out dynamically, ROWS_PER_TASK at a time, through an atomic counter that the
    wrapper zeroes first; PARALLEL_SLOTS parallel iterations cover any thread-pool size."""
    rpt, slots = ROWS_PER_TASK, PARALLEL_SLOTS
    reset, rows = f"{prefix}counter_reset", f"{prefix}{kind}_matmul_dyn"
    if kind == "q4":
        @T.prim_func(private=True)
        def q4_rows(qw: T.handle, sc: T.handle, xq: T.handle, nb: T.handle, xd: T.handle, y: T.handle,
                    cnt: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
            T.evaluate(T.call_extern("int32", reset, cnt))
            for t in T.parallel(slots):
                T.evaluate(T.call_extern("int32", rows, qw, sc, xq, nb, xd, y, cnt, rpt))

        return q4_rows

    @T.prim_func(private=True)
    def q8_rows(qw: T.handle, sc: T.handle, xq: T.handle, xd: T.handle, y: T.handle, cnt: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
        T.evaluate(T.call_extern("int32", reset, cnt))
        for t in T.parallel(slots):
            T.evaluate(T.call_extern("int32", rows, qw, sc, xq, xd, y, cnt, rpt))

    return q8_rows


def replace_attention(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, int]:
    """kv_kernels.replace_attention with ``target``'s kernel prefix: the KV cache's attention and RoPE."""
    return kv_kernels.replace_attention(mod, kernel_prefix(target), PARALLEL_SLOTS)


# ---------------------------------------------------------------- the Relax rewrite
def _static_shape(ty) -> tuple[int, ...] | None:
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or not all(isinstance(d, tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _signature(qw, sc, w) -> tuple[str, int, int] | None:
    """("q4" | "q8", out, in) when qw/sc/w match a dequantize of docs/DESIGN.md (q4f16 or int8), else None."""
    sq, ss, sw = (_static_shape(e.ty) for e in (qw, sc, w))
    if None in (sq, ss, sw) or len(sq) != 2 or len(ss) != 2 or len(sw) != 2:
        return None
    n_out, k = sw
    if str(sc.ty.dtype) != "float16" or str(w.ty.dtype) != "float32" or k % GROUP or ss != (n_out, k // GROUP):
        return None
    if str(qw.ty.dtype) == "uint32" and sq == (n_out, k // Q4_PER_WORD):
        return "q4", n_out, k
    if str(qw.ty.dtype) == "int8" and sq == (n_out, k):
        return "q8", n_out, k
    return None


class _Rewriter:
    def __init__(self, mod: tvm.IRModule, prefix: str):
        self.bb = relax.BlockBuilder(mod)
        self.prefix = prefix
        self.kernels: dict[str, relax.GlobalVar] = {}
        self.norm_eps: dict[float, int] = {}      # RMSNorm epsilon -> index of its quantiser
        self.count = 0
        self.var2val: dict = {}
        self.x, self.qw, self.sc, self.fn = wildcard(), wildcard(), wildcard(), wildcard()
        self.deq = is_op("relax.call_tir")(self.fn, is_tuple([self.qw, self.sc]), add_constraint=False)
        self.perm = is_op("relax.permute_dims")(self.deq)
        self.pattern = is_op("relax.matmul")(self.x, self.perm)

    def swiglu_input(self, x: relax.Expr, k: int) -> relax.Expr | None:
        """h when x is model.py's MLP activation silu(split(h)[0]) * split(h)[1] with h [..., 2k]."""
        val = lambda e: self.var2val.get(e, e) if isinstance(e, relax.Var) else e  # noqa: E731
        mul = val(x)
        if not (isinstance(mul, relax.Call) and getattr(mul.op, "name", "") == "relax.multiply"):
            return None
        silu, up = val(mul.args[0]), val(mul.args[1])
        if not (isinstance(silu, relax.Call) and getattr(silu.op, "name", "") == "relax.nn.silu"):
            return None
        gate = val(silu.args[0])
        if not (isinstance(gate, relax.TupleGetItem) and isinstance(up, relax.TupleGetItem)
                and gate.index == 0 and up.index == 1 and gate.tuple_value.same_as(up.tuple_value)):
            return None
        split = val(gate.tuple_value)
        if not (isinstance(split, relax.Call) and getattr(split.op, "name", "") == "relax.split"):
            return None
        h = split.args[0]
        dims = getattr(getattr(h.ty, "shape", None), "values", None)
        if not dims or str(h.ty.dtype) != "float32" or not isinstance(dims[-1], tirx.IntImm) or int(dims[-1]) != 2 * k:
            return None
        halves = int(split.attrs.indices_or_sections) == 2 and int(split.attrs.axis) in (-1, len(dims) - 1)
        return h if halves else None

    def rmsnorm_input(self, x: relax.Expr, k: int) -> tuple[relax.Expr, relax.Expr, float] | None:
        """(r, w, epsilon) when x is rms_norm(r, w) over the last axis, r float32 [..., k], w float32 [k]."""
        norm = self.var2val.get(x, x) if isinstance(x, relax.Var) else x
        if not (isinstance(norm, relax.Call) and getattr(norm.op, "name", "") == "relax.nn.rms_norm"):
            return None
        r, w = norm.args
        rdims = getattr(getattr(r.ty, "shape", None), "values", None)
        axes = [int(a) for a in norm.attrs.axes]
        if (not rdims or _static_shape(w.ty) != (k,) or str(r.ty.dtype) != "float32" or str(w.ty.dtype) != "float32"
                or axes not in ([-1], [len(rdims) - 1])):
            return None
        return r, w, float(norm.attrs.epsilon)

    def _func(self, name: str, make) -> relax.GlobalVar:
        if name not in self.kernels:
            self.kernels[name] = self.bb.add_func(make().with_attr("global_symbol", name), name)
        return self.kernels[name]

    def __call__(self, orig: relax.Expr, m: dict) -> relax.Expr:
        x, qw, sc, deq = m[self.x], m[self.qw], m[self.sc], m[self.deq]
        callee = m[self.fn]
        if not isinstance(callee, relax.GlobalVar) or "dequantize" not in callee.name_hint:
            return orig           # model.py: "dequantize" (q4f16), "dequantize_q8" (int8)
        sig = _signature(qw, sc, deq)
        axes = m[self.perm].attrs.axes
        if sig is None or (axes is not None and [int(a) for a in axes] != [1, 0]):
            return orig
        xs = x.ty
        if not isinstance(xs, relax.TensorType) or str(xs.dtype) != "float32" or xs.shape is None \
                or xs.ndim < 1 or not isinstance(xs.shape, relax.ShapeExpr):
            return orig
        kind, n_out, k = sig
        dims = list(xs.shape.values)
        if not isinstance(dims[-1], tirx.IntImm) or int(dims[-1]) != k:
            return orig
        rows = tirx.IntImm("int64", 1)
        for d in dims[:-1]:
            rows = rows * d
        i8, i32, f32 = "int8", "int32", "float32"
        acts = [relax.TensorType([rows * k], i8), relax.TensorType([rows * (k // GROUP)], f32)]
        if kind == "q4":
            acts.insert(1, relax.TensorType([rows * (k // 8)], i32))
        h = self.swiglu_input(x, k) if kind == "q4" else None
        norm = self.rmsnorm_input(x, k) if kind == "q4" and h is None else None
        if h is not None:
            fn = self._func("mcpm_q4_quant_swiglu", lambda: quant_act_func(kind, self.prefix, swiglu=True))
            ins = [relax.op.reshape(h, relax.ShapeExpr([rows, 2 * k]))]
        elif norm is not None:
            r, w, eps = norm
            i = self.norm_eps.setdefault(eps, len(self.norm_eps))
            fn = self._func(f"mcpm_q4_quant_rmsnorm{i or ''}", lambda: quant_rmsnorm_func(self.prefix, eps))
            ins = [relax.op.reshape(r, relax.ShapeExpr([rows, k])), w]
        else:
            fn = self._func(f"mcpm_{kind}_quant", lambda: quant_act_func(kind, self.prefix))
            ins = [relax.op.reshape(x, relax.ShapeExpr([rows, k]))]
        quant = relax.op.call_tir(fn, relax.Tuple(ins), acts)
        ins = [qw, sc] + [relax.TupleGetItem(quant, i) for i in range(len(acts))]
        rows_fn = self._func(f"mcpm_{kind}_rows", lambda: matmul_rows_func(kind, self.prefix))
        res = relax.op.call_tir(rows_fn, relax.Tuple(ins),
                                [relax.TensorType([rows, n_out], f32), relax.TensorType([1], i32)])
        y2 = relax.TupleGetItem(res, 0)
        self.count += 1
        return relax.op.reshape(y2, relax.ShapeExpr([*dims[:-1], n_out]))


def fuse_q4_matmul(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, int]:
    """Replace q4f16 / int8 dequantize+matmul by calls of ``target``'s kernels; returns (module, layers rewritten)."""
    rw = _Rewriter(mod, kernel_prefix(target))
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            rw.var2val = relax.analysis.get_var2val(func)
            new = rewrite_call(rw.pattern, rw, func)
            if not new.same_as(func):
                updates[gv] = new
    if not updates:
        return mod, 0
    for gv, func in updates.items():
        rw.bb.update_func(gv, func)
    mod = rw.bb.get()
    entries = [gv.name_hint for gv, f in mod.functions.items()
               if isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs]
    mod = relax.transform.DeadCodeElimination(entries)(mod)
    return mod, rw.count


def attach_microkernels(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Add the compiled microkernel object to ``external_mods`` (linked by export_library)."""
    lib = tvm.runtime.load_static_library(str(compile_microkernels(target)), [])
    attrs = dict(mod.attrs) if mod.attrs else {}
    ext = list(attrs.get("external_mods", []))
    return mod.with_attr("external_mods", [*ext, lib])


def optimize_for_cpu(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Fuse every q4f16 (and int8) dequantize+matmul of ``mod`` into the CPU kernels for ``target``, and
    replace the KV cache's decode and prefill (ragged and paged) attention and its RoPE by the microkernel ones.

    Call on the Relax module before ``tvm.compile``; export the result with ``export_library`` (the
    kernels are an external object, so the in-memory executable alone cannot run them).
    """
    mod, count = fuse_q4_matmul(mod, target)
    mod, attention = replace_attention(mod, target)
    if count == 0 and not attention:
        return mod
    return attach_microkernels(mod, target)
