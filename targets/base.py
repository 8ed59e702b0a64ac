"""The one small interface every backend implements."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Protocol

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
    quantized: QuantizedModel           # what the bundle ships
    quality: dict                       # quality-gate figures (may be empty for fp16)
    progress: Progress
    load_reference: Callable[[], MiniCPM]         # builds the fp32 reference (original weights)
    options: dict = field(default_factory=dict)   # target-specific (backend, soc, threads, ...)

    @cached_property
    def reference(self) -> MiniCPM:
        """fp32 reference model, built on first use (a 2B model is 11 GB in fp32)."""
        return self.load_reference()

    @cached_property
    def quant_reference(self) -> MiniCPM:
        """The reference model running the dequantized weights ("PyTorch int4")."""
        return MiniCPM.from_state_dict(self.config, self.quantized.dequantized())


class Target(Protocol):
    name: str
    allows_vision: bool

    def build(self, ctx: ExportContext, staging: Path) -> dict:
        """Write the bundle's files into staging, verify them, return extra manifest keys."""
        ...
