"""Compile the TVM MiniCPM model: export Relax IR, lower it per backend, write model libraries.

Backends: ``cpu`` (aarch64 LLVM, NEON; SoC preset from presets.py), ``opencl`` (phone GPUs, Adreno/Mali:
OpenCL C kernels + aarch64 host code; dlight GPU schedules) and ``host`` (x86_64 LLVM, used to verify
the export and by ``mcpm-export run``). Targets are JSON dicts.

Lowering order for every build:
1. CPU only, when ``targets/tvm/kernels.py`` is importable: ``kernels.optimize_for_cpu(mod, target)`` on the
   exported Relax module (before LegalizeOps); it replaces the q4 dequantize+matmul pattern of model.py
   by its fused int4 kernels.
2. ``fuse_dequantize_matmul``: every dequantize+matmul still left (all of them without kernels.py or on
   OpenCL; the q8 embedding/head and fp16 weights always) becomes one plain TIR reduction with the
   dequantize inlined, so no float32 weight copy is materialised per token.
3. The plain Relax pipeline: legalize, fuse, (OpenCL: dlight GPU schedules), VM lowering. No CPU
   schedules: a 2B model compiles in well under a minute per target.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import tvm
from tvm import relax, te, tirx
from tvm.relax.backend.cpu_generic import pipeline as cpu_passes
from tvm.relax.dpl import is_op, rewrite_call, wildcard
from tvm.support import cc

from exporter.bundle import normalize_tar
from exporter.config import MiniCPMConfig
from exporter.errors import ExportError
from exporter.quant import GROUP, Q4_PER_WORD
from exporter.verify import expected_prefix

from . import mlc
from .model import KV_DTYPE, MiniCPMTVM, q4_at, q8_at
from .options import BACKENDS  # noqa: F401  (--backend -> builds; targets/tvm/vision.py reads it here)
from .reproducible import canonical_shape_funcs

TRIPLES = {"android": "aarch64-linux-android", "harmony": "aarch64-linux-ohos"}
# x86-64-v3 (AVX2, FMA, F16C: any x86 CPU since ~2015): F16C makes the fp16 scale loads single
# instructions (generic x86-64 calls a soft-float helper per weight: 8x slower decode).
HOST_TARGET = {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu", "mcpu": "x86-64-v3"}
# OpenCL device code; max_num_threads 256 / 32 KB shared memory fit both Adreno 6xx+ and Mali G7x+.
DEFAULT_CONTEXT, DEFAULT_CHUNK = 2048, 128   # a recipe's context_window / prefill_chunk override these
OPENCL_TARGET = {"kind": "opencl", "max_num_threads": 256, "max_shared_memory_per_block": 32768,
                 "thread_warp_size": 1}


def system_lib_prefix(recipe: str, backend: str = "cpu") -> str:
    """``mcpm_<recipe>_`` (cpu) / ``mcpm_<recipe>_opencl_`` (DESIGN.md): one app can link both libraries."""
    return expected_prefix(recipe, backend)


def make_target(backend: str, cpu_target: dict) -> tvm.target.Target:
    if backend == "opencl":
        return tvm.target.Target(OPENCL_TARGET, host=cpu_target)
    return tvm.target.Target(cpu_target)


def export_ir(cfg: MiniCPMConfig, scheme: str | None, target: tvm.target.Target, extra: dict | None = None,
              context_window: int = DEFAULT_CONTEXT, prefill_chunk: int = DEFAULT_CHUNK, kv_dtype: str = KV_DTYPE,
              ) -> tuple[tvm.IRModule, list[tuple[str, tuple, str]]]:
    """Relax IRModule of the model with MLC-LLM's function contract (targets/tvm/mlc.py) + the packed
    params (name, shape, dtype) in call order. ``_metadata()`` returns MLC's keys, ``extra`` under "mcpm".
    ``kv_dtype``: the paged KV cache's dtype (model.py)."""
    model = MiniCPMTVM(cfg, scheme, target, kv_dtype)
    mod, params = model.export_tvm(spec=model.spec())
    specs = [(name, tuple(int(x) for x in p.shape), str(p.dtype)) for name, p in params]
    meta = mlc.metadata(cfg, scheme or "fp32", context_window, prefill_chunk, specs,
                        {**(extra or {}), "kv_dtype": kv_dtype})
    return mlc.attach(mod, cfg, prefill_chunk, target.kind.name != "llvm", meta), specs


