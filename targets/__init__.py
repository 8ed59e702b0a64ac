"""Target registry: short stable names -> backend objects (feeds the CLI and artifact names).

Backends register themselves here; import is lazy so a missing optional toolchain only fails the
target that needs it. Each target's options dataclass sits in a light module of its own (no
toolchain import), so the CLI builds every target's flags without loading TVM or coremltools."""
from __future__ import annotations

import importlib

from exporter.errors import ExportError

# name -> ("module:attribute" of an object implementing targets.base.Target,
#          "module:attribute" of its Options dataclass, the same class as the object's .Options)
TARGETS: dict[str, tuple[str, str]] = {
    "android": ("targets.tvm.target:ANDROID", "targets.tvm.options:TVMOptions"),
    "harmony": ("targets.tvm.target:HARMONY", "targets.tvm.options:TVMOptions"),
    "ios": ("targets.coreml.target:IOS", "targets.coreml.options:IOSOptions"),
}


def _load(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _entry(name: str) -> tuple[str, str]:
    if name not in TARGETS:
        raise ExportError(f"unknown target '{name}' (known: {', '.join(sorted(TARGETS))})")
    return TARGETS[name]


def get_target(name: str):
    return _load(_entry(name)[0])


def get_options(name: str) -> type:
    """The target's Options dataclass (without importing the target's toolchain)."""
    return _load(_entry(name)[1])
