"""The Python API the CLI is a thin layer over."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, open_checkpoint, resolve_checkpoint
from .config import MiniCPMConfig
from .errors import ExportError
from .model import MiniCPM
from .progress import Progress
from .quality import CALIBRATION_TEXT, QualityReport, gate, input_importance, perplexity
from .quant import SCHEMES, QuantizedModel, quantize_state_dict
from .recipes import Recipe, get_recipe
from .tokenizer import Tokenizer

IMPORTANCE_WINDOWS = 16  # calibration windows 0..15 feed the activation-aware scale search
GATE_WINDOWS = 6         # windows 16..21 measure the quality gate


@dataclass
class LoadedModel:
    recipe: Recipe
    checkpoint: Checkpoint
    config: MiniCPMConfig
    state: dict[str, torch.Tensor]
    model: MiniCPM
    tokenizer: Tokenizer


def load(recipe: str | Recipe, checkpoint: str | Path | None = None, prefix: str = "") -> LoadedModel:
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    ckpt = open_checkpoint(resolve_checkpoint(recipe, checkpoint), recipe)
    raw = ckpt.raw_config.get("llm_config", ckpt.raw_config) if recipe.is_vision else ckpt.raw_config
    config = MiniCPMConfig.from_hf(raw, str(ckpt.path / "config.json"))
    state = ckpt.text_tensors(config, prefix=prefix)
    tok = Tokenizer(ckpt.tokenizer_path)
    if tok.vocab_size > config.vocab_size:
        raise ExportError(f"{ckpt.tokenizer_path}: tokenizer has {tok.vocab_size} pieces, "
                          f"config.json vocab_size is {config.vocab_size}")
    return LoadedModel(recipe, ckpt, config, state, MiniCPM.from_state_dict(config, state), tok)


def quantize(lm: LoadedModel, scheme: str | None = None, progress: Progress | None = None,
             allow_quality_loss: bool = False, gate_windows: int = GATE_WINDOWS
             ) -> tuple[QuantizedModel, MiniCPM, QualityReport | None]:
    """Quantize per the recipe's scheme, measure fp vs quantized perplexity, apply the gate."""
    progress = progress or Progress(quiet=True)
    scheme = SCHEMES[scheme or lm.recipe.quantization]
    calib = lm.tokenizer.encode(CALIBRATION_TEXT.read_text())
    importance = None
    if scheme.linear_bits is not None:
        with progress.stage("calibrate"):
            importance = input_importance(lm.model, calib, count=IMPORTANCE_WINDOWS)
    with progress.stage("quantize"):
        qm = quantize_state_dict(lm.state, scheme, importance)
        qref = MiniCPM.from_state_dict(lm.config, qm.dequantized())
        progress.log(f"{scheme.name}: {qm.nbytes / 1e6:.1f} MB of weights")
    if scheme.linear_bits is None:
        return qm, qref, None
    with progress.stage("quality gate"):
        gate_ids = calib[512 * IMPORTANCE_WINDOWS:]
        report = QualityReport(
            ppl_fp=perplexity(lm.model, gate_ids, count=gate_windows),
            ppl_int4=perplexity(qref, gate_ids, count=gate_windows),
            tokens=min(len(gate_ids) // 512, gate_windows) * 512, windows=gate_windows,
            text=f"{CALIBRATION_TEXT.name} (windows {IMPORTANCE_WINDOWS}+)",
            threshold_pct=lm.recipe.max_ppl_loss_pct)
        progress.log(f"perplexity fp {report.ppl_fp:.3f} -> {scheme.name} {report.ppl_int4:.3f} "
                     f"({report.loss_pct:+.2f}%, limit {report.threshold_pct}%)")
        gate(report, allow_quality_loss)
    return qm, qref, report


def generate(recipe: str, prompt: str, max_new_tokens: int = 32, checkpoint=None,
             quant: str | None = None) -> dict:
    lm = load(recipe, checkpoint)
    model = lm.model
    if quant:
        _, model, _ = quantize(lm, quant if quant in SCHEMES else lm.recipe.quantization)
    ids = lm.tokenizer.encode(prompt)
    t0 = time.perf_counter()
    out, _ = model.generate(ids, max_new_tokens, eos_id=lm.config.eos_token_id)
    dt = time.perf_counter() - t0
    return {"prompt_tokens": ids, "tokens": out, "text": lm.tokenizer.decode(out),
            "seconds": round(dt, 3)}


def evaluate(recipe: str, text_file: Path, checkpoint=None, windows: int | None = 40,
             progress: Progress | None = None) -> dict:
    lm = load(recipe, checkpoint)
    text = Path(text_file)
    if not text.is_file():
        raise ExportError(f"--text {text}: no such file")
    ids = lm.tokenizer.encode(text.read_text())
    progress = progress or Progress(quiet=True)
    qm, qref, _ = quantize(lm, progress=progress, allow_quality_loss=True)
    with progress.stage("perplexity"):
        ppl_fp = perplexity(lm.model, ids, count=windows)
        ppl_q = perplexity(qref, ids, count=windows)
    n = min(len(ids) // 512, windows or 10**9)
    return {"recipe": lm.recipe.name, "scheme": qm.scheme.name, "text": str(text), "tokens": n * 512,
            "windows": n, "ppl_fp": round(ppl_fp, 4), "ppl_int4": round(ppl_q, 4),
            "loss_pct": round(100 * (ppl_q / ppl_fp - 1), 3)}


def default_out(recipe: str, target: str) -> Path:
    return Path("dist") / f"{recipe}-{target}"


def export(target: str, recipe: str, checkpoint=None, out: str | Path | None = None, force: bool = False,
           allow_quality_loss: bool = False, progress: Progress | None = None, **options) -> Path:
    """Load, quantize (with the quality gate), build the target's bundle, verify, finalize."""
    from targets import get_target
    from targets.base import ExportContext
    from .bundle import Staging, tool_versions

    progress = progress or Progress(quiet=True)
    rec = get_recipe(recipe)
    rec.require_target(target)
    backend = get_target(target)
    if rec.is_vision and not backend.allows_vision:
        raise ExportError(f"target '{target}' is text only: it cannot export vision recipe '{rec.name}'")
    out = Path(out) if out else default_out(rec.name, target)
    with Staging(out, force) as staging:
        with progress.stage("load"):
            lm = load(rec, checkpoint, prefix="llm." if rec.is_vision else "")
            progress.log(f"{lm.checkpoint.path}: {sum(t.numel() for t in lm.state.values()) / 1e6:.1f}M "
                         f"text parameters")
        qm, qref, report = quantize(lm, progress=progress, allow_quality_loss=allow_quality_loss)
        ctx = ExportContext(recipe=rec, config=lm.config, checkpoint=lm.checkpoint,
                            tokenizer_path=lm.checkpoint.tokenizer_path, reference=lm.model,
                            quantized=qm, quant_reference=qref,
                            quality=report.to_dict() if report else {}, progress=progress,
                            options=options)
        extra = backend.build(ctx, staging.dir)
        manifest = {
            "mcpm_export_version": tool_versions()["mcpm_export"], "recipe": rec.name, "target": target,
            "model": {"repo_id": rec.repo_id, "family": rec.family, "config": lm.config.to_dict(),
                      "context_window": rec.context_window, "prefill_chunk": rec.prefill_chunk},
            "quantization": {"scheme": qm.scheme.name, "description": qm.scheme.description,
                             "group_size": 32},
            "quality": ctx.quality,
            "source": {"checkpoint_fingerprint": lm.checkpoint.fingerprint(), "repo_id": rec.repo_id},
            "versions": tool_versions(), **extra,
        }
        with progress.stage("finalize"):
            return staging.finalize(manifest)
