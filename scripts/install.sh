#!/usr/bin/env bash
# Install everything mcpm-export needs on a fresh Debian machine: the cross toolchain, adb and qemu for
# the on-device runner and its tests (apt, when root), then the package itself (pip, pinned versions:
# torch 2.13.0 CPU, apache-tvm 0.27.0.post1 + apache-tvm-ffi 0.1.14.post0, coremltools 9.0, numpy<2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES="adb qemu-user-static g++-aarch64-linux-gnu clang lld"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=$(for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
else
  echo "note: not root or no apt-get; install these yourself for the runner and device tests: $APT_PACKAGES" >&2
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# The on-device runner is cross-built from PyPI's aarch64 TVM wheels: fetch them now, so that exports
# never touch the network (a no-op when the cache already holds them; `mcpm-export doctor` checks it).
python3 -m runner.build --fetch-wheels
