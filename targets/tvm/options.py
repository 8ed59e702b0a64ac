"""android / harmony options (light: no TVM import, so the CLI can build its flags from them)."""
from __future__ import annotations

from dataclasses import dataclass

from targets.base import option

from .presets import PRESETS

BACKENDS = {"cpu": ("cpu",), "opencl": ("opencl",), "all": ("cpu", "opencl")}   # --backend -> builds


@dataclass(frozen=True)
class TVMOptions:
    """exporter/cli.py makes each field a flag (targets.base.option)."""
    backend: str = option("cpu", "aarch64 CPU code, OpenCL kernels, or both.", tuple(BACKENDS))
    soc: str = option("generic", "CPU preset (mcpu/mattr) from targets/tvm/presets.py.", tuple(PRESETS))
    vision_weights: str | None = option(None, "MiniCPM-V vision encoder weights: int8 through the CPU "
                                              "microkernels (default; recipe vision.weights) or fp32.",
                                        ("q8", "fp32"))
