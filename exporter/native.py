"""Build (once, cached) and load the project's small C kernels with the system C compiler."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
from functools import cache
from pathlib import Path

from .cache import cache_dir
from .errors import ExportError

CSRC = Path(__file__).parent / "csrc"
CACHE = cache_dir("native")


@cache
def load(name: str) -> ctypes.CDLL:
    """Compile csrc/<name>.c to a shared library keyed by its source hash and load it."""
    src = CSRC / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise ExportError(f"{src}: no C compiler found (apt-get install gcc)")
    flags = ["-O3", "-fPIC", "-shared", "-fno-math-errno"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=x86-64-v2")   # SSE4.1 rounding vectorises; every x86 CPU since ~2009
    key = hashlib.sha256(src.read_bytes() + " ".join([cc, *flags, sysconfig.get_platform()]).encode()).hexdigest()[:16]
    lib = CACHE / f"{name}-{key}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        res = subprocess.run([cc, *flags, str(src), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise ExportError(f"{src}: compiling failed: {res.stderr.strip().splitlines()[-1]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))
