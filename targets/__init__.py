"""Target registry: short stable names -> backend objects (feeds the CLI and artifact names).

Backends register themselves here; import is lazy so a missing optional toolchain only fails the
target that needs it."""
from __future__ import annotations

import importlib

from exporter.errors import ExportError

# name -> "module:attribute" of an object implementing targets.base.Target
TARGETS: dict[str, str] = {
    "android": "targets.tvm.target:ANDROID",
    "harmony": "targets.tvm.target:HARMONY",
    "ios": "targets.coreml.target:IOS",
}


def get_target(name: str):
    if name not in TARGETS:
        raise ExportError(f"unknown target '{name}' (known: {', '.join(sorted(TARGETS))})")
    module, attr = TARGETS[name].split(":")
    return getattr(importlib.import_module(module), attr)
