"""Speed of the adb plumbing through the fake handset (real adb client + server, loopback TCP).

    python3 bench/adb_fake_handset.py [--mb 16] [--shells 20]

Measures: `adb push` / `adb pull` throughput of one file, `adb shell true` round-trip latency, and the
time of a sha256-gated re-sync that has nothing to push. These bound the harness's own overhead; they
say nothing about a real phone's USB link.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_tests.fake_handset import FakeHandset  # noqa: E402
from device_tests.testing import AdbServer  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=16)
    ap.add_argument("--shells", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = AdbServer(tmp)
        server.run("start-server")
        handset = FakeHandset(root=tmp / "root").start()
        try:
            serial = server.connect(handset)
            blob = tmp / "blob.bin"
            blob.write_bytes(os.urandom(args.mb << 20))

            def check(*a):
                p = server.run("-s", serial, *a, timeout=600)
                assert p.returncode == 0, p.stdout + p.stderr

            push = timed(lambda: check("push", str(blob), "/data/local/tmp/blob.bin"))
            pull = timed(lambda: check("pull", "/data/local/tmp/blob.bin", str(tmp / "back.bin")))
            lat = [timed(lambda: check("shell", "true")) for _ in range(args.shells)]
            sha = timed(lambda: check("shell", "cd /data/local/tmp && find . -type f -exec sha256sum {} +"))
            print(f"push {args.mb} MiB: {args.mb / push:.1f} MiB/s ({push:.2f} s)")
            print(f"pull {args.mb} MiB: {args.mb / pull:.1f} MiB/s ({pull:.2f} s)")
            print(f"adb shell true: median {statistics.median(lat) * 1000:.0f} ms, "
                  f"max {max(lat) * 1000:.0f} ms over {args.shells}")
            print(f"sha256 listing of the pushed file: {sha * 1000:.0f} ms")
        finally:
            handset.stop()
            server.run("kill-server")


if __name__ == "__main__":
    main()
