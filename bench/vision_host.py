"""Vision encode time per slice on this machine: PyTorch reference vs onnxruntime vs TVM host build.

Random weights at MiniCPM-V 2.0's real widths (SigLIP so400m 1152/16 heads/4304, resampler 2304)
but only --depth ViT blocks (default 1): the per-block cost is measured and the 26-block encoder
extrapolated. One 448x448 slice = 32x32 = 1024 tokens.

    python bench/vision_host.py [--depth 1] [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter.vision import preprocess as pp  # noqa: E402
from exporter.vision.config import VisionConfig  # noqa: E402
from exporter.vision.model import MiniCPMVVision, VisionEncoder  # noqa: E402
from targets.tvm_vision import VisionRunner, compile_vision, export_ir, synthetic_image  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = VisionConfig(version=2, width=1152, depth=a.depth, heads=16, mlp=4304, patch=14, pos_grid=27, hidden=2304)
    vision = MiniCPMVVision(cfg).eval()
    with torch.no_grad():
        for p in vision.parameters():
            p.normal_(0, 0.02)
    img = synthetic_image(448, 448)
    inp = pp.encoder_inputs(img, cfg)
    targs = [torch.from_numpy(inp[k]) for k in pp.INPUT_NAMES]
    enc = VisionEncoder(vision)
    print(f"| runtime | {a.depth} block(s), 1024 tokens (s) | 26 blocks extrapolated (s) |")
    print("|---|---|---|", flush=True)

    def row(name, seconds):
        print(f"| {name} | {seconds:.2f} | {seconds / a.depth * 26:.1f} |", flush=True)

    with torch.no_grad():
        row("PyTorch fp32 (2 threads)", timed(lambda: enc(*targs), a.repeat))
    from exporter.vision.onnx_ref import OnnxVision, export_onnx
    with tempfile.TemporaryDirectory() as d:
        sess = OnnxVision(export_onnx(vision, Path(d) / "v.onnx"), cfg)
        row("onnxruntime CPU (2 threads)", timed(lambda: sess.embed_one(img), a.repeat))
    from targets.tvm import pipeline
    t0 = time.perf_counter()
    mod, params = export_ir(vision)
    ex = compile_vision(mod, pipeline.make_target("cpu", pipeline.HOST_TARGET))
    compile_s = time.perf_counter() - t0
    runner = VisionRunner(ex, [p for _, p in params], cfg)
    row("TVM host build (targets/tvm/vision_schedule.py)", timed(lambda: runner.embed_one(img), a.repeat))
    print(f"\nTVM import + compile of the vision graph: {compile_s:.1f} s")


if __name__ == "__main__":
    main()
