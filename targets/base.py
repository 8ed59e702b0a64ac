"""The one small interface every backend implements: typed options -> an ExportPlan -> build.

A target is asked twice. ``plan(recipe, options)`` (cheap: no checkpoint, no --out) validates its
typed options and declares what the export needs: which quantization (scheme + quantizer + any
tensor codec of its own), which components, the tolerances it verifies with. exporter/api.py then
opens the checkpoint once, runs that quantization once, gates the weights the bundle will hold and
calls ``build(ctx, staging)`` with the result; the manifest is written by the centre."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Protocol

from exporter.config import MiniCPMConfig
from exporter.errors import ExportError
from exporter.model import MiniCPM
from exporter.parity import Tolerance
from exporter.progress import Progress
from exporter.quant import GROUP, QuantizedModel, Scheme
from exporter.recipes import Recipe

# Manifest keys the centre (exporter/api.py) writes; a target's build returning one is an ExportError.
CENTRE_KEYS = frozenset({"schema", "mcpm_export_version", "recipe", "target", "model", "quantization",
                         "quality", "source", "versions", "files", "manifest_sha256"})


def option(default: Any, help: str, choices: tuple | None = None, cli: bool = True) -> Any:
    """A field of a target's options dataclass; exporter/cli.py turns each into a ``--flag``
    (``cli=False``: API only). ``choices`` are checked by ``check_choices`` for API callers too."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


def check_choices(options, target: str) -> None:
    """Every field with ``choices`` holds one of them (or None)."""
    for f in dataclasses.fields(options):
        value, choices = getattr(options, f.name), f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ExportError(f"{target}: --{f.name.replace('_', '-')} '{value}': expected one of "
                              f"{', '.join(map(str, choices))}")


@dataclass(frozen=True)
class Quantization:
    """What the centre quantizes. Two plans with equal Quantization ship identical weights (release
    builds each distinct one once). ``codecs``: canonical tensor name -> the target's own encoder for a
    tensor the scheme keeps float16 (``encode(torch.Tensor) -> object with dequantize() and nbytes``);
    the gate then measures the encoded tensor, as the bundle ships it."""
    scheme: Scheme
    quantizer: str
    codecs: tuple[tuple[str, Any], ...] = ()
    # extra manifest "quantization" keys (what shipped); not part of the identity
    notes: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def manifest(self, quantizer: str) -> dict:
        quantized = self.scheme.linear_bits is not None
        base = {"scheme": self.scheme.name, "description": self.scheme.description, "group_size": GROUP,
                "quantizer": quantizer if quantized else "none"}
        clash = sorted(set(base) & {k for k, _ in self.notes})
        if clash:
            raise ExportError(f"plan: quantization notes redefine {clash}")
        return {**base, **dict(self.notes)}


@dataclass(frozen=True)
class ExportPlan:
    target: str
    quantization: Quantization
    components: tuple[str, ...]          # "text", "vision"
    verify_tokens: int                   # greedy tokens the build's verification compares
    tolerance: Tolerance                 # what the target's engine must reproduce (exporter/parity)
    options: Any                         # the target's options dataclass, as given (validated)
    settings: Any = None                 # the target's resolved settings (e.g. IOSSettings)


@dataclass
class ExportContext:
    recipe: Recipe
    config: MiniCPMConfig
    checkpoint: "exporter.checkpoint.Checkpoint"  # noqa: F821
    tokenizer_path: Path
    plan: ExportPlan
    quantized: QuantizedModel           # what the bundle ships (gated)
    progress: Progress

    @cached_property
    def quant_reference(self) -> MiniCPM:
        """The reference model running the dequantized weights ("PyTorch int4")."""
        return MiniCPM.from_state_dict(self.config, self.quantized.dequantized())


class Target(Protocol):
    name: str
    Options: type                      # dataclass of option(...) fields

    def plan(self, recipe: Recipe, options) -> ExportPlan:
        """Validate ``options`` (an ``Options`` instance) against ``recipe``; no checkpoint, no I/O."""
        ...

    def build(self, ctx: ExportContext, staging: Path) -> dict:
        """Write the bundle's files into staging, verify them, return extra manifest keys (none of
        CENTRE_KEYS)."""
        ...


def merge_manifest(centre: dict, extra: Mapping, target: str) -> dict:
    """The centre's manifest plus a target's keys; a key both define is an ExportError."""
    clash = sorted(set(centre) & set(extra) | set(extra) & CENTRE_KEYS)
    if clash:
        raise ExportError(f"target '{target}' returned manifest keys the centre owns: {', '.join(clash)}")
    return {**centre, **extra}
