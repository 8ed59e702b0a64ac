"""`mcpm-export doctor` against this machine's real toolchain, and with tools hidden from PATH."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.doctor import BUILD_TARGETS, run_checks, summary
from exporter.errors import ExportError

ROOT = Path(__file__).resolve().parent.parent


def doctor(*args, env=None):
    return subprocess.run([sys.executable, "-m", "exporter.cli", "doctor", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_this_machine_can_build_every_target():
    res = summary(run_checks())
    failing = [c for c in res["checks"] if not c["ok"]]
    assert res["ok"], failing
    assert all(res["targets"][t] for t in BUILD_TARGETS)
    names = {c["name"] for c in res["checks"]}
    for expected in ("apache-tvm", "TVM LLVM backends", "clang + lld (aarch64 .so)", "aarch64-linux-gnu-g++",
                     "aarch64 sysroot", "adb", "qemu-aarch64-static", "coremltools", "numpy", "onnxruntime",
                     "torch (CPU build)", "runner wheels (aarch64 TVM)"):
        assert expected in names


def test_json_and_exit_status_when_tools_are_missing(tmp_path):
    """Only python on PATH: clang, lld, the cross compiler, adb and qemu are all missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    out = doctor("--json", env={"PATH": str(bin_dir), "HOME": str(tmp_path)})
    assert out.returncode == 1, out.stderr
    res = json.loads(out.stdout)
    assert res["ok"] is False
    assert res["targets"]["android"] is False and res["targets"]["harmony"] is False
    assert res["targets"]["ios"] is True          # Core ML conversion needs no native tools
    by_name = {c["name"]: c for c in res["checks"]}
    assert not by_name["adb"]["ok"] and by_name["adb"]["fix"] == "apt-get install -y adb"
    assert not by_name["clang + lld (aarch64 .so)"]["ok"]
    assert "apt-get install -y clang lld" in res["fixes"]
    assert "apt-get install -y qemu-user-static" in res["fixes"]
    assert "apt-get install -y g++-aarch64-linux-gnu" in res["fixes"]
    assert by_name["apache-tvm"]["ok"]           # python packages are unaffected by PATH
    wheels = by_name["runner wheels (aarch64 TVM)"]   # HOME is empty: no cached runner wheels
    assert not wheels["ok"] and "is not in" in wheels["detail"] and wheels["fix"] == "bash scripts/install.sh"


def test_table_output():
    from click.testing import CliRunner

    from exporter.cli import main

    out = CliRunner().invoke(main, ["doctor"])
    assert out.exit_code == 0, out.output
    assert "mcpm-export doctor" in out.output
    for t in BUILD_TARGETS:
        assert f"{t}: can build" in out.output


# ------------------------------------------------------------------ offline: the runner's wheels
UNREACHABLE = {"PIP_INDEX_URL": "https://pypi.invalid/simple", "PIP_RETRIES": "1"}


def test_export_never_downloads_and_names_cause_and_fix(tmp_path):
    from runner.build import build_runner

    with pytest.raises(ExportError) as e:
        build_runner(tmp_path)
    msg = str(e.value)
    assert "apache_tvm-0.27.0.post1" in msg and str(tmp_path / "wheels") in msg
    assert "exports work offline" in msg and "bash scripts/install.sh" in msg
    assert not (tmp_path / "wheels").exists()


def test_fetch_without_network_names_the_cause(tmp_path, monkeypatch):
    from runner.build import fetch_wheels

    for k, v in UNREACHABLE.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ExportError, match=r"PyPI cannot be reached \(\[Errno -?\d+\] [^)]+\); connect to the network"):
        fetch_wheels(tmp_path / "wheels", say=lambda _: None)


def test_install_time_fetch_is_a_no_op_when_cached():
    """What scripts/install.sh runs: with the wheels cached it succeeds without any index reachable."""
    r = subprocess.run([sys.executable, "-m", "runner.build", "--fetch-wheels"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, **UNREACHABLE})
    assert r.returncode == 0 and "runner wheels:" in r.stdout and "downloading" not in r.stdout + r.stderr, r.stderr
