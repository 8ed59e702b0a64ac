"""Runner build cost and size, plus mcpm-run under qemu-aarch64 on a bundle (EMULATED timings).

    python3 bench/runner_build.py [--bundle DIR] [--prompt-len 64] [--gen-len 32]

Cold = a forced rebuild (wheels already downloaded); cached = the key lookup alone.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from runner.build import build_runner


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    args = ap.parse_args()
    quiet = lambda msg: None  # noqa: E731
    t0 = time.perf_counter()
    out = build_runner(force=True, say=quiet)
    t1 = time.perf_counter()
    build_runner(say=quiet)
    t2 = time.perf_counter()
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    print(f"cold build {t1 - t0:.1f} s, cached {1000 * (t2 - t1):.0f} ms, total size "
          f"{sum(sizes.values()) / 2**20:.1f} MiB")
    for rel, size in sizes.items():
        print(f"  {rel:28s} {size / 1024:8.0f} KiB")
    if args.bundle:
        for threads in (1, 2):
            proc = subprocess.run(["qemu-aarch64-static", str(out / "mcpm-run"), "--bundle", str(args.bundle),
                                   "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
                                   "--threads", str(threads)], capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout)
            print(f"qemu threads={threads}: load {r['load_ms']:.0f} ms, ttft {r['ttft_ms']:.0f} ms, "
                  f"prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.1f} tok/s, "
                  f"peak RSS {r['peak_rss_kb'] / 1024:.1f} MiB (EMULATED)")


if __name__ == "__main__":
    main()
