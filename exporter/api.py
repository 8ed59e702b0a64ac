"""The Python API the CLI is a thin layer over."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from .checkpoint import Checkpoint, open_checkpoint, resolve_checkpoint
from .config import MiniCPMConfig
from .errors import ExportError
from .model import MiniCPM, check_generation
from .progress import Progress
from .quality import CALIBRATION_TEXT, WINDOW, QualityReport, gate, implausible, perplexity
from .quant import SCHEMES, QuantizedModel, Scheme
from .quantizers import QUANTIZERS
from .recipes import Recipe, get_recipe
from .streaming import quantize_streaming
from .tokenizer import Tokenizer, read_text_file

if TYPE_CHECKING:
    from targets.base import ExportPlan, Target


@dataclass
class LoadedModel:
    recipe: Recipe
    checkpoint: Checkpoint
    config: MiniCPMConfig
    state: dict[str, torch.Tensor]
    model: MiniCPM
    tokenizer: Tokenizer


def open_model(recipe: Recipe, checkpoint: str | Path | None = None) -> tuple[Checkpoint, MiniCPMConfig, Tokenizer]:
    """Resolve and validate a checkpoint, its text config and tokenizer; no tensor data is read."""
    ckpt = open_checkpoint(resolve_checkpoint(recipe, checkpoint), recipe)
    raw = ckpt.raw_config.get("llm_config", ckpt.raw_config) if recipe.is_vision else ckpt.raw_config
    config = MiniCPMConfig.from_hf(raw, str(ckpt.path / "config.json"))
    tok = Tokenizer(ckpt.tokenizer_path)
    if tok.vocab_size > config.vocab_size:
        raise ExportError(f"{ckpt.tokenizer_path}: tokenizer has {tok.vocab_size} pieces, "
                          f"config.json vocab_size is {config.vocab_size}")
    return ckpt, config, tok


def load(recipe: str | Recipe, checkpoint: str | Path | None = None, prefix: str = "") -> LoadedModel:
    """Everything in memory (small models, generate/eval, tests)."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    ckpt, config, tok = open_model(recipe, checkpoint)
    state = ckpt.text_tensors(config, prefix=prefix)
    return LoadedModel(recipe, ckpt, config, state, MiniCPM.from_state_dict(config, state), tok)


def quantize_source(recipe: Recipe, config: MiniCPMConfig, tokenizer: Tokenizer, get, names: list[str],
                    scheme: "str | Scheme | None" = None, progress: Progress | None = None,
                    allow_quality_loss: bool = False, quantizer: str | None = None,
                    codecs: Mapping[str, object] | None = None) -> tuple[QuantizedModel, QualityReport | None]:
    """Stream the tensors (``get(canonical name)``) through calibration, quantization and the gate.
    ``scheme`` / ``quantizer`` default to the recipe's; ``codecs`` (a target's own encoders for tensors
    the scheme keeps float16) are applied before the gate, which measures the result."""
    progress = progress or Progress(quiet=True)
    sch = scheme if isinstance(scheme, Scheme) else SCHEMES[scheme or recipe.quantization]
    method = QUANTIZERS[quantizer or recipe.quantizer]
    calib = tokenizer.encode(CALIBRATION_TEXT.read_text())
    gate_windows = recipe.gate_windows if sch.linear_bits is not None else 0
    with progress.stage(f"calibrate + quantize ({sch.name}, {method.name})"):
        qm, q = quantize_streaming(config, get, names, sch, method, calib, recipe.calibration_windows,
                                   gate_windows, codecs=codecs or {})
        progress.log(f"{sch.name}: {qm.nbytes / 1e6:.1f} MB of weights")
    if q is None:
        return qm, None
    report = QualityReport(ppl_fp=q["ppl_fp"], ppl_int4=q["ppl_int4"], tokens=q["tokens"],
                           windows=gate_windows, threshold_pct=recipe.max_ppl_loss_pct,
                           text=f"{CALIBRATION_TEXT.name} (windows {recipe.calibration_windows}+)")
    progress.log(f"quality gate: perplexity fp {report.ppl_fp:.3f} -> {sch.name} {report.ppl_int4:.3f} "
                 f"({report.loss_pct:+.2f}%, limit {report.threshold_pct}%)")
    warning = implausible(report)
    if warning:
        progress.log(warning)
    gate(report, allow_quality_loss)
    return qm, report


def quantize(lm: LoadedModel, scheme: "str | Scheme | None" = None, progress: Progress | None = None,
             allow_quality_loss: bool = False, quantizer: str | None = None,
             codecs: Mapping[str, object] | None = None) -> tuple[QuantizedModel, MiniCPM, QualityReport | None]:
    """Quantize an in-memory model: (quantized weights, int4 reference model, gate report)."""
    qm, report = quantize_source(lm.recipe, lm.config, lm.tokenizer, lm.state.__getitem__, list(lm.state),
                                 scheme, progress, allow_quality_loss, quantizer, codecs)
    return qm, MiniCPM.from_state_dict(lm.config, qm.dequantized()), report


def generate(recipe: str, prompt: str, max_new_tokens: int = 32, checkpoint=None,
             quant: str | None = None) -> dict:
    check_generation(max_new_tokens)
    lm = load(recipe, checkpoint)
    ids = lm.tokenizer.encode(prompt, what="--prompt")
    check_generation(max_new_tokens, len(ids), lm.recipe.context_window)
    model = lm.model
    if quant:
        _, model, _ = quantize(lm, quant if quant in SCHEMES else lm.recipe.quantization)
    t0 = time.perf_counter()
    out, _ = model.generate(ids, max_new_tokens, eos_id=lm.config.eos_token_id)
    dt = time.perf_counter() - t0
    return {"prompt_tokens": ids, "tokens": out, "text": lm.tokenizer.decode(out),
            "seconds": round(dt, 3)}


