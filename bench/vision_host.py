"""Vision encode time per slice on this machine: PyTorch reference vs onnxruntime vs TVM host build.

Random weights at MiniCPM-V 2.0's real widths (SigLIP so400m 1152/16 heads/4304, resampler 2304)
but only --depth ViT blocks (default 1): the per-block cost is measured and the 26-block encoder
extrapolated. One 448x448 slice = 32x32 = 1024 tokens.

    python bench/vision_host.py [--depth 1] [--repeat 3] [--skip-onnx]

TVM rows: fp32 weights (the bundle's host target x86-64-v3) and q8 weights (targets/tvm/vision_q8.py) for
this machine's CPU (AVX-512 VNNI here) and for x86-64-v3 (no VNNI: the AVX2 tile). Also printed:
q8 parity (vs PyTorch on the dequantized weights and vs fp32) and the vision weight bytes of the full
26-block so400m + resampler, fp32 vs q8 (one block's bytes times 26).
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
from targets.tvm.runner import VisionRunner  # noqa: E402
from targets.tvm.vision import compile_vision, export_ir, synthetic_image  # noqa: E402


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
    ap.add_argument("--skip-onnx", action="store_true")
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
    if not a.skip_onnx:
        from exporter.vision.onnx_ref import OnnxVision, export_onnx
        with tempfile.TemporaryDirectory() as d:
            sess = OnnxVision(export_onnx(vision, Path(d) / "v.onnx"), cfg)
            row("onnxruntime CPU (2 threads)", timed(lambda: sess.embed_one(img), a.repeat))
    from targets.tvm import kernels, pipeline
    from targets.tvm.vision import dequantized_vision
    notes, outs = [], {}
    for weights, name, target in (
            ("fp32", "TVM fp32 weights, x86-64-v3 (targets/tvm/vision_schedule.py)", pipeline.HOST_TARGET),
            ("q8", f"TVM q8 weights, host CPU ({kernels.isa_of(kernels.host_target())} tile)", None),
            ("q8", "TVM q8 weights, x86-64-v3 (avx2 tile)", pipeline.HOST_TARGET)):
        t0 = time.perf_counter()
        mod, params = export_ir(vision, weights)
        tgt = kernels.host_target() if target is None else pipeline.make_target("cpu", target)
        ex = compile_vision(mod, tgt)
        with tempfile.TemporaryDirectory() as d:
            ex.export_library(str(Path(d) / "v.so"))      # q8: the microkernels are an external object
            runner = VisionRunner(Path(d) / "v.so", [p for _, p in params], cfg)
            notes.append(f"{name}: import + compile {time.perf_counter() - t0:.1f} s")
            row(name, timed(lambda: runner.embed_one(img), a.repeat))
            outs[(weights, target is None)] = (runner.embed_one(img), params)
    with torch.no_grad():
        ref = enc(*targs).numpy()
        got, params = outs[("q8", True)]
        deq = VisionEncoder(dequantized_vision(vision, params))(*targs).numpy()
    rel = lambda x, y: float(np.abs(x - y).max() / np.abs(y).max())  # noqa: E731
    print(f"\nq8 (host CPU) max rel err: vs PyTorch on dequantized q8 weights {rel(got, deq):.2e}, "
          f"vs fp32 weights {rel(got, ref):.2e}; fp32 TVM vs PyTorch {rel(outs[('fp32', False)][0], ref):.2e}")
    print("\n".join(notes))
    per_block = lambda ps: sum(p.nbytes for n, p in ps if n.startswith("vpm.blocks."))  # noqa: E731
    for weights in ("fp32", "q8"):
        ps = outs[(weights, weights == "q8")][1]
        total = sum(p.nbytes for _, p in ps) + per_block(ps) / a.depth * (26 - a.depth)
        print(f"vision weights, 26-block so400m + resampler, {weights}: {total / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
