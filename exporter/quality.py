"""Perplexity, calibration statistics, and the int4 quality gate."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ExportError
from .model import MiniCPM

CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"
WINDOW = 512
# Trained MiniCPMs measure 5-40 on the English calibration text (tiny: ~31); a model with random or
# scrambled weights measures hundreds to the vocabulary size. Above this the fp checkpoint is suspect.
IMPLAUSIBLE_PPL = 200.0


def windows(ids: list[int], window: int = WINDOW, count: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of the token stream (the last partial one dropped)."""
    n = len(ids) // window
    if count is not None:
        n = min(n, count)
    return [ids[i * window:(i + 1) * window] for i in range(n)]


@torch.no_grad()
def perplexity(model: MiniCPM, ids: list[int], window: int = WINDOW, count: int | None = None,
               on_window=None) -> float:
    wins = windows(ids, window, count)
    if not wins:
        raise ExportError(f"text too short for perplexity: {len(ids)} tokens < one {window}-token window")
    nll, n = 0.0, 0
    for w in wins:
        x = torch.tensor([w])
        logits = model(x)
        nll += F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="sum").item()
        n += len(w) - 1
        if on_window:
            on_window()
    return math.exp(nll / n)


@dataclass
class QualityReport:
    ppl_fp: float
    ppl_int4: float
    tokens: int
    windows: int
    text: str
    threshold_pct: float

    @property
    def loss_pct(self) -> float:
        return 100.0 * (self.ppl_int4 / self.ppl_fp - 1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss_pct"] = round(self.loss_pct, 3)
        d["ppl_fp"], d["ppl_int4"] = round(self.ppl_fp, 4), round(self.ppl_int4, 4)
        return d


def gate(report: QualityReport, override: bool = False) -> None:
    """Stop the export when a perplexity is not finite (never overridable: the model is broken), or
    when int4 loses more perplexity than the recipe allows."""
    if not (math.isfinite(report.ppl_fp) and math.isfinite(report.ppl_int4)):
        raise ExportError(f"quality gate: perplexity is not finite (fp {report.ppl_fp}, int4 {report.ppl_int4}) "
                          f"on {report.text}: the model's outputs overflow; check the checkpoint")
    if report.loss_pct > report.threshold_pct and not override:
        raise ExportError(f"quality gate: int4 perplexity {report.ppl_int4:.3f} is {report.loss_pct:.2f}% "
                          f"above fp {report.ppl_fp:.3f} on {report.text}, over the recipe's "
                          f"{report.threshold_pct}% limit (--allow-quality-loss to export anyway)")


def implausible(report: QualityReport) -> str | None:
    """A warning when the fp checkpoint itself looks untrained or damaged (the gate only compares)."""
    if report.ppl_fp > IMPLAUSIBLE_PPL:
        return (f"warning: fp perplexity {report.ppl_fp:.1f} on {report.text} is implausibly high for a "
                f"trained model (above {IMPLAUSIBLE_PPL:.0f}; trained MiniCPMs give 5-40): check the checkpoint")
    return None
