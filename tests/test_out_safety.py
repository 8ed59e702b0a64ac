"""--out loses nothing (issue 12): the output lock between two real export processes, Ctrl-C (a real
SIGINT), SIGTERM and SIGKILL mid-export, --force replacing atomically and only a bundle, mount points, a
read-only filesystem and a full one (real tmpfs mounts; skipped where the machine cannot mount)."""
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from exporter.bundle import MANIFEST, Staging
from exporter.errors import ExportError
from targets.tvm.params import write_tensor_cache
from tests.support.cli import ROOT, cli, nothing_partial, one_error_line


@contextmanager
def tmpfs(path: Path, size: str = "1m", readonly: bool = False):
    """A real tmpfs at ``path`` (needs root / CAP_SYS_ADMIN, else the test is skipped)."""
    path.mkdir()
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def small_bundle(out: Path, text: str, force: bool = False) -> Path:
    with Staging(out, force) as st:
        (st.dir / "data.txt").write_text(text)
        return st.finalize({"recipe": text})


def start_export(out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "exporter.cli", "android", "--model", "tiny", "--out", str(out),
                             *map(str, extra)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"export ended before {path.name} appeared: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.1)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ------------------------------------------------------------------ 5 + 8 + SIGINT: real processes
def test_lock_sigint_and_sigkill_leave_nothing(tmp_path):
    out = tmp_path / "b"
    a = start_export(out)
    wait_for(tmp_path / f".b.partial-{a.pid}", a)
    # a second export to the same --out, while the first runs: refused at once, the first unharmed
    one_error_line(cli("android", "--model", "tiny", "--out", out, timeout=300), f"--out {out}",
                   f"another export (pid {a.pid}) is writing there")
    assert (tmp_path / f".b.partial-{a.pid}").is_dir() and a.poll() is None
    a.send_signal(signal.SIGINT)                       # Ctrl-C
    _, err = a.communicate(timeout=300)
    assert a.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: interrupted" and "Traceback" not in err
    assert not out.exists()
    nothing_partial(tmp_path)

    b = start_export(out)
    wait_for(tmp_path / f".b.partial-{b.pid}", b)
    b.terminate()                                      # SIGTERM (a CI job cancelled, a service stopped)
    _, err = b.communicate(timeout=300)
    assert b.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "error: terminated" and "Traceback" not in err
    assert not out.exists()
    nothing_partial(tmp_path)

    c = start_export(out)
    wait_for(tmp_path / f".b.partial-{c.pid}", c)
    c.kill()                                           # SIGKILL: no chance to clean up
    c.wait(timeout=60)
    assert (tmp_path / f".b.partial-{c.pid}").is_dir()
    # the next export to that --out removes what the killed one left (then fails cheaply here)
    one_error_line(cli("android", "--checkpoint", tmp_path / "nowhere", "--out", out, timeout=300), "--checkpoint")
    assert not out.exists()
    nothing_partial(tmp_path)


def test_lock_is_per_output_and_released(tmp_path):
    with Staging(tmp_path / "b") as st:
        with pytest.raises(ExportError, match=f"another export \\(pid {os.getpid()}\\)"):
            Staging(tmp_path / "b").__enter__()
        with Staging(tmp_path / "c") as other:      # another --out beside it is independent
            other.finalize({})
        st.finalize({})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]


# ------------------------------------------------------------------ 2: --force
def test_force_replaces_a_bundle_atomically_and_only_a_bundle(tmp_path):
    out = tmp_path / "b"
    small_bundle(out, "old")
    with pytest.raises(ExportError, match="not empty"):
        small_bundle(out, "new")
    small_bundle(out, "new", force=True)
    assert (out / "data.txt").read_text() == "new"
    nothing_partial(tmp_path)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    one_error_line(cli("android", "--out", mine, "--force", timeout=300), "holds files but no bundle", "--force")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    nothing_partial(tmp_path)


def test_bundle_moved_aside_by_a_killed_finalize_comes_back(tmp_path):
    """Killed between 'rename the old aside' and 'rename the new in': the next export puts it back."""
    out = tmp_path / "b"
    small_bundle(out, "old")
    os.replace(out, tmp_path / f".b.old-{dead_pid()}")
    os.mkdir(tmp_path / f".b.partial-{dead_pid()}")
    with pytest.raises(ExportError, match="not empty"):
        small_bundle(out, "new")
    assert (out / "data.txt").read_text() == "old" and (out / MANIFEST).is_file()
    nothing_partial(tmp_path)


def test_mount_point_and_read_only_out_are_refused_before_the_slow_stages(tmp_path):
    with tmpfs(tmp_path / "mnt") as mnt:
        (mnt / MANIFEST).write_text("{}")            # a bundle at the mount point itself
        (mnt / "data.txt").write_text("old")
        r = cli("android", "--out", mnt, "--force", timeout=300)
        one_error_line(r, f"--out {mnt}: is a mount point", "give a folder inside it")
        assert "done load" not in r.stderr             # refused before the checkpoint was touched
        assert sorted(p.name for p in mnt.iterdir()) == ["data.txt", MANIFEST]
    nothing_partial(tmp_path)
    with tmpfs(tmp_path / "ro", readonly=True) as ro:
        with pytest.raises(ExportError, match="is a mount point"):
            Staging(ro).__enter__()
        with pytest.raises(ExportError, match=f"--out {ro / 'b'}: cannot write there \\(Read-only file system\\)"):
            Staging(ro / "b").__enter__()
    nothing_partial(tmp_path)


# ------------------------------------------------------------------ 7: a full filesystem
def test_full_filesystem_is_one_line_naming_the_path(tmp_path):
    with tmpfs(tmp_path / "small", size="1m") as small:
        with pytest.raises(ExportError, match=f"{small}: no space left on the device") as e:
            with Staging(small / "b") as st:     # what the TVM target writes: params/ (targets/tvm/params.py)
                write_tensor_cache([("w", np.ones((1024, 1024), np.float32))], st.dir / "params")
        assert f"--out {small / 'b'}" in str(e.value)
        assert list(small.iterdir()) == []        # no staging, no lock, no bundle


@pytest.mark.slow
def test_export_into_a_full_filesystem(tmp_path):
    with tmpfs(tmp_path / "small", size="2m") as small:
        one_error_line(cli("android", "--out", small / "b"), "no space left on the device", str(small))
        assert list(small.iterdir()) == []
