"""The int4 decode kernels alone, streaming a MiniCPM-2B-shaped model's weights from DRAM (issue 3).

    python3 bench/kernel_stream.py [--threads 1,2] [--reps 5] [--attention-depth 1024] [--json]

Compiles targets/tvm/microkernels/q4_matmul.c for this CPU (as the host build does, -march=native) with
the driver bench/kernel_stream.c, then per thread count: the best of --reps decode steps' GEMVs (1.53 GB
of int4 weights + fp16 scales, every matrix in its own memory) against a plain streaming read of as many
bytes with the same threads; and the decode attention of one token over the 40 layers' fp16 KV caches at
--attention-depth keys (0: skip). Tells how close the kernels get to the memory system, apart from the
rest of the model (bench/decode_host.py measures the whole model).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(tmp: Path) -> Path:
    exe = tmp / "kernel_stream"
    subprocess.run(["clang", "-O3", "-march=native", "-fno-math-errno", str(ROOT / "bench" / "kernel_stream.c"),
                    str(ROOT / "targets" / "tvm" / "microkernels" / "q4_matmul.c"), "-o", str(exe), "-lpthread", "-lm"],
                   check=True)
    return exe


def read_bandwidth(threads: int, reps: int = 9, mib: int = 1024) -> dict:
    """STREAM-like read of `mib` MiB with `threads` threads, `reps` times (the first pages the buffer in
    and is dropped): {"best", "median", "min", "runs"} in GB/s."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([str(build(Path(tmp))), str(threads), str(reps + 1), "read", str(mib)], check=True,
                             capture_output=True, text=True).stdout
    runs = json.loads(out)["read_gb_s"][1:]
    srt = sorted(runs)
    return {"best": srt[-1], "median": srt[len(srt) // 2], "min": srt[0], "runs": runs, "mib": mib}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--attention-depth", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        run = lambda *a: json.loads(subprocess.run([str(exe), *a], check=True, capture_output=True,  # noqa: E731
                                                   text=True).stdout)
        rows = [run(t, str(args.reps)) for t in args.threads.split(",")]
        if args.attention_depth:
            for r in rows:
                r["attention"] = run(str(r["threads"]), str(args.reps), "attn", str(args.attention_depth))
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['threads']} thread(s): GEMVs {r['gemv_gb_s']:.1f} GB/s ({r['gemv_tok_s']:.1f} tok/s of GEMVs), "
                  f"plain read {r['read_gb_s']:.1f} GB/s -> {r['gemv_pct_of_read']:.0f}%")
            if "attention" in r:
                a = r["attention"]
                print(f"  decode attention at depth {a['depth']}: {a['attn_s'] * 1e3:.2f} ms per token, "
                      f"{a['attn_gb_s']:.1f} GB/s of fp16 KV")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
