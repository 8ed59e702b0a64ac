"""Compile the TVM MiniCPM model: export Relax IR, lower it per backend, write model libraries.

Backends: ``cpu`` (aarch64 LLVM, NEON; SoC preset from presets.py), ``opencl`` (phone GPUs, Adreno/Mali:
OpenCL C kernels + aarch64 host code; dlight GPU schedules) and ``host`` (x86_64 LLVM, used to verify
the export and by ``mcpm-export run``). Targets are JSON dicts.

CPU lowering is the plain Relax pipeline (legalize, fuse, no schedule: compiles in minutes for 2B).
When ``targets/tvm/kernels.py`` is importable, ``kernels.optimize_for_cpu(mod, target)`` is applied to
the exported Relax module first (before LegalizeOps) and may fuse/replace the dequantize+matmul
pattern described in model.py; anything it leaves is lowered by the plain pipeline.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_passes
from tvm.support import cc

from exporter.config import MiniCPMConfig

from .model import MiniCPMTVM

TRIPLES = {"android": "aarch64-linux-android", "harmony": "aarch64-linux-ohos"}
HOST_TARGET = {"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"}
# OpenCL device code; max_num_threads 256 / 32 KB shared memory fit both Adreno 6xx+ and Mali G7x+.
OPENCL_TARGET = {"kind": "opencl", "max_num_threads": 256, "max_shared_memory_per_block": 32768,
                 "thread_warp_size": 1}


def system_lib_prefix(recipe: str) -> str:
    """``mcpm_<recipe>_`` with non-alphanumerics replaced by ``_`` (DESIGN.md)."""
    return "mcpm_" + re.sub(r"[^0-9A-Za-z]", "_", recipe) + "_"


def make_target(backend: str, cpu_target: dict) -> tvm.target.Target:
    if backend == "opencl":
        return tvm.target.Target(OPENCL_TARGET, host=cpu_target)
    return tvm.target.Target(cpu_target)


def export_ir(cfg: MiniCPMConfig, scheme: str | None, target: tvm.target.Target,
              metadata: dict | None = None) -> tuple[tvm.IRModule, list[tuple[str, tuple, str]]]:
    """Relax IRModule of the model + the packed params (name, shape, dtype) in call order.
    ``metadata`` (plus the params list) is returned by the module's ``_metadata()`` as JSON."""
    model = MiniCPMTVM(cfg, scheme, target)
    mod, params = model.export_tvm(spec=model.spec())
    specs = [(name, tuple(int(x) for x in p.shape), str(p.dtype)) for name, p in params]
    meta = dict(metadata or {})
    meta["params"] = [{"name": n, "shape": list(s), "dtype": d} for n, s, d in specs]
    bb = relax.BlockBuilder(mod)
    with bb.function("_metadata", params=[]):
        bb.emit_func_output(relax.expr.String(json.dumps(meta, sort_keys=True)))
    return bb.get(), specs


def _kernels():
    try:
        from . import kernels  # owned by the int4 kernel engineer; optional
    except ImportError:
        return None
    return kernels if hasattr(kernels, "optimize_for_cpu") else None


def relax_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """Legalize + fuse (+ dlight GPU schedules for OpenCL) + the standard VM lowering."""
    gpu = target.kind.name != "llvm"

    @tvm.transform.module_pass(opt_level=0, name="mcpm_tvm_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            passes = [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan(),
                      relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                      relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
                      relax.transform.DeadCodeElimination()]
            if gpu:
                from tvm.s_tir import dlight as dl
                passes.append(dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                                      dl.gpu.GeneralReduction(), dl.gpu.Fallback()))
            passes += cpu_passes.dataflow_lower_passes(target) + cpu_passes.finalize_passes(target)
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def compile_ir(mod: tvm.IRModule, target: tvm.target.Target, prefix: str | None = None,
               use_kernels: bool = True) -> relax.VMExecutable:
    """Build the VM executable; ``prefix`` makes it a system library with that symbol prefix.
    CPU builds first go through kernels.optimize_for_cpu when available and ``use_kernels``."""
    kernels = _kernels() if use_kernels and target.kind.name == "llvm" else None
    if kernels is not None:
        mod = kernels.optimize_for_cpu(mod, target)
    if prefix is not None:
        mod = mod.with_attr("system_lib_prefix", prefix)
    return relax.build(mod, target, relax_pipeline=relax_pipeline(target),
                       system_lib=prefix is not None)


def save_tar(ex: relax.VMExecutable, path: Path) -> None:
    """Static form (for linking into an app): a .tar of aarch64 objects, symbols under the prefix."""
    ex.export_library(str(path))


def save_so(ex: relax.VMExecutable, path: Path, triple: str) -> None:
    """Shared form (dlopen, ``tvm.runtime.load_module``): clang + lld for the target triple. Runtime
    symbols (TVM runtime, libc, libm) stay undefined and are resolved by the loading process."""
    if triple.startswith("x86_64"):
        ex.export_library(str(path))
        return
    link = cc.cross_compiler("clang", options=[f"--target={triple}", "-fuse-ld=lld", "-nostdlib",
                                               "-Wl,--allow-shlib-undefined", "-Wl,--build-id=none"])
    ex.export_library(str(path), fcompile=link)


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
