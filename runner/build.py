"""Build the on-device runner `mcpm-run` for aarch64 Android / HarmonyOS (no glibc on the device).

Output (a directory, copied as `runner/` into android/harmony bundles):
    mcpm-run          static aarch64 launcher (launcher.c): execs the bundled loader on mcpm-run.bin
    mcpm-run.bin      the runner (mcpm_run.cc; bundle.cc: the bundle's files and libraries; options.cc,
                      prompt.cc + tokenizer.cc: text prompts; vision.cc: the image path) over tvm::ffi,
                      dynamically linked
    lib/              ld-linux-aarch64.so.1, libc/libm/libdl/libpthread/libstdc++/libgcc_s (from the
                      Debian cross toolchain's sysroot) + libtvm_runtime(_extra).so, libtvm_ffi.so
                      (from PyPI's aarch64 apache-tvm / apache-tvm-ffi wheels, never installed)
    BUILD.json        build key, inputs and sha256 of every file

Headers come from the host's tvm_ffi wheel (same version as the aarch64 one, checked). Builds are
cached under a key hashing the sources, this file, the compiler versions, the wheels and the sysroot
libraries, and are reproducible: fixed flags, -ffile-prefix-map, stripped, no timestamps, so the same
inputs give byte-identical files.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from exporter.bundle import sha256_file
from exporter.cache import cache_dir
from exporter.errors import ExportError

HERE = Path(__file__).resolve().parent
SOURCES = ("mcpm_run.cc", "bundle.cc", "bundle.h", "options.cc", "options.h", "prompt.cc", "prompt.h", "tokenizer.cc",
           "tokenizer.h", "vision.cc", "vision.h", "launcher.c", "build.py")
CXX_SOURCES = tuple(n for n in SOURCES if n.endswith(".cc"))   # compiled + linked into mcpm-run.bin
TRIPLE = "aarch64-linux-gnu"
SYSROOT_LIB = Path(f"/usr/{TRIPLE}/lib")
SYSROOT_LIBS = ("ld-linux-aarch64.so.1", "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0",
                "libgcc_s.so.1", "libstdc++.so.6")
TVM_VERSION, TVM_FFI_VERSION = "0.27.0.post1", "0.1.14.post0"
WHEELS = {  # file name -> sha256, as published on PyPI
    f"apache_tvm-{TVM_VERSION}-py3-none-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl":
        "4acfdb7653e4e1ba7a707bdf2833db72eb8fda7d04d99141f2a4e1da43171fb7",
    f"apache_tvm_ffi-{TVM_FFI_VERSION}-cp311-cp311-manylinux_2_24_aarch64.manylinux_2_28_aarch64.whl":
        "d1a011a0743acb88ffc650c70bfb1376fa90cb7196b042598c6d0c1e690ce185",
}
WHEEL_LIBS = ("tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_runtime_extra.so", "tvm_ffi/lib/libtvm_ffi.so")
CXXFLAGS = ["-std=c++17", "-O2", "-ffp-contract=off", "-g0", "-s", "-fno-ident", "-Wl,--build-id=sha1", "-Wl,--hash-style=gnu"]
CFLAGS = ["-O2", "-g0", "-s", "-static", "-fno-ident", "-Wl,--build-id=sha1"]


def default_cache_dir() -> Path:
    return cache_dir("runner")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise ExportError(f"cross compiler {name} not found on PATH: install Debian's g++-{TRIPLE}")
    return path


def _version(tool: str) -> str:
    return subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def _ffi_include() -> Path:
    import tvm_ffi

    if tvm_ffi.__version__ != TVM_FFI_VERSION:
        raise ExportError(f"host tvm_ffi is {tvm_ffi.__version__}, the runner needs {TVM_FFI_VERSION} "
                          "(its headers must match the aarch64 libtvm_ffi.so)")
    inc = Path(tvm_ffi.__file__).resolve().parent / "include"
    if not (inc / "tvm" / "ffi" / "function.h").is_file():
        raise ExportError(f"tvm_ffi headers not found under {inc}")
    return inc


FETCH_HINT = "run `bash scripts/install.sh` (or `python3 -m runner.build --fetch-wheels`) once with access to PyPI"
# what pip -v says when PyPI cannot be reached (its last line then wrongly claims the version does not exist)
OFFLINE = re.compile(r"Failed to establish a new connection: (\[Errno -?\d+\] [^'\")]+)|connection error: ([^(]+)"
                     r"|(Temporary failure in name resolution|Network is unreachable|timed out)")


def wheel_problem(wheel_dir: Path) -> str | None:
    """Why the pinned aarch64 TVM wheels are not usable from wheel_dir (None: they are)."""
    for name, digest in WHEELS.items():
        p = wheel_dir / name
        if not p.is_file():
            return f"{p.name} is not in {wheel_dir}"
        if sha256_file(p) != digest:
            return f"{p}: sha256 differs from the pinned PyPI wheel"
    return None


def cached_wheels(wheel_dir: Path) -> list[Path]:
    """The aarch64 TVM wheels the runner is built from, from the cache only: an export never downloads."""
    problem = wheel_problem(wheel_dir)
    if problem:
        raise ExportError(f"the on-device runner needs the aarch64 apache-tvm / apache-tvm-ffi wheels: {problem}; "
                          f"exports work offline, so they are fetched at install time: {FETCH_HINT}")
    return [wheel_dir / name for name in WHEELS]


def fetch_wheels(wheel_dir: Path, say=print) -> list[Path]:
    """Download the pinned aarch64 TVM wheels into wheel_dir with pip (install time, scripts/install.sh);
    nothing is downloaded when they are already there."""
    if wheel_problem(wheel_dir) is None:
        return cached_wheels(wheel_dir)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    say(f"downloading the aarch64 apache-tvm / apache-tvm-ffi wheels from PyPI into {wheel_dir}")
    cmd = [sys.executable, "-m", "pip", "download", "-v", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "-d", str(wheel_dir),
           f"apache-tvm=={TVM_VERSION}", f"apache-tvm-ffi=={TVM_FFI_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        offline = OFFLINE.search(proc.stdout + proc.stderr)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise ExportError("pip download of the aarch64 TVM wheels failed: " + (
            f"PyPI cannot be reached ({next(g for g in offline.groups() if g).strip()}); connect to the network "
            f"(or set PIP_INDEX_URL to a reachable mirror) and run it again" if offline else last))
    return cached_wheels(wheel_dir)


def build_key(wheels: list[Path]) -> tuple[str, dict]:
    """Hash of every input of the build, and the inputs themselves (written to BUILD.json)."""
    inc = _ffi_include()
    inputs = {
        "sources": {n: sha256_file(HERE / n) for n in SOURCES},
        "compilers": {t: _version(_tool(t)) for t in (f"{TRIPLE}-g++", f"{TRIPLE}-gcc")},
        "wheels": {p.name: WHEELS[p.name] for p in wheels},
        "sysroot": {n: sha256_file(SYSROOT_LIB / n) for n in SYSROOT_LIBS},
        "tvm_ffi_headers": hashlib.sha256(b"".join(
            f"{p.relative_to(inc)}:{sha256_file(p)}\n".encode() for p in sorted(inc.rglob("*.h")))).hexdigest(),
        "cxxflags": CXXFLAGS, "cflags": CFLAGS,
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return key, inputs


def _compile(out: Path, work: Path, key: str, wheels: list[Path]) -> None:
    libdir = out / "lib"
    libdir.mkdir(parents=True)
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            for member in WHEEL_LIBS:
                if member in z.namelist():
                    (libdir / Path(member).name).write_bytes(z.read(member))
    for name in SYSROOT_LIBS:
        shutil.copyfile(SYSROOT_LIB / name, libdir / name)  # follows symlinks
    missing = [n for n in map(lambda m: Path(m).name, WHEEL_LIBS) if not (libdir / n).is_file()]
    if missing:
        raise ExportError(f"aarch64 wheels lack {', '.join(missing)}")
    inc = _ffi_include()
    # build from a copy in `work` so no checkout path can leak into the output
    src = work / "src"
    src.mkdir()
    for n in SOURCES[:-1]:
        shutil.copyfile(HERE / n, src / n)
    maps = [f"-ffile-prefix-map={src}=runner", f"-ffile-prefix-map={inc}=tvm_ffi/include"]
    steps = {
        "mcpm_run.cc": [_tool(f"{TRIPLE}-g++"), *CXXFLAGS, *maps, f"-DMCPM_RUN_BUILD_ID=\"{key[:12]}\"",
                        f"-I{inc}", *(str(src / n) for n in CXX_SOURCES), "-o", str(out / "mcpm-run.bin"),
                        f"-L{libdir}", "-ltvm_runtime", "-ltvm_ffi"],
        "launcher.c": [_tool(f"{TRIPLE}-gcc"), *CFLAGS, *maps, str(src / "launcher.c"), "-o", str(out / "mcpm-run")],
    }
    env = dict(os.environ, LC_ALL="C", SOURCE_DATE_EPOCH="0")
    for name, cmd in steps.items():
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
        if proc.returncode < 0:  # killed by a signal from outside (shared build machine): retry once
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
        if proc.returncode != 0:
            lines = [x for x in proc.stderr.splitlines() if "error" in x] or proc.stderr.splitlines()
            raise ExportError(f"compiling runner/{name} failed: "
                              f"{lines[0] if lines else f'exit status {proc.returncode}'}")
    for p in sorted(out.rglob("*")):
        if p.is_file():
            p.chmod(0o755 if p.name.startswith("mcpm-run") or p.name.startswith("ld-") else 0o644)


def build_runner(cache_dir: Path | None = None, force: bool = False, say=None) -> Path:
    """Build (or reuse) the runner; returns its directory (see the module docstring)."""
    from rich.console import Console

    console = Console(stderr=True)
    standalone = say is None  # inside an export's progress stage there is already a live display
    say = say or (lambda msg: console.print(f"runner: {msg}"))
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    wheels = cached_wheels(cache_dir / "wheels")
    key, inputs = build_key(wheels)
    final = cache_dir / f"mcpm-run-{key[:16]}"
    if (final / "BUILD.json").is_file() and not force:
        say(f"cached build {final}")
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    say("cross-compiling mcpm-run for aarch64")
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as tmp, \
            (console.status("runner: cross-compiling") if standalone else contextlib.nullcontext()):
        work = Path(tmp)
        out = work / "out"
        _compile(out, work, key, wheels)
        files = {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
        info = {"runner_version": f"0.1.0+{key[:12]}", "build_key": key, "inputs": inputs, "files": files}
        (out / "BUILD.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        if final.exists():  # --force, or a concurrent build won: move it aside (deleted with tmp)
            os.replace(final, work / "old")
        os.replace(out, final)
    say(f"built {final}")
    return final


def copy_runner(built: Path, dest: Path) -> None:
    """Replace dest with a copy of a built runner directory (modes kept, times not)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(built, dest, copy_function=shutil.copyfile)
    for p in dest.rglob("*"):
        if p.is_file():
            p.chmod((built / p.relative_to(dest)).stat().st_mode & 0o777)


def install_runner(bundle_dir: Path, cache_dir: Path | None = None, say=None) -> dict:
    """Copy the (cached) runner into bundle_dir/runner/; returns manifest keys describing it."""
    built = build_runner(cache_dir, say=say)
    copy_runner(built, Path(bundle_dir) / "runner")
    info = json.loads((built / "BUILD.json").read_text())
    return {"runner": {"path": "runner/mcpm-run", "version": info["runner_version"], "abi": "arm64-v8a",
                       "build_key": info["build_key"]}}


if __name__ == "__main__":      # scripts/install.sh: python3 -m runner.build --fetch-wheels
    import argparse

    ap = argparse.ArgumentParser(description="Fetch the pinned aarch64 TVM wheels the runner is built from.")
    ap.add_argument("--fetch-wheels", action="store_true", required=True)
    ap.parse_args()
    try:
        wheel_dir = default_cache_dir() / "wheels"
        fetch_wheels(wheel_dir)
        print(f"runner wheels: {wheel_dir}")
    except ExportError as e:
        sys.exit(f"error: {e}")
