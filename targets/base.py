"""The one small interface every backend implements."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from exporter.config import MiniCPMConfig
from exporter.model import MiniCPM
from exporter.progress import Progress
from exporter.quant import QuantizedModel
from exporter.recipes import Recipe


@dataclass
class ExportContext:
    recipe: Recipe
    config: MiniCPMConfig
    checkpoint: "exporter.checkpoint.Checkpoint"  # noqa: F821
    tokenizer_path: Path
    reference: MiniCPM                  # fp32 reference model (original weights)
    quantized: QuantizedModel           # what the bundle ships
    quant_reference: MiniCPM            # reference model running the dequantized weights ("PyTorch int4")
    quality: dict                       # quality-gate figures (may be empty for fp16)
    progress: Progress
    options: dict = field(default_factory=dict)   # target-specific (backend, soc, threads, ...)


class Target(Protocol):
    name: str
    allows_vision: bool

    def build(self, ctx: ExportContext, staging: Path) -> dict:
        """Write the bundle's files into staging, verify them, return extra manifest keys."""
        ...
