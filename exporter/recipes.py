"""Recipes: the named model variants users ask for with ``--model`` (one TOML file each in recipes/)."""
from __future__ import annotations

import importlib.util
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ExportError

# Both are package data (an installed wheel has them): the top-level package ``recipes`` and the
# checkpoints under exporter/models/.
RECIPE_DIR = Path(importlib.util.find_spec("recipes").origin).parent
EMBEDDED_DIR = Path(__file__).resolve().parent / "models"

KNOWN_TARGETS = ("android", "harmony", "ios")
KNOWN_SCHEMES = ("q4f16", "q4f16_e8", "fp16")
KNOWN_QUANTIZERS = ("gptq", "clip")     # exporter/quantizers.py QUANTIZERS (tests/test_quantizers.py)
KNOWN_FAMILIES = ("minicpm", "minicpmv")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    repo_id: str
    family: str                # "minicpm" (text) or "minicpmv" (vision + text)
    architecture: str          # expected config.json architectures[0]
    dims: dict                 # expected config.json values, e.g. hidden_size
    quantization: str          # a scheme from exporter.quant.SCHEMES
    context_window: int
    prefill_chunk: int
    targets: tuple[str, ...]
    max_ppl_loss_pct: float = 1.0   # quality gate for int4 exports
    quantizer: str = "gptq"          # how int4 values are chosen: exporter.quantizers.QUANTIZERS
    calibration_windows: int = 16    # 512-token windows of calibration text for activation statistics
    gate_windows: int = 6            # further windows measuring the quality gate
    embedded: str | None = None      # a checkpoint shipped in EMBEDDED_DIR (exporter/models/)
    conv_template: str = "minicpm"
    vision: dict = field(default_factory=dict)
    source: Path | None = None

    @property
    def is_vision(self) -> bool:
        return self.family == "minicpmv"

    @property
    def embedded_path(self) -> Path | None:
        return EMBEDDED_DIR / self.embedded if self.embedded else None

    def require_target(self, target: str) -> None:
        if target not in self.targets:
            why = " (vision models are exported for android and harmony only; iOS is text only)" \
                if self.is_vision and target == "ios" else ""
            raise ExportError(f"recipe '{self.name}' does not allow target '{target}'; "
                              f"it allows {', '.join(self.targets)}{why}")


_REQUIRED = {
    "description": str, "repo_id": str, "family": str, "architecture": str, "dims": dict,
    "quantization": str, "context_window": int, "prefill_chunk": int, "targets": list,
}
_OPTIONAL = {"max_ppl_loss_pct": (int, float), "quantizer": str, "calibration_windows": int, "gate_windows": int,
             "embedded": str, "conv_template": str, "vision": dict}


def parse_recipe(path: Path) -> Recipe:
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ExportError(f"{path}: malformed recipe ({e})") from None
    for key, typ in _REQUIRED.items():
        if key not in raw:
            raise ExportError(f"{path}: field '{key}' is missing")
        if not isinstance(raw[key], typ) or isinstance(raw[key], bool):
            raise ExportError(f"{path}: field '{key}' must be a {typ.__name__}")
    for key, typ in _OPTIONAL.items():
        if key in raw and not isinstance(raw[key], typ):
            raise ExportError(f"{path}: field '{key}' has the wrong type")
    unknown = set(raw) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise ExportError(f"{path}: unknown field '{sorted(unknown)[0]}'")
    if raw["quantization"] not in KNOWN_SCHEMES:
        raise ExportError(f"{path}: field 'quantization': unknown scheme '{raw['quantization']}' "
                          f"(known: {', '.join(KNOWN_SCHEMES)})")
    if raw.get("quantizer", "gptq") not in KNOWN_QUANTIZERS:
        raise ExportError(f"{path}: field 'quantizer': unknown quantizer '{raw['quantizer']}' "
                          f"(known: {', '.join(KNOWN_QUANTIZERS)})")
    if raw["family"] not in KNOWN_FAMILIES:
        raise ExportError(f"{path}: field 'family': unknown family '{raw['family']}'")
    for t in raw["targets"]:
        if t not in KNOWN_TARGETS:
            raise ExportError(f"{path}: field 'targets': unknown target '{t}' "
                              f"(known: {', '.join(KNOWN_TARGETS)})")
    if raw["family"] == "minicpmv" and "ios" in raw["targets"]:
        raise ExportError(f"{path}: field 'targets': vision recipes cannot target ios (text only)")
    if raw["prefill_chunk"] <= 0 or raw["context_window"] < raw["prefill_chunk"]:
        raise ExportError(f"{path}: field 'prefill_chunk' must be positive and <= context_window")
    return Recipe(name=path.stem, targets=tuple(raw.pop("targets")), source=path, **raw)


def load_recipes(directory: Path = RECIPE_DIR) -> dict[str, Recipe]:
    return {p.stem: parse_recipe(p) for p in sorted(directory.glob("*.toml"))}


def get_recipe(name: str, directory: Path = RECIPE_DIR) -> Recipe:
    known = ", ".join(sorted(p.stem for p in directory.glob("*.toml")))
    if not name or any(c in name for c in "/\\~") or name.startswith(".") or name.endswith(".toml"):
        raise ExportError(f"--model '{name}': a recipe name is expected, not a path or repo id (known: {known}); "
                          f"give a checkpoint folder with --checkpoint DIR")
    path = directory / f"{name}.toml"
    if not path.is_file():
        raise ExportError(f"unknown recipe '{name}' (known: {known})")
    return parse_recipe(path)
