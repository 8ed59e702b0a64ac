"""`mcpm-export doctor`: can this machine build every target? One check per tool, with the exact
install command for whatever is missing.

A check is needed by some of: android, harmony, ios (building bundles), runner (cross-compiling the
on-device runner), device (adb benchmarks), tests (the emulated device tests). The exit status only
reflects the build targets (android, harmony, ios).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

BUILD_TARGETS = ("android", "harmony", "ios")
TVM = ("android", "harmony")
ALL = BUILD_TARGETS
TORCH_VERSION = "2.13.0"
NUMPY_BELOW = "2.4"          # coremltools 9 and TVM 0.27 are used with numpy < 2.4
COREMLTOOLS_MAJOR = 9
AARCH64_SYSROOT = Path("/usr/aarch64-linux-gnu")


@dataclass
class Check:
    name: str
    needed_by: tuple[str, ...]
    ok: bool
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _pins() -> tuple[str, str]:
    from runner.build import TVM_FFI_VERSION, TVM_VERSION   # the runtime the runner ships: one source of truth
    return TVM_VERSION, TVM_FFI_VERSION


def _major_minor(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:2] if x.isdigit())


def check_python_packages() -> list[Check]:
    tvm_v, ffi_v = _pins()
    out = []
    torch_v = _version("torch")
    cuda = None
    if torch_v:
        import torch
        cuda = torch.version.cuda
    out.append(Check("torch (CPU build)", ALL, bool(torch_v) and cuda is None and torch_v.startswith(TORCH_VERSION),
                     f"{torch_v or 'not installed'}" + (f", CUDA {cuda} build" if cuda else ""),
                     f"pip install torch=={TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu"))
    for dist, want in (("apache-tvm", tvm_v), ("apache-tvm-ffi", ffi_v)):
        have = _version(dist)
        out.append(Check(dist, TVM, have == want, f"{have or 'not installed'} (need {want}, the runner's runtime)",
                         f"pip install {dist}=={want}"))
    np_v = _version("numpy")
    out.append(Check("numpy", ALL, bool(np_v) and _major_minor(np_v) < _major_minor(NUMPY_BELOW),
                     f"{np_v or 'not installed'} (need < {NUMPY_BELOW} for coremltools / TVM)",
                     f'pip install "numpy<{NUMPY_BELOW}"'))
    ct_v = _version("coremltools")
    out.append(Check("coremltools", ("ios",), bool(ct_v) and _major_minor(ct_v)[:1] == (COREMLTOOLS_MAJOR,),
                     f"{ct_v or 'not installed'} (need {COREMLTOOLS_MAJOR}.x)",
                     f'pip install "coremltools>={COREMLTOOLS_MAJOR},<{COREMLTOOLS_MAJOR + 1}"'))
    for dist in ("safetensors", "sentencepiece", "rich", "click"):
        have = _version(dist)
        out.append(Check(dist, ALL, bool(have), have or "not installed", f"pip install {dist}"))
    have = _version("onnxruntime")
    out.append(Check("onnxruntime", ("tests",), bool(have), f"{have or 'not installed'} (vision reference)",
                     "pip install onnxruntime"))
    return out


def check_tvm_llvm() -> Check:
    fix = f"pip install --force-reinstall apache-tvm=={_pins()[0]}"   # PyPI's LLVM has AArch64 and X86
    try:
        import tvm
        targets = set(tvm.target.codegen.llvm_get_targets())
    except Exception as e:   # noqa: BLE001  (an unloadable TVM is exactly what doctor reports)
        return Check("TVM LLVM backends", TVM, False, f"cannot query TVM's LLVM ({type(e).__name__}: {e})", fix)
    missing = [t for t in ("aarch64", "x86_64") if t not in targets]
    return Check("TVM LLVM backends", TVM, not missing,
                 "aarch64, x86_64 available" if not missing else f"missing {', '.join(missing)}", fix)


def _tool(name: str, needed_by: tuple[str, ...], package: str, what: str) -> Check:
    path = shutil.which(name)
    return Check(name, needed_by, path is not None, f"{path} ({what})" if path else f"not on PATH ({what})",
                 f"apt-get install -y {package}")


def check_clang_link() -> Check:
    """clang + lld can link an aarch64 Android shared object, as targets/tvm/pipeline.save_so does."""
    fix = "apt-get install -y clang lld"
    if not (shutil.which("clang") and shutil.which("ld.lld")):
        missing = [t for t in ("clang", "ld.lld") if not shutil.which(t)]
        return Check("clang + lld (aarch64 .so)", TVM, False, f"not on PATH: {', '.join(missing)}", fix)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "x.c"
        src.write_text("int mcpm_doctor(void) { return 0; }\n")
        cmd = ["clang", "--target=aarch64-linux-android", "-fuse-ld=lld", "-nostdlib", "-shared", "-o",
               str(Path(tmp) / "x.so"), str(src)]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        return Check("clang + lld (aarch64 .so)", TVM, False, f"test link failed: {last}", fix)
    return Check("clang + lld (aarch64 .so)", TVM, True, "linked a test aarch64-linux-android .so")


def check_sysroot() -> Check:
    from runner.build import SYSROOT_LIBS
    missing = [lib for lib in SYSROOT_LIBS if not (AARCH64_SYSROOT / "lib" / lib).exists()]
    return Check("aarch64 sysroot", ("runner",), not missing,
                 f"{AARCH64_SYSROOT}/lib" + (f": missing {', '.join(missing)}" if missing else ""),
                 "apt-get install -y g++-aarch64-linux-gnu libc6-dev-arm64-cross")


def check_runner_wheels() -> Check:
    """The aarch64 TVM wheels the on-device runner is built from are cached (exports never download)."""
    from runner.build import default_cache_dir, wheel_problem
    wheel_dir = default_cache_dir() / "wheels"
    problem = wheel_problem(wheel_dir)
    return Check("runner wheels (aarch64 TVM)", TVM + ("runner",), problem is None,
                 problem or f"{wheel_dir} (pinned, sha256 checked)", "bash scripts/install.sh")


def run_checks() -> list[Check]:
    return [
        *check_python_packages(),
        check_tvm_llvm(),
        check_clang_link(),
        _tool("aarch64-linux-gnu-g++", ("runner",), "g++-aarch64-linux-gnu", "cross-compiles mcpm-run"),
        check_sysroot(),
        check_runner_wheels(),
        _tool("adb", ("device",), "adb", "device benchmarks"),
        _tool("qemu-aarch64-static", ("tests",), "qemu-user-static", "runs mcpm-run in tests"),
    ]


def summary(checks: list[Check]) -> dict:
    """{"ok": every build target can build, "targets": {target: ok}, "checks": [...], "fixes": [...]}"""
    groups = BUILD_TARGETS + ("runner", "device", "tests")
    status = {g: all(c.ok for c in checks if g in c.needed_by) for g in groups}
    fixes = list(dict.fromkeys(c.fix for c in checks if not c.ok and c.fix))
    return {"ok": all(status[t] for t in BUILD_TARGETS), "targets": status,
            "checks": [asdict(c) for c in checks], "fixes": fixes}