def evaluate(recipe: str, text_file: Path, checkpoint=None, windows: int | None = 40,
             progress: Progress | None = None, scheme: str | None = None,
             quantizer: str | None = None, target: str | None = None) -> dict:
    """Perplexity of the fp and the quantized model on a text. ``target``: quantize as that target's
    plan (default options) does, i.e. the weights its bundle ships (exclusive with scheme)."""
    codecs = None
    if target is not None:
        if scheme is not None:
            raise ExportError("--scheme and --target: give one (the target's plan names its scheme)")
        q = check_export(target, recipe)[1].quantization
        scheme, quantizer, codecs = q.scheme, quantizer or q.quantizer, dict(q.codecs)
    text = Path(text_file)
    content = read_text_file(text, "--text")
    lm = load(recipe, checkpoint)
    ids = lm.tokenizer.encode(content, what=f"--text {text}")
    if len(ids) < WINDOW:
        raise ExportError(f"--text {text}: too short for perplexity ({len(ids)} tokens < one "
                          f"{WINDOW}-token window)")
    progress = progress or Progress(quiet=True)
    qm, qref, _ = quantize(lm, scheme, progress, True, quantizer, codecs)
    with progress.stage("perplexity"):
        ppl_fp = perplexity(lm.model, ids, count=windows)
        ppl_q = perplexity(qref, ids, count=windows)
    n = min(len(ids) // 512, windows or 10**9)
    return {"recipe": lm.recipe.name, "scheme": qm.scheme.name, "quantizer": qm.quantizer, "text": str(text),
            "tokens": n * 512, "windows": n, "ppl_fp": round(ppl_fp, 4), "ppl_int4": round(ppl_q, 4),
            "loss_pct": round(100 * (ppl_q / ppl_fp - 1), 3)}


def default_out(recipe: str, target: str) -> Path:
    return Path("dist") / f"{recipe}-{target}"


def _resolve(target: str, recipe: str, options) -> tuple[Recipe, "Target", "ExportPlan"]:
    from targets import get_target

    rec = get_recipe(recipe)
    rec.require_target(target)
    backend = get_target(target)
    if options is None:
        options = backend.Options()
    elif not isinstance(options, backend.Options):
        raise ExportError(f"{target}: options must be {backend.Options.__name__}, "
                          f"got {type(options).__name__}")
    return rec, backend, backend.plan(rec, options)


def check_export(target: str, recipe: str, options=None) -> tuple[Recipe, "ExportPlan"]:
    """Everything about an export that is cheap to check (no checkpoint, no --out): the recipe, the
    target/recipe pairing, the target's typed options; returns the recipe and the target's plan."""
    rec, _, plan = _resolve(target, recipe, options)
    return rec, plan


# Shipped weights of earlier exports in one run (release): (checkpoint, fingerprint, recipe,
# plan.quantization, allow_quality_loss) -> (QuantizedModel, QualityReport | None)
QuantizedCache = dict


def export(target: str, recipe: str, checkpoint=None, out: str | Path | None = None, force: bool = False,
           allow_quality_loss: bool = False, progress: Progress | None = None, options=None,
           reuse: QuantizedCache | None = None) -> Path:
    """Plan (the target's, from its typed ``options``), open the checkpoint once, quantize as the plan
    says (or take the same quantization from ``reuse``), gate, build the target's bundle, write the
    manifest, finalize."""
    from targets.base import ExportContext, merge_manifest
    from .bundle import Staging, tool_versions

    progress = progress or Progress(quiet=True)
    rec, backend, plan = _resolve(target, recipe, options)
    out = Path(out) if out else default_out(rec.name, target)
    with Staging(out, force) as staging:     # --out: writable, locked, stale staging removed
        with progress.stage("load"):
            ckpt, config, tok = open_model(rec, checkpoint)
            prefix = "llm." if rec.is_vision else ""
            tensors = ckpt.text_plan(config, prefix)
            progress.log(f"{ckpt.path}: {len(tensors)} text tensors, {config.num_hidden_layers} layers")
        key = (str(ckpt.path), ckpt.fingerprint(), rec.name, plan.quantization, allow_quality_loss)
        if reuse is not None and key in reuse:
            qm, report = reuse[key]
            progress.log(f"{qm.scheme.name} ({qm.quantizer}): the weights quantized and gated for an "
                         f"earlier target of this run")
        else:
            q = plan.quantization
            qm, report = quantize_source(rec, config, tok, ckpt.getter(tensors), list(tensors), q.scheme,
                                         progress, allow_quality_loss, q.quantizer, dict(q.codecs))
            if reuse is not None:
                reuse[key] = qm, report
        ctx = ExportContext(recipe=rec, config=config, checkpoint=ckpt, tokenizer_path=ckpt.tokenizer_path,
                            plan=plan, quantized=qm, progress=progress)
        extra = backend.build(ctx, staging.dir)
        manifest = merge_manifest({
            "mcpm_export_version": tool_versions()["mcpm_export"], "recipe": rec.name, "target": target,
            "model": {"repo_id": rec.repo_id, "family": rec.family, "config": config.to_dict(),
                      "context_window": rec.context_window, "prefill_chunk": rec.prefill_chunk},
            "quantization": plan.quantization.manifest(qm.quantizer),
            "quality": report.to_dict() if report else {},
            "source": {"checkpoint_fingerprint": ckpt.fingerprint(), "repo_id": rec.repo_id},
            "versions": tool_versions(),
        }, extra, target)
        with progress.stage("finalize"):
            return staging.finalize(manifest)
