#!/usr/bin/env bash
# CI release recipe: check the toolchain, build release archives of `tiny` for every target into a
# temporary directory, verify each archive, and print their sha256. Called from .ci/run after the tests.
#
#   .ci/release.sh [OUT_DIR]      (default: a fresh temporary directory, removed on exit)
#
# Exit status is non-zero when the toolchain is incomplete, a build fails its own verification
# (quality gate, numerics vs the PyTorch reference), or an archive does not verify.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ $# -ge 1 ]; then
    OUT=$1
else
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/mcpm-release.XXXXXX")
    trap 'rm -rf "$OUT"' EXIT
fi

echo "== doctor"
$PY -m exporter.cli doctor

echo "== release tiny (all targets) -> $OUT"
$PY -m exporter.cli release --model tiny --target all --out "$OUT" --force

echo "== verify"
status=0
for archive in "$OUT"/mcpm-*.tar.gz; do
    $PY -m exporter.cli verify "$archive" || status=1
done
(cd "$OUT" && sha256sum mcpm-*.tar.gz)
exit $status
