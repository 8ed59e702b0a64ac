"""Peak memory and time of quantizing a MiniCPM-2B-shaped checkpoint (issue 2 target: <= 6 GB, <= 10 min).

    python bench/quantize_2b.py [--checkpoint DIR] [--layers N] [--json]

Runs the same streaming path `mcpm-export android --model sft-int4` uses (calibration, the recipe's
quantizer (`--quantizer` to override), 8-bit embedding, quality gate) on random bf16 weights of the
real 2B shapes.
Peak RSS is the process's ru_maxrss; the checkpoint is written first (bench/make_2b_checkpoint.py).
``--layers N`` quantizes only the first N decoder layers (a slice to extrapolate from); ``cpu_seconds``
(all threads) is less sensitive than wall time to a shared machine's load.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.make_2b_checkpoint import DEFAULT_OUT, make_checkpoint  # noqa: E402
from exporter import api  # noqa: E402
from exporter.progress import Progress  # noqa: E402
from exporter.recipes import get_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--recipe", default="sft-int4")
    ap.add_argument("--quantizer", default=None, help="default: the recipe's (exporter/quantizers.py)")
    ap.add_argument("--layers", type=int, default=None, help="only the first N decoder layers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    make_checkpoint(args.checkpoint)
    rec = get_recipe(args.recipe)
    progress = Progress(quiet=args.json)
    t0, c0 = time.perf_counter(), time.process_time()
    ckpt, config, tok = api.open_model(rec, args.checkpoint)
    plan = ckpt.text_plan(config)
    if args.layers is not None:
        config = dataclasses.replace(config, num_hidden_layers=args.layers)
        plan = {k: v for k, v in plan.items() if not k.startswith("layers.") or int(k.split(".")[1]) < args.layers}
    qm, report = api.quantize_source(rec, config, tok, ckpt.getter(plan), list(plan), progress=progress,
                                     allow_quality_loss=True, quantizer=args.quantizer)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    params = sum(int(v.shape[0]) * int(v.shape[1]) if hasattr(v, "bits") else int(v.size) for v in qm.tensors.values())
    res = {"recipe": rec.name, "scheme": qm.scheme.name, "quantizer": qm.quantizer, "params": params,
           "layers": config.num_hidden_layers,
           "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "quantized_gb": round(qm.nbytes / 1e9, 3), "bytes_per_param": round(qm.nbytes / params, 3),
           "quality": report.to_dict() if report else None, "threads": os.cpu_count(),
           "load_avg_1m": round(os.getloadavg()[0], 1)}
    print(json.dumps(res, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
