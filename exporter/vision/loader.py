"""Open an OpenBMB MiniCPM-V (1.0 / 2.0) checkpoint: vision state dict + canonical text state dict."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..config import MiniCPMConfig
from ..errors import ExportError
from ..recipes import Recipe
from . import names
from .config import VisionConfig
from .model import MiniCPMVVision


@dataclass
class MiniCPMVCheckpoint:
    checkpoint: Checkpoint
    text_config: MiniCPMConfig
    vision_config: VisionConfig
    vision_state: dict[str, torch.Tensor]

    def text_state(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Canonical DESIGN.md names (llm.model.* / llm.lm_head.weight through exporter/names.py)."""
        return self.checkpoint.text_tensors(self.text_config, prefix=names.LLM_PREFIX, dtype=dtype)

    def vision_model(self) -> MiniCPMVVision:
        return MiniCPMVVision.from_state_dict(self.vision_config, self.vision_state)


def load_minicpmv(path: Path, recipe: Recipe | None = None) -> MiniCPMVCheckpoint:
    return minicpmv_checkpoint(open_checkpoint(Path(path), recipe), recipe)


def minicpmv_checkpoint(ckpt: Checkpoint, recipe: Recipe | None = None) -> MiniCPMVCheckpoint:
    """The MiniCPM-V view of an already opened checkpoint (the export's ``ctx.checkpoint``)."""
    where = ckpt.path / "config.json"
    for key in sorted(ckpt.shards):
        kind = names.classify(key)
        if kind == "unknown":
            raise ExportError(f"{ckpt.path}: checkpoint key '{key}' is not in the MiniCPM-V name table")
    raw = ckpt.raw_config
    text_config = MiniCPMConfig.from_hf(raw.get("llm_config") or raw, str(where))
    state = {}
    for prefix in ("vpm.", "resampler."):
        for key, tensor in ckpt.hf_items(prefix):
            if names.classify(key) == "vision":
                state[key] = tensor.to(torch.float32)
    if not state:
        raise ExportError(f"{ckpt.path}: no vpm.*/resampler.* tensors: not a MiniCPM-V checkpoint")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    vcfg = VisionConfig.from_checkpoint(raw, shapes, recipe.vision if recipe else None, str(where))
    if vcfg.hidden != text_config.hidden_size:
        raise ExportError(f"{where}: resampler width {vcfg.hidden} != LLM hidden_size {text_config.hidden_size}")
    want = {k: tuple(v.shape) for k, v in MiniCPMVVision(vcfg).state_dict().items()}
    for key, shape in want.items():
        if key not in shapes:
            raise ExportError(f"{ckpt.path}: checkpoint lacks tensor '{key}'")
        if shapes[key] != shape:
            raise ExportError(f"{ckpt.path}: tensor '{key}' has shape {shapes[key]}, expected {shape}")
    extra = sorted(set(shapes) - set(want))
    if extra:
        raise ExportError(f"{ckpt.path}: tensor '{extra[0]}' does not fit the vision config")
    return MiniCPMVCheckpoint(ckpt, text_config, vcfg, state)
