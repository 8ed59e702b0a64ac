"""Running `mcpm-export` as a real process, and what every bad-input test asserts about it."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def cli(*args, timeout=900, **kw):
    return subprocess.run([sys.executable, "-m", "exporter.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


def one_error_line(r, *needles, status=1):
    """Exit status ``status``, no traceback, the last stderr line is ``error: ...`` holding every needle."""
    assert r.returncode == status, (r.stdout, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in lines[-1], lines[-1]


def nothing_partial(parent: Path):
    """No staging folder, moved-aside bundle or output lock left beside an --out in ``parent``."""
    left = [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".lock")]
    assert not left, left
