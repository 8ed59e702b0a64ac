"""Every change this project makes to coremltools internals, declared in one place.

``patched()`` checks that the installed coremltools is the pinned version these patches were written
against (pyproject.toml: coremltools==9.0), applies every entry of PATCHES, silences coremltools'
warnings, and restores every original attribute on exit (also on error). targets/coreml/convert.py
runs its coremltools calls (ct.convert, the compression passes, save_multifunction) inside it.

The memory patches replace two helpers that make full-size temporaries of every weight with sliced
equivalents (same answers; tests/test_ios.py compares them with the originals).
"""
from __future__ import annotations

import functools
import importlib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from exporter.errors import ExportError

PINNED_VERSION = "9.0"
CHUNK = 1 << 22   # elements per slice in the lean checks below


def _lean_fp16_overflow(op) -> bool:
    """FP16ComputePrecision.fp16_overflow without its full-size temporaries.

    coremltools computes ``max(|v|[np.where(|v| < 1e38)]) > 65504`` for every float32 constant an
    op reads: |v|, a mask, two int64 index arrays and a gathered copy, about 6 float32 copies of the
    constant at once (6.8 GB for MiniCPM-2B's embedding; the peak of ct.convert). Same answer,
    computed a slice at a time."""
    for inputs in op.inputs.values():
        for var in (inputs if isinstance(inputs, (list, tuple)) else [inputs]):
            if var.op is None or var.op.op_type != "const" or not var.is_tensor_or_scalar_of(dtype="fp32"):
                continue
            flat = np.asarray(var.op.val.val).reshape(-1)
            for s in range(0, flat.size, CHUNK):
                a = np.abs(flat[s:s + CHUNK])
                if np.any((a > 65504) & (a < 1e38)):
                    return True
    return False


def _lean_allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False) -> bool:
    """np.allclose a slice at a time (const_deduplication compares whole weights with it: several
    float64 temporaries of the 283M-value embedding when merging the functions)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.size <= CHUNK:
        return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan))
    fa, fb = a.reshape(-1), b.reshape(-1)
    return all(np.allclose(fa[s:s + CHUNK], fb[s:s + CHUNK], rtol=rtol, atol=atol, equal_nan=equal_nan)
               for s in range(0, fa.size, CHUNK))


class _LeanNumpy:
    """numpy for coremltools' const_deduplication module, with the sliced allclose."""

    allclose = staticmethod(_lean_allclose)

    def __getattr__(self, name):
        return getattr(np, name)


def _silent_tqdm():
    import tqdm
    return functools.partial(tqdm.tqdm, disable=True)


@dataclass(frozen=True)
class Patch:
    module: str                       # importable module
    attribute: str                    # attribute path inside it, e.g. "Class.method"
    replacement: Callable[[], Any]    # makes the value installed while patched
    why: str


_PASSES = "coremltools.converters.mil.mil.passes"
PATCHES = (
    Patch("coremltools.converters.mil.frontend.torch.ops", "_tqdm", _silent_tqdm,
          "progress bars: progress is reported through rich"),
    Patch(f"{_PASSES}.pass_pipeline", "tqdm", _silent_tqdm, "progress bars"),
    Patch("coremltools.optimize.coreml._quantization_passes", "tqdm", _silent_tqdm, "progress bars"),
    Patch(f"{_PASSES}.defs.quantization", "FP16ComputePrecision.fp16_overflow",
          lambda: staticmethod(_lean_fp16_overflow), "memory: ~6 float32 copies of each constant"),
    Patch(f"{_PASSES}.defs.cleanup.const_deduplication", "np", _LeanNumpy,
          "memory: whole-weight float64 temporaries in allclose"),
)


def check_version(version: str | None = None) -> None:
    import coremltools
    found = version if version is not None else coremltools.__version__
    if found != PINNED_VERSION:
        raise ExportError(f"ios: coremltools {found} is installed, but targets/coreml/patches.py is written "
                          f"for coremltools=={PINNED_VERSION} (pip install coremltools=={PINNED_VERSION})")


def _owner(patch: Patch) -> tuple[Any, str]:
    obj = importlib.import_module(patch.module)
    *path, name = patch.attribute.split(".")
    for part in path:
        obj = getattr(obj, part)
    if name not in vars(obj):
        raise ExportError(f"ios: coremltools has no {patch.module}.{patch.attribute} to patch "
                          f"(written for coremltools=={PINNED_VERSION})")
    return obj, name


@contextmanager
def patched():
    """Apply PATCHES (after the version check) and silence warnings; restore everything on exit."""
    check_version()
    saved: list[tuple[Any, str, Any]] = []
    try:
        for patch in PATCHES:
            obj, name = _owner(patch)
            saved.append((obj, name, vars(obj)[name]))
            setattr(obj, name, patch.replacement())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
