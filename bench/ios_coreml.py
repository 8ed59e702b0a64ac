"""iOS / Core ML package figures for a recipe (default tiny): size, quality, conversion time.

    python3 bench/ios_coreml.py [--model tiny] [--eval-text FILE] [--windows 12]

Builds the package the `ios` target builds (GPTQ pre-rounding, int4 per-block 32 linears) once with
an int8 and once with an int4 embedding/head, and reports weight.bin bytes per parameter, perplexity
of the weights the package holds (calibration gate windows and an evaluation text) and the times of
each stage. Results go in bench/RESULTS.md under "iOS (issue 5)". Linux cannot run Core ML, so there
are no speed figures here: perplexities use the package's decompressed weights in the PyTorch model.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter import api  # noqa: E402
from exporter.model import MiniCPM  # noqa: E402
from exporter.quality import CALIBRATION_TEXT, perplexity  # noqa: E402
from targets.coreml.convert import build_mlpackage, weight_file  # noqa: E402
from targets.coreml.mil_interp import Interpreter  # noqa: E402
from targets.coreml.prequant import input_covariance, prequantize_state_dict  # noqa: E402
from targets.coreml.verify import package_state_dict  # noqa: E402
from targets.coreml.wrapper import CoreMLMiniCPM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--eval-text", default="/work/shared/eval/python-tutorial.txt")
    ap.add_argument("--windows", type=int, default=12)
    args = ap.parse_args()

    lm = api.load(args.model)
    rec, cfg = lm.recipe, lm.config
    params = sum(p.numel() for p in lm.model.parameters())
    calib = lm.tokenizer.encode(CALIBRATION_TEXT.read_text())
    gate = calib[512 * rec.calibration_windows:]
    evalt = lm.tokenizer.encode(Path(args.eval_text).read_text())

    def ppl(model):
        return (perplexity(model, gate, count=rec.gate_windows),
                perplexity(model, evalt, count=args.windows))

    t = time.perf_counter()
    cov = input_covariance(lm.model, calib, rec.calibration_windows)
    prequant = MiniCPM.from_state_dict(cfg, prequantize_state_dict(lm.model.state_dict(), cov))
    t_prequant = time.perf_counter() - t
    fp = ppl(lm.model)
    rows = [("fp32 reference", "-", "-", fp)]
    for label, source in (("plain Core ML rounding", lm.model), ("GPTQ pre-rounding", prequant)):
        for bits in (8, 4):
            if label.startswith("plain") and bits == 4:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                pkg = Path(tmp) / "m.mlpackage"
                t = time.perf_counter()
                build_mlpackage(CoreMLMiniCPM(source, rec.context_window).eval(), rec.prefill_chunk, pkg, bits)
                t_build = time.perf_counter() - t
                size = weight_file(pkg).stat().st_size
                held = MiniCPM.from_state_dict(cfg, package_state_dict(Interpreter.from_package(pkg),
                                                                       list(lm.state)))
                rows.append((f"{label}, embedding int{bits}", f"{size / 1e6:.2f} MB",
                             f"{size / params:.3f}", ppl(held)))
                print(f"built {label} int{bits} in {t_build:.0f} s", file=sys.stderr)
    print(f"{args.model}: {params / 1e6:.2f}M parameters; GPTQ pre-rounding {t_prequant:.1f} s; "
          f"perplexity on calibration gate windows ({rec.gate_windows} x 512) / "
          f"{Path(args.eval_text).name} ({args.windows} x 512)\n")
    print("| weights | weight.bin | bytes/param | ppl gate | ppl eval |")
    print("|---|---|---|---|---|")
    for name, size, bpp, (g, e) in rows:
        dg, de = 100 * (g / fp[0] - 1), 100 * (e / fp[1] - 1)
        print(f"| {name} | {size} | {bpp} | {g:.3f} ({dg:+.2f}%) | {e:.3f} ({de:+.2f}%) |")


if __name__ == "__main__":
    main()