def kernels_available() -> bool:
    """Whether CPU builds go through kernels.optimize_for_cpu (fused int4 kernels, int8 activations)."""
    return _kernels() is not None


def _kernels():
    try:
        from . import kernels  # owned by the int4 kernel engineer; optional
    except ImportError:
        return None
    return kernels if hasattr(kernels, "optimize_for_cpu") else None


def _dequant_matmul_func(kind: str, n_out: int, k: int) -> tirx.PrimFunc:
    """y[rows, out] = x[rows, k] @ dequantize(W).T with the dequantize inlined (never materialised)."""
    rows = tirx.Var("rows", "int64")
    x = te.placeholder((rows, k), "float32", "x")
    r = te.reduce_axis((0, k), "k")
    if kind in ("q4", "q8"):
        q4 = kind == "q4"
        qw = te.placeholder((n_out, k // Q4_PER_WORD if q4 else k), "uint32" if q4 else "int8", "q_weight")
        sc = te.placeholder((n_out, k // GROUP), "float16", "q_scale")
        ws = [qw, sc]

        def w(o, j):
            return (q4_at if q4 else q8_at)(qw, sc, o, j)
    else:
        wt = te.placeholder((n_out, k), "float16", "weight")
        ws = [wt]

        def w(o, j):
            return wt[o, j].astype("float32")
    y = te.compute((rows, n_out), lambda i, o: te.sum(x[i, r] * w(o, r), axis=r), name="dequantize_matmul")
    return te.create_prim_func([x, *ws, y])


def fuse_dequantize_matmul(mod: tvm.IRModule) -> tvm.IRModule:
    """Plain fallback for every ``matmul(x, permute_dims(call_tir(dequantize*, W)))`` left in ``mod``
    (all of them without kernels.py; q8/fp16 ones with it): one TIR function per weight shape that
    dequantizes inside the reduction, so no float32 copy of the weights is written per token."""
    bb = relax.BlockBuilder(mod)
    funcs: dict[tuple, relax.GlobalVar] = {}
    x, fn, args = wildcard(), wildcard(), wildcard()
    deq = is_op("relax.call_tir")(fn, args, add_constraint=False)
    perm = is_op("relax.permute_dims")(deq)
    pattern = is_op("relax.matmul")(x, perm)

    def rewrite(orig, m):
        callee, ws = m[fn], m[args]
        if not isinstance(callee, relax.GlobalVar) or "dequantize" not in callee.name_hint \
                or not isinstance(ws, relax.Tuple):
            return orig
        dtypes = tuple(str(f.ty.dtype) for f in ws.fields)
        kind = {("uint32", "float16"): "q4", ("int8", "float16"): "q8", ("float16",): "f16"}.get(dtypes)
        xt, wt = m[x].ty, m[deq].ty
        if kind is None or str(xt.dtype) != "float32" or not isinstance(xt.shape, relax.ShapeExpr):
            return orig
        n_out, k = (int(d) for d in wt.shape.values)
        dims = list(xt.shape.values)
        rows = tirx.IntImm("int64", 1)
        for d in dims[:-1]:
            rows = rows * d
        key = (kind, n_out, k)
        if key not in funcs:
            name = f"fused_dequantize_matmul_{kind}_{n_out}x{k}"
            funcs[key] = bb.add_func(_dequant_matmul_func(*key).with_attr("global_symbol", name), name)
        x2 = relax.op.reshape(m[x], relax.ShapeExpr([rows, k]))
        y2 = relax.op.call_tir(funcs[key], relax.Tuple([x2, *ws.fields]), relax.TensorType([rows, n_out], "float32"))
        return relax.op.reshape(y2, relax.ShapeExpr([*dims[:-1], n_out]))

    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            new = rewrite_call(pattern, rewrite, func)
            if not new.same_as(func):
                updates[gv] = new
    for gv, func in updates.items():
        bb.update_func(gv, func)
    mod = bb.get()
    entries = [gv.name_hint for gv, f in mod.functions.items()   # Relax entry points + exported TIR (mlc.py)
               if f.attrs is not None and "global_symbol" in f.attrs]
    return relax.transform.DeadCodeElimination(entries)(mod)


def _prefix_prim_funcs(mod: tvm.IRModule, prefix: str) -> tvm.IRModule:
    """global_symbol of every PrimFunc -> prefix + name (what AttachGlobalSymbol does with a prefix)."""
    out = tvm.IRModule({}, attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            func = func.with_attr("global_symbol", prefix + gv.name_hint)
        out[gv] = func
    return out


def _dynamic_reduction(func) -> bool:
    """True when a block of ``func`` reduces over a symbolic extent (e.g. attention @ V over N)."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import dlight as dl
    try:
        infos = dl.normalize_prim_func(Schedule(func)) or []
    except Exception:   # noqa: BLE001 - not analysable: let the inner rule decide
        return False
    return any(it.kind == "R" and not isinstance(it.dom, int) for info in infos for it in info.iters)


def _gpu_rules(dynamic_shapes: bool) -> list:
    """dlight's GPU rules. ``dynamic_shapes`` (the vision graph, N patches): the Matmul rule skips
    matmuls whose reduction length is the dynamic token count (it would unroll a symbolic loop);
    those fall through to the GEMV/Reduction/Fallback rules."""
    from tvm.s_tir import dlight as dl

    class StaticReductionMatmul(dl.ScheduleRule):
        def __init__(self):
            self.inner = dl.gpu.Matmul()

        def apply(self, func, target, tunable):
            return None if _dynamic_reduction(func) else self.inner.apply(func, target, tunable)

    matmul = StaticReductionMatmul() if dynamic_shapes else dl.gpu.Matmul()
    return [matmul, dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def relax_pipeline(target: tvm.target.Target, dynamic_shapes: bool = False,
                   cpu_schedule: tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """Legalize + fuse (+ ``cpu_schedule`` on CPUs, dlight GPU schedules for OpenCL) + the standard VM
    lowering. One pipeline for the text model and the vision encoder (targets/tvm/vision.py passes
    ``dynamic_shapes`` and its CPU matmul schedule)."""
    gpu = target.kind.name != "llvm"

    @tvm.transform.module_pass(opt_level=0, name="mcpm_tvm_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            # RemoveRedundantReshape: the kernels' output reshape followed by the next kernel's input
            # reshape (w13 -> SwiGLU quantiser) would otherwise fuse into a copy
            passes = [relax.transform.RemoveRedundantReshape(), relax.backend.DispatchSampling(),
                      relax.backend.DispatchSortScan(), relax.transform.LegalizeOps(),
                      relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                      relax.transform.FuseOps(), relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()]
            if gpu:
                from tvm.s_tir import dlight as dl
                passes.append(dl.ApplyDefaultSchedule(*_gpu_rules(dynamic_shapes)))
            elif cpu_schedule is not None:
                passes.append(cpu_schedule)
            passes += cpu_passes.dataflow_lower_passes(target) + cpu_passes.finalize_passes(target)
            passes.append(canonical_shape_funcs)   # byte-reproducible builds (targets/tvm/reproducible.py)
            # TVM 0.27's AttachGlobalSymbol crashes renaming PrimFuncs that contain T.call_extern (the
            # int4 kernels) when a system_lib_prefix is set: attach plain symbols, then prefix them here.
            prefix = mod.get_attr("system_lib_prefix")
            if prefix:
                mod = mod.without_attr("system_lib_prefix")
            mod = tvm.transform.Sequential(passes)(mod)
            if prefix:
                mod = _prefix_prim_funcs(mod, str(prefix)).with_attr("system_lib_prefix", prefix)
            return mod

    return _pipeline


def compile_ir(mod: tvm.IRModule, target: tvm.target.Target, prefix: str | None = None,
               use_kernels: bool = True, dynamic_shapes: bool = False,
               cpu_schedule: tvm.transform.Pass | None = None) -> relax.VMExecutable:
    """Build the VM executable; ``prefix`` makes it a system library with that symbol prefix.
    CPU builds first go through kernels.optimize_for_cpu when available and ``use_kernels``.
    ``dynamic_shapes``/``cpu_schedule``: see relax_pipeline."""
    kernels = _kernels() if use_kernels and target.kind.name == "llvm" else None
    if kernels is not None:
        mod = kernels.optimize_for_cpu(mod, target)
    mod = fuse_dequantize_matmul(mod)
    if prefix is not None:
        mod = mod.with_attr("system_lib_prefix", prefix)
    return relax.build(mod, target, relax_pipeline=relax_pipeline(target, dynamic_shapes, cpu_schedule),
                       system_lib=prefix is not None)


def save_tar(ex: relax.VMExecutable, path: Path) -> None:
    """Static form (for linking into an app): a .tar of aarch64 objects, symbols under the prefix."""
    ex.export_library(str(path))
    normalize_tar(path)   # reproducible: TVM's tar stamps member mtimes and the build user


def save_so(ex: relax.VMExecutable, path: Path, triple: str) -> None:
    """Shared form: clang + lld for the target triple (x86_64: TVM's default, loadable with
    ``tvm.runtime.load_module``). A device .so is a system lib: dlopen it RTLD_GLOBAL, then
    ``ffi.SystemLib(prefix)``. TVM runtime, libc and libm symbols stay undefined (resolved by the loader).
    lld writes its output with write(), not through a mapping: on a full filesystem a mapped write dies of
    SIGBUS (and lld removes the file), where write() reports "No space left on device" (bundle.disk_full)."""
    if triple.startswith("x86_64"):
        ex.export_library(str(path))
        return
    link = cc.cross_compiler("clang", options=[f"--target={triple}", "-fuse-ld=lld", "-nostdlib",
                                               "-Wl,--allow-shlib-undefined", "-Wl,--build-id=none",
                                               "-Wl,--strip-debug", "-Wl,--no-mmap-output-file"])
    ex.export_library(str(path), fcompile=link)


def save_library(ex: relax.VMExecutable, out: Path, stem: str, triple: str, rel: str, backend: str,
                 check_opencl: bool = True, what: str = "") -> dict:
    """``out/<stem>.tar`` + ``out/<stem>.so`` (+ ``kernels.cl`` of an opencl build, compile-checked when
    ``check_opencl``); the manifest's libs entry, paths relative to the bundle (``rel`` = out's)."""
    out.mkdir(parents=True, exist_ok=True)
    save_tar(ex, out / f"{stem}.tar")
    save_so(ex, out / f"{stem}.so", triple)
    entry = {"tar": f"{rel}/{stem}.tar", "so": f"{rel}/{stem}.so"}
    if backend == "opencl":
        src = opencl_source(ex)
        if "__kernel" not in src:
            raise ExportError(f"{what}opencl build produced no OpenCL kernels")
        (out / "kernels.cl").write_text(src)
        entry.update(source=f"{rel}/kernels.cl", executed=False)
        if check_opencl:
            entry["compile_checked_with"] = check_opencl_source(out / "kernels.cl")
    return entry


OPENCL_CHECK = ["clang", "--target=spir64", "-x", "cl", "-cl-std=CL1.2", "-Xclang", "-finclude-default-header",
                "-fsyntax-only"]


def check_opencl_source(path: Path) -> str:
    """Compile-check the OpenCL C with clang's OpenCL front end (no OpenCL runtime here); returns the
    command used, ExportError with clang's first error otherwise."""
    try:
        r = subprocess.run([*OPENCL_CHECK, str(path)], capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise ExportError("clang not found: needed to check the OpenCL kernels (apt-get install clang)") from None
    if r.returncode != 0:
        first = next((ln for ln in r.stderr.splitlines() if "error" in ln), r.stderr.strip()[:200])
        raise ExportError(f"{path}: OpenCL C does not compile: {first}")
    return " ".join(OPENCL_CHECK)


def opencl_source(ex: relax.VMExecutable) -> str:
    """The OpenCL C of every device kernel in an opencl build ('' when there is none)."""
    srcs = []

    def walk(m):
        if m.kind == "opencl":
            srcs.append(m.inspect_source())
        for sub in m.imports:
            walk(sub)

    walk(ex.mod)
    return "\n".join(srcs)
