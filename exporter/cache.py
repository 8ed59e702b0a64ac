"""The one cache root: ``$MCPM_EXPORT_CACHE``, else ``~/.cache/mcpm-export``.

Compiled C helpers (native/), the int4 microkernels (kernels/), the on-device runner (runner/) and the
benchmarks' downloads and checkpoints (bench/, llama_cpp/) all live under it."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_VARIABLE = "MCPM_EXPORT_CACHE"


def cache_root() -> Path:
    value = os.environ.get(CACHE_VARIABLE)
    return Path(value) if value else Path.home() / ".cache" / "mcpm-export"


def cache_dir(name: str) -> Path:
    """``cache_root() / name`` (not created)."""
    return cache_root() / name
