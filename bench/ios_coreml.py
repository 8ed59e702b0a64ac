"""iOS / Core ML package figures: size and quality on a recipe (default tiny), size at MiniCPM-2B width.

    python3 bench/ios_coreml.py [--model tiny] [--eval-text FILE] [--windows 12]
    python3 bench/ios_coreml.py --width-2b 1 2 [--embeddings lut6 int8]

Default mode: builds the package the `ios` target builds (GPTQ pre-rounding, int4 per-block 32 linears)
with each embedding/head representation (lut6 = 6-bit palettized, int8, int4) and reports weight.bin
bytes per parameter, perplexity of the weights the package holds (calibration gate windows and an
evaluation text) and the build times. Linux cannot run Core ML, so there are no speed figures:
perplexities use the package's decompressed weights in the PyTorch model.

--width-2b N...: real conversions of random-weight models with MiniCPM-2B's widths (hidden 2304,
inter 5760, vocab 122753, tied; bench/make_2b_checkpoint.py) and N layers, weight.bin bytes only, then
the straight line through the measurements extrapolated to 40 layers. Results: bench/RESULTS.md, iOS.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.make_2b_checkpoint import CONFIG_2B  # noqa: E402
from exporter import api  # noqa: E402
from exporter.config import MiniCPMConfig  # noqa: E402
from exporter.model import MiniCPM  # noqa: E402
from exporter.quality import CALIBRATION_TEXT, perplexity  # noqa: E402
from targets.coreml.convert import build_mlpackage, weight_file  # noqa: E402
from targets.coreml.mil_interp import Interpreter  # noqa: E402
from targets.coreml.prequant import input_covariance, prequantize_state_dict  # noqa: E402
from targets.coreml.verify import package_state_dict  # noqa: E402
from targets.coreml.wrapper import CoreMLMiniCPM  # noqa: E402


def build(model: MiniCPM, context: int, chunk: int, embedding: str, pkg: Path) -> float:
    t = time.perf_counter()
    wrapper = CoreMLMiniCPM(model, context, row_scaled_embedding=embedding == "lut6").eval()
    build_mlpackage(wrapper, chunk, pkg, embedding)
    return time.perf_counter() - t


def quality(args) -> None:
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
    runs = [("plain Core ML rounding", lm.model, "int8")]
    runs += [("GPTQ pre-rounding", prequant, e) for e in args.embeddings]
    for label, source, embedding in runs:
        with tempfile.TemporaryDirectory() as tmp:
            pkg = Path(tmp) / "m.mlpackage"
            t_build = build(source, rec.context_window, rec.prefill_chunk, embedding, pkg)
            size = weight_file(pkg).stat().st_size
            held = MiniCPM.from_state_dict(cfg, package_state_dict(Interpreter.from_package(pkg),
                                                                   list(lm.state)))
            rows.append((f"{label}, embedding {embedding}", f"{size / 1e6:.2f} MB",
                         f"{size / params:.3f}", ppl(held)))
            print(f"built {label} {embedding} in {t_build:.0f} s", file=sys.stderr)
    print(f"{args.model}: {params / 1e6:.2f}M parameters; GPTQ pre-rounding {t_prequant:.1f} s; "
          f"perplexity on calibration gate windows ({rec.gate_windows} x 512) / "
          f"{Path(args.eval_text).name} ({args.windows} x 512)\n")
    print("| weights | weight.bin | bytes/param | ppl gate | ppl eval |")
    print("|---|---|---|---|---|")
    for name, size, bpp, (g, e) in rows:
        dg, de = 100 * (g / fp[0] - 1), 100 * (e / fp[1] - 1)
        print(f"| {name} | {size} | {bpp} | {g:.3f} ({dg:+.2f}%) | {e:.3f} ({de:+.2f}%) |")


def width_2b(args) -> None:
    torch.manual_seed(0)
    results = {}
    for layers in args.width_2b:
        cfg = MiniCPMConfig.from_hf({**CONFIG_2B, "num_hidden_layers": layers})
        with torch.no_grad():
            model = MiniCPM(cfg).eval()
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.02)
        params = sum(p.numel() for p in model.parameters())
        for embedding in args.embeddings:
            with tempfile.TemporaryDirectory() as tmp:
                pkg = Path(tmp) / "m.mlpackage"
                seconds = build(model, 2048, 128, embedding, pkg)
                size = weight_file(pkg).stat().st_size
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            results[(layers, embedding)] = (params, size)
            print(json.dumps({"layers": layers, "embedding": embedding, "parameters": params,
                              "weight_bin": size, "bytes_per_param": round(size / params, 4),
                              "build_s": round(seconds, 1), "peak_rss_gb": round(rss, 2)}), flush=True)
        del model
    if len(args.width_2b) < 2:
        return
    a, b = sorted(args.width_2b)[:2]
    for embedding in args.embeddings:
        (pa, sa), (pb, sb) = results[(a, embedding)], results[(b, embedding)]
        per_layer_b, per_layer_p = (sb - sa) / (b - a), (pb - pa) / (b - a)
        size40, params40 = sa + (40 - a) * per_layer_b, pa + (40 - a) * per_layer_p
        print(f"{embedding}: weight.bin = {sa - a * per_layer_b:.0f} + {per_layer_b:.0f} x layers; "
              f"40 layers: {size40 / 1e9:.4f} GB / {params40 / 1e9:.4f} G params = "
              f"{size40 / params40:.4f} bytes/param")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--eval-text", default="/work/shared/eval/python-tutorial.txt")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--embeddings", nargs="+", default=None, choices=["lut6", "int8", "int4"])
    ap.add_argument("--width-2b", nargs="+", type=int, metavar="LAYERS")
    args = ap.parse_args()
    if args.width_2b:
        args.embeddings = args.embeddings or ["lut6", "int8"]
        width_2b(args)
    else:
        args.embeddings = args.embeddings or ["lut6", "int8", "int4"]
        quality(args)


if __name__ == "__main__":
    main()
